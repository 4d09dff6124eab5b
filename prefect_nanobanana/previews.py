"""What an archived edit shows in Prefect: before/after images, where it went, assets.

A person looks at a run in Prefect's UI, in a browser that can open neither the
worker's disk nor S3 without signing in, and RunComfy's output URLs expire. So
the previews travel inside the markdown artifact as small JPEG `data:` URIs
(Prefect's UI renders them), and the archive is named by what lasts: the
absolute path of each file, or the S3 object with a link to its console page.

Every archived output is also a Prefect asset: a
`prefect.asset.materialization.succeeded` event whose resource is the output's
URI, related to the inputs it was made from and to the model that made it.
They are emitted here, rather than by a `@materialize` task, because the keys
are known only once the archive has named the files, and a task run more per
row is what the batch's benchmarks taught us to avoid.

Best effort, like the rest of observability: nothing here fails a paid request.
"""

from __future__ import annotations

import logging
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.logging import get_logger
from prefect.types.names import validate_valid_asset_key

from . import observe
from .storage import (
    ArchiveRecord,
    location_link,
    location_uri,
    strip_signature,
    thumbnail_data_uri,
)
from .tasks.storage import resolve_location

ASSET_MATERIALIZED = "prefect.asset.materialization.succeeded"
# Rows of a batch shown with images; the rest are in the table artifact.
DEFAULT_PREVIEW_ROWS = 20
# Thumbnails per side of a row (inputs, outputs); more are counted, not shown.
MAX_THUMBNAILS_PER_SIDE = 4
# Prefect's UI does not wrap a table cell: a failed row's error is broken into lines
# this long, and a path in it longer than that is named by its file.
ERROR_LINE_CHARACTERS = 40
_LONG_WORD = re.compile(rf"[^\s'\"`()<>\[\],;]{{{ERROR_LINE_CHARACTERS + 1},}}")

logger = get_logger("prefect_nanobanana.previews")


@dataclass
class ShownRow:
    """One edit as the preview shows it; `label` is the row's id, or its number."""

    label: str
    status: str
    request_id: str | None
    sources: Sequence[str]
    output_locations: Sequence[str] = ()
    output_thumbnails: Sequence[str | None] = ()
    """Thumbnails already made (while archiving); an output without one is read back."""
    metadata_location: str | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _file_name(location: str) -> str:
    return PurePosixPath(urlsplit(location).path).name or location


def _error_cell(error: str) -> tuple[str, bool]:
    """The error in lines a table cell shows whole, each long path in it named `…/file`;
    and whether a path was shortened (the whole error then goes under the table).

    Prefect's UI neither wraps a table cell nor breaks a word, so a failed row's
    error ran past the table's edge (seen in the UI test's screenshot).
    """

    def shorten(word: re.Match[str]) -> str:
        place = word.group(0)
        return f"…/{_file_name(place)}" if "/" in place.strip("/") else place

    shown = _LONG_WORD.sub(shorten, error)
    return "<br>".join(textwrap.wrap(_cell(shown), ERROR_LINE_CHARACTERS)), shown != error


def _place(location: str) -> str:
    """A location in markdown: an S3 object linked to its console page, a path as code."""
    link = location_link(location)
    return f"[{_cell(location)}]({link})" if link else f"`{_cell(location)}`"


def _thumbnails(
    locations: Sequence[str], s3_client: Any, alt: str, made: Sequence[str | None] = ()
) -> tuple[str, list[str]]:
    """The images as thumbnails, and the locations that could not be shown as one.

    Those are named in the table by their file name only: a whole path or URL in a
    cell that cannot wrap pushed the "after" column out of the browser's view. Their
    full names (signatures removed) go to the list under the table.
    """
    shown, unshown = [], []
    for index, location in enumerate(locations[:MAX_THUMBNAILS_PER_SIDE]):
        uri = (made[index] if index < len(made) else None) or thumbnail_data_uri(
            location, s3_client
        )
        if uri:
            shown.append(f"![{alt} {index}]({uri})")
            continue
        # A source we will not read (an https URL, say), or not an image.
        stripped = strip_signature(location)
        unshown.append(stripped)
        shown.append(f"`{_cell(_file_name(stripped))}`")
    hidden = len(locations) - MAX_THUMBNAILS_PER_SIDE
    if hidden > 0:
        shown.append(f"+{hidden} more")
    return " ".join(shown), unshown


def preview_markdown(
    title: str,
    rows: Sequence[ShownRow],
    *,
    s3_client: Any = None,
    preview_rows: int = DEFAULT_PREVIEW_ROWS,
    summary: str = "",
) -> str:
    """A markdown report: per row, inputs and outputs as thumbnails, then where they went.

    Only the first `preview_rows` rows are shown (with images), so the artifact
    stays small (a few kilobytes a thumbnail) however large the batch; the table
    artifact and the results manifest list every row.
    """
    shown = rows[:preview_rows]
    lines = [f"# {title}", ""]
    if summary:
        lines += [summary, ""]
    lines += ["| row | status | before | after |", "| --- | --- | --- | --- |"]
    where = []
    for row in shown:
        error_in_full: list[str] = []
        if row.output_locations:
            after, _ = _thumbnails(row.output_locations, s3_client, "output", row.output_thumbnails)
        else:
            after, shortened = _error_cell(row.error or "")
            if shortened:
                error_in_full = [f"error: {_cell(row.error or '')}"]
        request = f"<br>request `{row.request_id}`" if row.request_id else ""
        before, unshown = _thumbnails(row.sources, s3_client, "input")
        lines.append(f"| {_cell(row.label)}{request} | {row.status} | {before} | {after} |")
        places = (
            [f"input: {_place(source)}" for source in unshown]
            + [
                f"output {index}: {_place(location)}"
                for index, location in enumerate(row.output_locations)
            ]
            + ([f"metadata: {_place(row.metadata_location)}"] if row.metadata_location else [])
            + error_in_full
        )
        if places:
            where.append(f"- **{_cell(row.label)}**: " + "; ".join(places))
    if len(rows) > len(shown):
        lines += ["", f"The first {len(shown)} of {len(rows)} rows are shown."]
    if where:
        lines += ["", "## Where it went", "", *where]
    return "\n".join(lines)


