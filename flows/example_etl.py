"""An ETL flow of a data team's own that runs our flows as subflows with typed results.

extract (a manifest of product photos) → transform (batch_edit, a subflow) →
load (a catalogue row per archived image, read from the typed result: no bucket
listing). Run it offline with the emulator:

    nanobanana emulator --time-scale 0.05 &   # prints the RUNCOMFY_* variables to export
    python flows/example_etl.py manifest.jsonl ./archive   # rows with https:// images

Local images need a `staging_uri` (s3://bucket/prefix) as the third argument.
"""

from __future__ import annotations

import asyncio
import sys

from prefect import flow, task

from prefect_nanobanana.flows import BatchEditResult, batch_edit


@task
def load_catalogue(result: BatchEditResult) -> list[dict[str, object]]:
    """Stand-in for a warehouse load: one record per archived image."""
    return [
        {"row_id": row.id, "request_id": row.request_id, "image": location, "cost": row.cost}
        for row in result.rows
        if row.status in ("archived", "skipped")
        for location in row.output_locations
    ]


@flow(name="product-photo-etl")
async def product_photo_etl(
    manifest_uri: str, archive_uri: str, staging_uri: str | None = None
) -> list[dict[str, object]]:
    edited = await batch_edit(
        manifest_uri=manifest_uri,
        archive_uri=archive_uri,
        staging_uri=staging_uri,
        allow_partial=True,
    )
    return load_catalogue(edited)


if __name__ == "__main__":
    records = asyncio.run(product_photo_etl(*sys.argv[1:4]))
    print(f"{len(records)} catalogue records")
