"""Two `batch_edit` runs at once on one archive: every row paid once and archived once.

The runs start together in one event loop, each with its own concurrency limit (the
worst case: neither waits for the other's slots), on a local folder and on S3
(moto's server). Whichever run claims a row first pays for it; the other adopts it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from prefect_nanobanana.storage import Ledger

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _jobs(sample_images: Path, count: int) -> list[dict[str, Any]]:
    names = ["a.png", "b.jpg", "c.webp"]
    return [
        {
            "id": f"row-{i}",
            "prompt": f"variation {i}",
            "images": [str(sample_images / names[i % 3])],
        }
        for i in range(count)
    ]


async def _race(archive_uri: str, rows: int, sample_images, loopback_store, monkeypatch, tag):
    from prefect_nanobanana.flows import batch_edit

    monkeypatch.setenv("NANOBANANA_STAGING_TOKEN", loopback_store.upload_token)
    options = {
        "jobs": _jobs(sample_images, rows),
        "archive_uri": archive_uri,
        "staging_uri": loopback_store.base_url,
        "max_concurrency": 8,
    }
    return await asyncio.gather(
        batch_edit(**options, concurrency_limit_name=f"race-{tag}-a"),
        batch_edit(**options, concurrency_limit_name=f"race-{tag}-b"),
    )


def _check(results, rows: int, emulator, ledger: Ledger) -> None:
    first, second = results
    # Paid once per row, over both runs; both runs Completed (a failure would raise).
    assert emulator.stats.submits_accepted == rows
    assert first.failed == second.failed == 0
    assert first.archived + second.archived == rows  # each row paid (and kept) by one run
    # The other run reports it as adopted (it waited on the request) or skipped (done).
    assert first.adopted + first.skipped + second.adopted + second.skipped == rows
    for result, other in ((first, second), (second, first)):
        other_run = other.results_manifest.rsplit("-", 5)[-5:]
        for row in result.rows:
            if row.status == "adopted":
                # The row table names the run that paid for it.
                assert row.adopted_from and row.adopted_from in "-".join(other_run)
            assert row.output_locations and row.cost is not None
    # Archived once: each request's output fetched once, one metadata.json per row.
    assert all(calls.output == 1 for calls in emulator.stats.requests.values())
    entries = ledger.entries()
    assert len(entries) == rows and {entry.status for entry in entries} == {"archived"}
    assert len({entry.request_id for entry in entries}) == rows
    # Two runs, two results manifests (the run id is in the name).
    assert first.results_manifest != second.results_manifest


@pytest.mark.parametrize("rows", [12, 40])
async def test_two_runs_at_once_on_a_local_archive_pay_each_row_once(
    rows, emulator_factory, use_emulator, sample_images, loopback_store, tmp_path, monkeypatch
):
    emulator = use_emulator(emulator_factory(workers=8, fixed_duration_seconds=0.3))
    archive = tmp_path / "archive"
    results = await _race(
        str(archive), rows, sample_images, loopback_store, monkeypatch, f"local-{rows}"
    )
    _check(results, rows, emulator, Ledger(archive))
    assert len(list(archive.rglob("metadata.json"))) == rows


@pytest.mark.s3
@pytest.mark.parametrize("rows", [12, 40])
async def test_two_runs_at_once_on_an_s3_archive_pay_each_row_once(
    rows,
    emulator_factory,
    use_emulator,
    sample_images,
    loopback_store,
    s3_client,
    s3_bucket,
    monkeypatch,
):
    emulator = use_emulator(emulator_factory(workers=8, fixed_duration_seconds=0.3))
    archive = f"s3://{s3_bucket}/archive"
    results = await _race(archive, rows, sample_images, loopback_store, monkeypatch, f"s3-{rows}")
    _check(results, rows, emulator, Ledger(archive, s3_client=s3_client))
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert sum(key.endswith("metadata.json") for key in keys) == rows