def log_where(
    log: logging.Logger | logging.LoggerAdapter, label: str, record: ArchiveRecord
) -> None:
    """One log line naming every archived output and the metadata.json of a request."""
    log.info(
        "%s: request %s archived to %s; metadata: %s",
        label,
        record.request_id,
        ", ".join(record.output_locations) or "(no outputs)",
        record.metadata_location,
    )


def _asset_key(location: str) -> str | None:
    """The location as a valid Prefect asset key, or None (e.g. a path with a space)."""
    try:
        return validate_valid_asset_key(location_uri(strip_signature(location)))
    except ValueError:
        return None


def emit_materializations(
    record: ArchiveRecord,
    *,
    sources: Sequence[str],
    model_id: str,
    prompt: str,
    cost: float | None,
    row_id: str | None = None,
    resolution: str | None = None,
) -> int:
    """A `prefect.asset.materialization.succeeded` event per archived output; how many.

    Resource: the output's URI (`s3://…` or `file://…`). Related: the input images
    (role `asset`, signatures removed) and the model (`asset-materialized-by`), as
    Prefect's own materializing tasks relate them. Payload (the materialization's
    metadata, shown in Prefect's asset view): request id, model, resolution, the
    request's billed cost (`cost` and `billed_cost_usd`, the same figure: what
    RunComfy billed for the request, all its outputs together), prompt, pixel
    size, sha256, bytes, content type.
    """
    upstream = [
        {"prefect.resource.id": key, "prefect.resource.role": "asset"}
        for key in dict.fromkeys(filter(None, (_asset_key(source) for source in sources)))
    ]
    by = {"prefect.resource.id": model_id, "prefect.resource.role": "asset-materialized-by"}
    emitted = 0
    for output in record.outputs:
        key = _asset_key(output.location)
        if key is None:
            logger.debug("No asset for %s: not a valid asset key", output.location)
            continue
        try:
            emit_event(
                ASSET_MATERIALIZED,
                resource={
                    "prefect.resource.id": key,
                    "prefect.resource.name": PurePosixPath(key).name,
                },
                related=[*upstream, by],
                payload={
                    "request_id": record.request_id,
                    "row_id": row_id,
                    "model_id": model_id,
                    "resolution": resolution,
                    "billed_cost_usd": cost,
                    "outputs_of_request": len(record.outputs),
                    "prompt": prompt,
                    "cost": cost,
                    "width": output.width,
                    "height": output.height,
                    "sha256": output.sha256,
                    "bytes": output.bytes,
                    "content_type": output.content_type,
                },
            )
            emitted += 1
        except Exception:
            logger.warning("Could not emit the asset event of %s", key, exc_info=True)
    return emitted


def announce_archived(
    log: logging.Logger | logging.LoggerAdapter,
    label: str,
    record: ArchiveRecord,
    *,
    sources: Sequence[str],
    model_id: str,
    prompt: str,
    cost: float | None,
    row: int | None = None,
    row_id: str | None = None,
    resolution: str | None = None,
) -> None:
    """Everything an archived request says at once: the log line, the event, the assets."""
    log_where(log, label, record)
    observe.emit_request_event(
        observe.EVENT_ARCHIVED,
        record.request_id,
        payload=observe.event_payload(
            record.request_id,
            "archived",
            row=row,
            row_id=row_id,
            cost=cost,
            metadata_location=record.metadata_location,
            output_locations=record.output_locations,
        ),
    )
    emit_materializations(
        record,
        sources=sources,
        model_id=model_id,
        prompt=prompt,
        cost=cost,
        row_id=row_id,
        resolution=resolution,
    )


def show_edit(
    record: ArchiveRecord,
    *,
    sources: Sequence[str],
    prompt: str,
    cost: float | None,
    archive_uri: str,
    aws_credentials: str | None,
) -> None:
    """The single edit's preview artifact: its inputs and outputs, and where they went."""
    _, s3_client = resolve_location(archive_uri, aws_credentials)
    row = ShownRow(
        label="edit",
        status="archived",
        request_id=record.request_id,
        sources=sources,
        output_locations=record.output_locations,
        metadata_location=record.metadata_location,
    )
    cost_text = f" Cost: ${cost:.2f}." if cost is not None else ""
    try:
        create_markdown_artifact(
            key=observe.EDIT_PREVIEW_KEY,
            markdown=preview_markdown(
                "Nano Banana edit",
                [row],
                s3_client=s3_client,
                summary=f"Prompt: {_cell(prompt)}.{cost_text}",
            ),
            description=f"Before and after of RunComfy request {record.request_id}",
        )
    except Exception:
        logger.warning("Could not create the preview of %s", record.request_id, exc_info=True)
