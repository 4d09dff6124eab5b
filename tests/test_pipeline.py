"""Stage → edit → archive on real storage: moto's S3 server, local folders, the emulator.

Every test runs the flows on the session's Prefect test server, with the emulator
over HTTP on loopback and S3 served by moto's server (not in-process patching).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from prefect_nanobanana.client import NANO_BANANA_EDIT_MODEL_ID
from prefect_nanobanana.client.polling import RunDurationEstimator
from prefect_nanobanana.emulator import Fault, FaultPlan
from prefect_nanobanana.storage import RunTimeHistory

pytestmark = pytest.mark.usefixtures("prefect_harness")

TIME_SCALE = 0.005


def _all_text(folder: Path) -> str:
    return "\n".join(path.read_text() for path in folder.rglob("*.json*"))


def _s3_text(s3_client, bucket: str) -> str:
    texts = []
    for item in s3_client.list_objects_v2(Bucket=bucket).get("Contents", []):
        if item["Key"].endswith((".json", ".jsonl")):
            texts.append(
                s3_client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read().decode()
            )
    return "\n".join(texts)


def test_local_folder_staged_to_s3_edited_and_archived_to_s3(
    emulator_factory, use_emulator, sample_images, s3_client, s3_bucket
):
    from prefect_nanobanana.flows import edit_and_archive

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    result = edit_and_archive(
        prompt="make it look like a watercolour",
        images=[str(sample_images / "a.png"), str(sample_images / "b.jpg")],
        archive_uri=f"s3://{s3_bucket}/archive",
        staging_uri=f"s3://{s3_bucket}/staging",
        aspect_ratio="4:3",
        num_images=2,
    )
    assert len(result.output_locations) == 2
    assert all(
        location.startswith(f"s3://{s3_bucket}/archive/") for location in result.output_locations
    )
    # The emulator fetched the pre-signed URLs itself, from moto's server.
    fetched = emulator.stats.fetched_input_urls
    assert len(fetched) == 2
    assert all(f"/{s3_bucket}/staging/" in url and "Signature" in url for url in fetched)
    key = result.output_locations[0].removeprefix(f"s3://{s3_bucket}/")
    body = s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    image = Image.open(__import__("io").BytesIO(body))
    assert image.size == (1200, 896)
    metadata_key = result.metadata_location.removeprefix(f"s3://{s3_bucket}/")
    metadata = json.loads(s3_client.get_object(Bucket=s3_bucket, Key=metadata_key)["Body"].read())
    assert metadata["request_id"] == result.request_id
    assert metadata["prompt"] == "make it look like a watercolour"
    # The same parameters a batch row's metadata.json has (the schema's, nothing more).
    assert metadata["parameters"] == {
        "aspect_ratio": "4:3",
        "resolution": "1K",
        "output_format": "png",
        "num_images": 2,
    }
    assert [output["width"] for output in metadata["outputs"]] == [1200, 1200]
    assert len(metadata["outputs"][0]["sha256"]) == 64
    assert metadata["flow_run_id"]
    text = _s3_text(s3_client, s3_bucket)
    assert "Signature" not in text and "X-Amz" not in text
    assert emulator.config.api_tokens[0] not in text


def test_archive_to_local_folder_with_loopback_staging_and_no_reupload(
    emulator_factory, use_emulator, sample_images, loopback_store, tmp_path, monkeypatch
):
    from prefect_nanobanana.flows import edit_and_archive

    monkeypatch.setenv("NANOBANANA_STAGING_TOKEN", loopback_store.upload_token)
    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    archive = tmp_path / "archive"
    store_files = lambda: sorted(p for p in Path(loopback_store.folder).rglob("*") if p.is_file())  # noqa: E731
    first = edit_and_archive(
        prompt="sunset",
        images=[str(sample_images / "c.webp")],
        archive_uri=str(archive),
        staging_uri=loopback_store.base_url,
        output_format="jpeg",
    )
    staged_once = [(p, p.stat().st_mtime_ns) for p in store_files()]
    second = edit_and_archive(
        prompt="sunset again",
        images=[str(sample_images / "c.webp")],
        archive_uri=str(archive),
        staging_uri=loopback_store.base_url,
        output_format="jpeg",
    )
    assert [(p, p.stat().st_mtime_ns) for p in store_files()] == staged_once  # nothing re-uploaded
    assert len([path for path, _ in staged_once if "objects" in path.parts]) == 1
    for result in (first, second):
        saved = Path(result.output_locations[0])
        assert saved.is_file() and saved.suffix in (".jpeg", ".jpg")
        assert saved.parent.name == result.request_id
        assert Image.open(saved).format == "JPEG"
    assert emulator.stats.submits_accepted == 2
    assert "signature=" not in _all_text(archive)


@pytest.mark.parametrize(
    ("make_input", "expected"),
    [
        (lambda folder: str(folder / "missing.png"), "missing.png"),
        (lambda folder: str(folder / "notes.txt"), "notes.txt"),
        (lambda folder: "http://example.com/a.png", "non-HTTPS"),
    ],
)
def test_bad_inputs_fail_clearly_before_any_submit(
    emulator_factory, use_emulator, sample_images, s3_bucket, make_input, expected
):
    from prefect_nanobanana.flows import edit_and_archive

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    with pytest.raises(Exception, match=expected):
        edit_and_archive(
            prompt="p", images=[make_input(sample_images)], staging_uri=f"s3://{s3_bucket}/s"
        )
    assert emulator.stats.submits_received == 0


def test_oversized_input_and_unknown_bucket_fail_before_any_submit(
    emulator_factory, use_emulator, sample_images, s3_bucket
):
    from prefect_nanobanana.flows import edit_and_archive

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    big = sample_images / "huge.png"
    with big.open("wb") as handle:  # a PNG header, then 60 MB (sparse on disk)
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.truncate(60 * 1024 * 1024)
    with pytest.raises(Exception, match="50"):
        edit_and_archive(prompt="p", images=[str(big)], staging_uri=f"s3://{s3_bucket}/s")
    with pytest.raises(Exception, match="no-such-bucket"):
        edit_and_archive(
            prompt="p", images=[str(sample_images / "a.png")], staging_uri="s3://no-such-bucket/s"
        )
    assert emulator.stats.submits_received == 0


def test_an_archive_that_cannot_take_the_outputs_fails_before_any_submit(
    emulator_factory, use_emulator, sample_images, s3_bucket, tmp_path
):
    from prefect_nanobanana.flows import edit_and_archive

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    a_file = tmp_path / "archive.txt"
    a_file.write_text("not a folder")
    for archive_uri, expected in (
        (str(a_file), "archive.txt"),
        ("s3://no-such-bucket/a", "no-such"),
    ):
        with pytest.raises(Exception, match=expected):
            edit_and_archive(
                prompt="p", images=[str(sample_images / "a.png")], archive_uri=archive_uri
            )
    assert emulator.stats.submits_received == 0


def _jobs(sample_images: Path, count: int) -> list[dict]:
    names = ["a.png", "b.jpg", "c.webp"]
    ratios = ["1:1", "16:9", "auto", "3:4"]
    return [
        {
            "id": f"row-{index}",
            "prompt": f"variation {index}",
            "images": [str(sample_images / names[index % 3])],
            "aspect_ratio": ratios[index % 4],
        }
        for index in range(count)
    ]


async def test_batch_of_fifty_with_failures_and_rate_limits(
    emulator_factory, use_emulator, sample_images, loopback_store, tmp_path, monkeypatch
):
    from prefect.client.orchestration import get_client

    from prefect_nanobanana.flows import batch_edit

    monkeypatch.setenv("NANOBANANA_STAGING_TOKEN", loopback_store.upload_token)
    emulator = use_emulator(
        emulator_factory(
            workers=8,
            time_scale=TIME_SCALE,
            faults=FaultPlan(
                [
                    Fault("fail_job", endpoint="submit", calls=[3, 17, 40]),
                    Fault("rate_limit", endpoint="submit", every=9, retry_after=0.05),
                    Fault("rate_limit", endpoint="status", every=13, retry_after=0.02),
                ]
            ),
        )
    )
    archive = tmp_path / "archive"
    result = await batch_edit(
        jobs=_jobs(sample_images, 50),
        archive_uri=str(archive),
        staging_uri=loopback_store.base_url,
        max_concurrency=8,
        concurrency_limit_name="test-batch-fifty",
        allow_partial=True,
    )
    assert (result.archived, result.failed, result.skipped) == (47, 3, 0)
    assert emulator.stats.submits_accepted == 50
    assert emulator.stats.faults_fired["rate_limit"] > 0
    failed = [row for row in result.rows if row.status == "failed"]
    assert all(row.request_id and "failed" in row.error for row in failed), failed
    assert result.total_cost == pytest.approx(sum(row.cost for row in result.rows if row.cost))
    assert result.total_cost == pytest.approx(0.15 * 47)
    manifest = [json.loads(line) for line in Path(result.results_manifest).read_text().splitlines()]
    assert [line["row"] for line in manifest] == list(range(1, 51))
    assert all(Path(p).is_file() for line in manifest for p in line["output_locations"])
    async with get_client() as client:
        artifacts = await client.read_artifacts()
    keys = {artifact.key for artifact in artifacts}
    assert {"nanobanana-batch-rows", "nanobanana-batch-report"} <= keys
    progress = [a for a in artifacts if a.type == "progress"]
    assert any(a.data == 100.0 for a in progress), [(a.key, a.data) for a in progress]


async def test_batch_rerun_skips_archived_rows_and_failed_rows_fail_the_flow(
    emulator_factory, use_emulator, sample_images, loopback_store, tmp_path, monkeypatch
):
    from prefect_nanobanana.flows import BatchFailedError, batch_edit

    monkeypatch.setenv("NANOBANANA_STAGING_TOKEN", loopback_store.upload_token)
    emulator = use_emulator(
        emulator_factory(
            time_scale=TIME_SCALE,
            faults=FaultPlan([Fault("fail_job", endpoint="submit", calls=[2])]),
        )
    )
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(job) for job in _jobs(sample_images, 4)))
    archive = tmp_path / "archive"
    options = {
        "manifest_uri": str(manifest),
        "archive_uri": str(archive),
        "staging_uri": loopback_store.base_url,
        "concurrency_limit_name": "test-batch-rerun",
    }
    # Run times an earlier batch saw (model seconds), kept with the archive.
    RunTimeHistory(archive).save(NANO_BANANA_EDIT_MODEL_ID, {"1K": [12.0, 13.0, 14.0]})
    seeded: list[dict[str, list[float]]] = []
    seed = RunDurationEstimator.seed
    monkeypatch.setattr(
        RunDurationEstimator,
        "seed",
        lambda self, runs, scale=1.0: (seeded.append(dict(runs)), seed(self, runs, scale)),
    )
    with pytest.raises(BatchFailedError, match="1 of 4 rows failed"):
        await batch_edit(**options)
    # The batch's wait schedule started from them; it added what it saw itself.
    assert seeded == [{"1K": [12.0, 13.0, 14.0]}]
    saved = RunTimeHistory(archive).load(NANO_BANANA_EDIT_MODEL_ID)["1K"]
    # A run is its seconds, or [low, high] when its start fell in a long gap between polls.
    bounds = [run if isinstance(run, list) else [run, run] for run in saved[3:]]
    assert saved[:3] == [12.0, 13.0, 14.0] and bounds
    assert all(0 <= low <= high < 90 for low, high in bounds)
    again = await batch_edit(**options)  # the failed row is resubmitted; the rest skipped
    assert (again.archived, again.skipped, again.failed) == (1, 3, 0)
    assert emulator.stats.submits_accepted == 5
    assert seeded[1] == {"1K": saved}


async def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        return await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


@pytest.mark.parametrize(
    "endpoint",
    [
        # More 429s on a poll than the client's six attempts: the row's task run is
        # retried and resumes the request its first attempt submitted.
        "status",
        # Six refused submits (a 429 is never billed): the retry may submit, once.
        "submit",
    ],
)
async def test_a_retried_row_resumes_its_request_or_resubmits_only_a_refused_one(
    emulator_factory, use_emulator, image_server, tmp_path, endpoint
):
    from prefect_nanobanana.flows import batch_edit

    emulator = use_emulator(
        emulator_factory(
            time_scale=TIME_SCALE,
            faults=FaultPlan(
                [Fault("rate_limit", endpoint=endpoint, calls=range(1, 7), retry_after=0)]
            ),
        )
    )
    state = await batch_edit(
        jobs=[
            {"id": f"row-{index}", "prompt": "teal", "images": [image_server.url_for("wide.png")]}
            for index in range(2)
        ],
        archive_uri=str(tmp_path / "archive"),
        max_concurrency=1,
        concurrency_limit_name=f"test-batch-retry-{endpoint}",
        return_state=True,
    )
    result = await state.result()
    assert (result.archived, result.failed) == (2, 0)
    assert emulator.stats.submits_accepted == 2  # one paid request per row
    assert emulator.stats.calls[endpoint] >= 7
    # Named `row-N <id>`: keyed here by `row-N`.
    runs = {run.name.split()[0]: run for run in await _task_runs(state.state_details.flow_run_id)}
    assert runs["row-1"].run_count == 2 and runs["row-2"].run_count == 1, runs
    assert runs["row-1"].state.is_completed()
    assert len(list((tmp_path / "archive").rglob("metadata.json"))) == 2


async def test_a_cancelled_batch_stops_its_rows(
    emulator_factory, use_emulator, image_server, tmp_path
):
    import asyncio

    from prefect_nanobanana.flows import batch_edit
    from prefect_nanobanana.flows.batch import ROW_PROGRESS

    emulator = use_emulator(emulator_factory(workers=2, fixed_duration_seconds=1.0))
    image = image_server.url_for("wide.png")
    rows_ended: list[int] = []
    listening = ROW_PROGRESS.set(lambda done, total: rows_ended.append(done))
    try:
        run = asyncio.ensure_future(
            batch_edit(
                jobs=[
                    {"id": f"row-{index}", "prompt": "t", "images": [image]} for index in range(4)
                ],
                archive_uri=str(tmp_path / "archive"),
                max_concurrency=2,
                concurrency_limit_name="test-batch-cancel",
            )
        )
        deadline = time.monotonic() + 60
        while emulator.stats.submits_accepted < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        calls = dict(emulator.stats.calls)
        await asyncio.sleep(1.5)  # past the jobs' end: a row still alive would poll and archive
        assert dict(emulator.stats.calls) == calls
        assert emulator.stats.submits_accepted == 2
        assert not list((tmp_path / "archive").rglob("metadata.json"))
        # Stopped as designed: the two rows in flight let go of their requests and ended
        # before the cancellation went on; no other row started, none ran on into errors.
        assert rows_ended == [1, 2]
    finally:
        ROW_PROGRESS.reset(listening)


async def test_a_cancelled_batch_withdraws_its_queued_request_and_a_rerun_submits_it_again(
    emulator_factory, use_emulator, image_server, tmp_path
):
    """One worker, two lanes: one request runs, one waits in the queue when the run is
    cancelled. The queued one is withdrawn (never billed) and its record says so, so the
    rerun submits that row again and adopts the one that ran on."""
    import asyncio

    from prefect_nanobanana.flows import batch_edit

    emulator = use_emulator(emulator_factory(workers=1, fixed_duration_seconds=1.0))
    options = _two_rows(image_server, tmp_path / "archive", "test-batch-withdraw")
    run = asyncio.ensure_future(batch_edit(**options))
    deadline = time.monotonic() + 60
    while not _both_waited_on(emulator, options) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    emulator.hold_queue()  # the queued request stays queued until the stop reaches it
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    await _assert_withdrawn_then_resubmitted(emulator, options)


def _two_rows(image_server: Any, archive: Path, limit_name: str) -> dict[str, Any]:
    """A batch of two rows in two lanes: on an emulator with one worker, one of its
    requests runs while the other waits in the queue."""
    image = image_server.url_for("wide.png")
    return {
        "jobs": [{"id": f"row-{index}", "prompt": "t", "images": [image]} for index in range(2)],
        "archive_uri": str(archive),
        "max_concurrency": 2,
        "concurrency_limit_name": limit_name,
    }


def _both_waited_on(emulator: Any, options: dict[str, Any]) -> bool:
    """Both rows recorded their request and asked about it once: each is in its wait."""
    from prefect_nanobanana.storage import Ledger

    ids = [entry.request_id for entry in Ledger(options["archive_uri"]).entries()]
    asked = emulator.stats.requests
    return len(ids) == 2 and all(
        request_id in asked and asked[request_id].status + asked[request_id].result > 0
        for request_id in ids
    )


async def _assert_withdrawn_then_resubmitted(emulator: Any, options: dict[str, Any]) -> None:
    """Of a stopped `_two_rows` batch: the queued request was withdrawn and its record
    says so; a rerun submits that row again and adopts the other."""
    from prefect_nanobanana.flows import batch_edit
    from prefect_nanobanana.storage import Ledger

    assert emulator.stats.cancel_outcomes["cancelled"] == 1, emulator.stats.cancel_outcomes
    emulator.hold_queue(False)
    entries = Ledger(options["archive_uri"]).entries()
    withdrawn = [entry for entry in entries if entry.status == "failed"]
    assert len(entries) == 2 and len(withdrawn) == 1, entries
    assert "withdrawn while queued" in (withdrawn[0].error or "")
    # The running row keeps its request id: "submitted", or "archiving" when its request
    # ended before the stop reached the row (after SIGTERM it lives on until then).
    (running,) = (entry for entry in entries if entry.status != "failed")
    assert running.status in ("submitted", "archiving") and running.request_id, running
    # A different limit name: the slots of a killed process stay leased until they expire.
    rerun = await batch_edit(**{**options, "concurrency_limit_name": "test-batch-withdrawn-rerun"})
    assert (rerun.archived, rerun.adopted, rerun.failed) == (1, 1, 0)
    assert sorted(row.status for row in rerun.rows) == ["adopted", "archived"]
    assert emulator.stats.submits_accepted == 3  # the withdrawn row once more, nothing else


async def test_a_direct_batch_set_to_cancelling_withdraws_its_queued_request(
    prefect_harness, emulator_factory, use_emulator, image_server, tmp_path
):
    """A batch started directly (a script, or a subflow of one) has no runner: a cancel
    from the UI or the API only sets its state. The run reads it, stops its rows as a
    cancel in its process would, and ends Cancelled with its results manifest written."""
    import asyncio
    import threading
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.states import Cancelling

    from prefect_nanobanana.flows import batch_edit

    emulator = use_emulator(emulator_factory(workers=1, fixed_duration_seconds=3.0))
    options = _two_rows(image_server, tmp_path / "archive", "test-batch-cancelling")
    name = f"batch-cancelling-{uuid.uuid4().hex[:8]}"
    ended: list[Any] = []
    batch = batch_edit.with_options(flow_run_name=name)
    runner = threading.Thread(
        target=lambda: ended.append(asyncio.run(batch(**options, return_state=True))),
        daemon=True,
    )
    runner.start()
    deadline = time.monotonic() + 60
    while not _both_waited_on(emulator, options) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert emulator.stats.jobs_by_status.get("in_queue") == 1, emulator.stats.jobs_by_status
    emulator.hold_queue()  # the queued request stays queued until the stop reaches it
    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name]))
        )
        client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
    runner.join(timeout=60)
    assert ended and ended[0].is_cancelled(), ended
    results = sorted((tmp_path / "archive" / "_results").glob("*.jsonl"))
    rows = [json.loads(line) for line in results[-1].read_text().splitlines()]
    assert [row["status"] for row in rows] == ["failed", "failed"]
    assert all("not finished: the run was cancelled" in row["error"] for row in rows)
    await _assert_withdrawn_then_resubmitted(emulator, options)


_KILLABLE_BATCH = """
import asyncio, json, sys
from prefect_nanobanana.flows import batch_edit
options = json.loads(sys.argv[1])
asyncio.run(batch_edit(**options))
"""


async def test_a_batch_stopped_by_sigterm_withdraws_its_queued_request(
    prefect_harness, emulator_factory, use_emulator, image_server, tmp_path
):
    """What a worker sends a flow run it cancels, and what Kubernetes sends an evicted
    pod: SIGTERM. Prefect turns it into `TerminationSignal`; the queued request is
    withdrawn (never billed) and its record says so, as for an in-process cancel."""
    emulator = use_emulator(emulator_factory(workers=1, fixed_duration_seconds=1.5))
    options = _two_rows(image_server, tmp_path / "archive", "test-batch-sigterm")
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE_BATCH, json.dumps(options)],
        env=prefect_harness.env(
            **{k: v for k, v in os.environ.items() if k.startswith(("RUNCOMFY_", "NANOBANANA_"))}
        ),
    )
    try:
        deadline = time.monotonic() + 60
        while not _both_waited_on(emulator, options) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert emulator.stats.jobs_by_status.get("in_queue") == 1, emulator.stats.jobs_by_status
        emulator.hold_queue()  # the queued request stays queued until the stop reaches it
        child.send_signal(signal.SIGTERM)
        assert child.wait(30) != 0
    finally:
        child.kill()
    await _assert_withdrawn_then_resubmitted(emulator, options)


async def test_batch_killed_midway_resumes_without_paying_twice(
    prefect_harness,
    emulator_factory,
    use_emulator,
    sample_images,
    loopback_store,
    tmp_path,
    monkeypatch,
):
    from prefect_nanobanana.flows import batch_edit

    monkeypatch.setenv("NANOBANANA_STAGING_TOKEN", loopback_store.upload_token)
    emulator = use_emulator(emulator_factory(workers=4, fixed_duration_seconds=1.5))
    archive = tmp_path / "archive"
    options = {
        "jobs": _jobs(sample_images, 10),
        "archive_uri": str(archive),
        "staging_uri": loopback_store.base_url,
        "max_concurrency": 4,
        "concurrency_limit_name": "test-batch-kill",
    }
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE_BATCH, json.dumps(options)],
        env=prefect_harness.env(
            **{k: v for k, v in os.environ.items() if k.startswith(("RUNCOMFY_", "NANOBANANA_"))}
        ),
    )
    ledger = archive / "_ledger"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        entries = (
            [json.loads(p.read_text()) for p in ledger.glob("*.json")] if ledger.exists() else []
        )
        if sum(entry["status"] == "submitted" for entry in entries) >= 4:
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    submitted_before_kill = emulator.stats.submits_accepted
    assert 4 <= submitted_before_kill < 10
    # The killed run's concurrency slots stay leased until their lease expires;
    # a different limit name keeps this test from waiting for that.
    result = await batch_edit(**{**options, "concurrency_limit_name": "test-batch-kill-rerun"})
    assert emulator.stats.submits_accepted == 10  # one paid request per row, over both runs
    assert result.failed == 0 and result.archived + result.skipped + result.adopted == 10
    # The killed run's requests in flight are adopted (waited on, archived), never paid again.
    assert result.adopted == sum(row.status == "adopted" for row in result.rows) >= 1
    metadata_files = list(archive.rglob("metadata.json"))
    assert len(metadata_files) == 10
    assert "signature=" not in _all_text(archive)


async def test_flows_compose_as_subflows_with_typed_results(
    emulator_factory, use_emulator, sample_images, loopback_store, tmp_path, monkeypatch
):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "example_etl", Path(__file__).parents[1] / "flows" / "example_etl.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setenv("NANOBANANA_STAGING_TOKEN", loopback_store.upload_token)
    use_emulator(emulator_factory(time_scale=TIME_SCALE))
    manifest = tmp_path / "photos.csv"
    manifest.write_text(
        "id,prompt,images,num_images\n"
        f"shoe,white background,{sample_images / 'a.png'},2\n"
        f"bag,studio light,{sample_images / 'b.jpg'},1\n"
    )
    records = await example.product_photo_etl(
        str(manifest), str(tmp_path / "archive"), loopback_store.base_url
    )
    assert sorted(record["row_id"] for record in records) == ["bag", "shoe", "shoe"]
    assert all(Path(record["image"]).is_file() for record in records)


def test_prefect_aws_blocks_given_by_name(
    emulator_factory, use_emulator, sample_images, moto_server, s3_client, s3_bucket, monkeypatch
):
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from prefect_nanobanana.flows import edit_and_archive

    use_emulator(emulator_factory(time_scale=TIME_SCALE))
    credentials = AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=moto_server),
    )
    credentials.save("test-moto-credentials", overwrite=True)
    S3Bucket(bucket_name=s3_bucket, bucket_folder="team", credentials=credentials).save(
        "test-moto-bucket", overwrite=True
    )
    # Only the blocks know where S3 is: the default chain would reach nowhere.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    result = edit_and_archive(
        prompt="blocks",
        images=[str(sample_images / "a.png")],
        archive_uri="s3-bucket://test-moto-bucket/edited",
        staging_uri=f"s3://{s3_bucket}/staging",
        aws_credentials="test-moto-credentials",
    )
    assert result.output_locations[0].startswith(f"s3://{s3_bucket}/team/edited/")
    key = result.metadata_location.removeprefix(f"s3://{s3_bucket}/")
    assert s3_client.head_object(Bucket=s3_bucket, Key=key)["ContentLength"] > 0


async def test_a_row_whose_second_output_cannot_be_fetched_lists_the_first_as_kept(
    emulator_factory, use_emulator, sample_images, loopback_store, tmp_path, monkeypatch
):
    from prefect_nanobanana.flows import batch_edit

    monkeypatch.setenv("NANOBANANA_STAGING_TOKEN", loopback_store.upload_token)
    # Output 0 is fetched (call 1); output 1 fails on every try (calls 2-5).
    faults = FaultPlan([Fault("server_error", endpoint="files", calls=[2, 3, 4, 5])])
    emulator = use_emulator(emulator_factory(faults=faults))
    archive = tmp_path / "archive"
    options = {
        "jobs": [{"id": "pair", "prompt": "two", "images": [str(sample_images / "a.png")]}],
        "archive_uri": str(archive),
        "staging_uri": loopback_store.base_url,
        "num_images": 2,
        "allow_partial": True,
        "concurrency_limit_name": "test-partial-archive",
    }
    result = await batch_edit(**options)
    (row,) = result.rows
    assert row.status == "failed" and "1 of 2 outputs could not be archived" in row.error
    assert len(row.output_locations) == 1 and Path(row.output_locations[0]).is_file()
    manifest_row = json.loads(Path(result.results_manifest).read_text())
    assert manifest_row["output_locations"] == row.output_locations
    # A rerun archives what is missing from the same request: nothing is paid again.
    again = await batch_edit(**options)
    assert again.rows[0].status == "adopted" and len(again.rows[0].output_locations) == 2
    assert emulator.stats.submits_accepted == 1


def test_local_images_without_staging_go_inline_through_the_pipeline(
    emulator_factory, use_emulator, sample_images, tmp_path
):
    from prefect_nanobanana.flows import edit_and_archive

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    result = edit_and_archive(
        prompt="add snow",
        images=[str(sample_images / "a.png")],
        archive_uri=str(tmp_path / "archive"),
    )
    (sent,) = emulator.job(result.request_id).image_urls
    assert sent.startswith("data:image/png;base64,")
    metadata = json.loads(Path(result.metadata_location).read_text())
    assert metadata["sources"][0].startswith("inline:a.png sha256=")
    assert "base64" not in _all_text(tmp_path / "archive")


async def test_a_batch_without_staging_sends_local_images_inline_and_never_pays_for_a_dead_url(
    emulator_factory, use_emulator, sample_images, image_server, tmp_path
):
    from prefect_nanobanana.flows import batch_edit

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    jobs = [
        {"id": "local", "prompt": "add snow", "images": [str(sample_images / "a.png")]},
        {"id": "pair", "prompt": "add rain", "images": [str(sample_images), "url"]},
        {"id": "dead", "prompt": "add fog", "images": [image_server.url_for("nope.png")]},
        {"id": "url", "prompt": "add sun", "images": [image_server.url_for("wide.png")]},
    ]
    jobs[1]["images"][1] = image_server.url_for("tall.jpg")
    result = await batch_edit(
        jobs=jobs,
        archive_uri=str(tmp_path / "archive"),
        concurrency_limit_name="test-batch-inline",
        allow_partial=True,
    )
    assert [row.status for row in result.rows] == ["archived", "archived", "failed", "archived"]
    assert "nope.png: HTTP 404" in result.rows[2].error and result.rows[2].request_id is None
    assert emulator.stats.submits_received == 3  # the dead URL was never paid for
    sent = {row.id: emulator.job(row.request_id).image_urls for row in result.rows[:2]}
    assert sent["local"][0].startswith("data:image/png;base64,")
    assert [url.split(";")[0] for url in sent["pair"][:3]] == [
        "data:image/png",
        "data:image/jpeg",
        "data:image/webp",
    ]
    assert sent["pair"][3] == image_server.url_for("tall.jpg")
    text = _all_text(tmp_path / "archive")
    assert "inline:a.png sha256=" in text and "base64" not in text


async def test_a_batch_row_on_s3_costs_six_requests_and_is_staged_right_before_its_submit(
    emulator_factory, use_emulator, moto_server, s3_bucket, tmp_path, monkeypatch
):
    """A first run's row on S3: its input staged (one conditional PUT), the ledger's claim,
    request id with the archiving claim, and done mark (conditional writes that never
    read the record first), its output and metadata.json. The bucket is checked for the batch,
    not per row, and no row looks for an archive it cannot have. Planning uploads
    nothing: each row stages its input right before its submit, so later rows are
    staged while earlier ones are already paid for and running."""
    from urllib.parse import urlsplit

    import prefect_nanobanana.flows.batch.row as row_module
    from prefect_nanobanana.flows import batch_edit
    from prefect_nanobanana.flows.batch import BatchJob
    from prefect_nanobanana.storage.backends import make_s3_client

    rows, lanes = 12, 3
    emulator = use_emulator(emulator_factory(workers=lanes, time_scale=TIME_SCALE))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    jobs = []
    for row in range(rows):
        Image.new("RGB", (16, 16), (row * 20, 40, 90)).save(inputs / f"in-{row}.png")
        jobs.append(BatchJob(prompt=f"row {row}", images=[str(inputs / f"in-{row}.png")]))
    submits_seen_when_staged: list[int] = []
    real_stage = row_module.stage_row_images

    def stage_and_note(plan, staging):
        submits_seen_when_staged.append(emulator.stats.submits_accepted)
        real_stage(plan, staging)

    monkeypatch.setattr(row_module, "stage_row_images", stage_and_note)
    sent: list[tuple[str, str]] = []

    def note(request, **_):
        sent.append((request.method, urlsplit(request.url).path))

    s3 = make_s3_client()  # the process's shared client, which the flow uses too
    s3.meta.events.register("before-send.s3", note)
    try:
        result = await batch_edit(
            jobs=jobs,
            archive_uri=f"s3://{s3_bucket}/archive",
            staging_uri=f"s3://{s3_bucket}/staging",
            max_concurrency=lanes,
            concurrency_limit_name="test-s3-requests",
            preview_rows=0,
        )
    finally:
        s3.meta.events.unregister("before-send.s3", note)
    assert result.archived == rows, [row.error for row in result.rows]

    def count(method: str, part: str) -> int:
        return sum(1 for sent_method, path in sent if sent_method == method and part in path)

    assert count("GET", "/_ledger/") == 0, sent
    assert count("PUT", "/_ledger/") == 3 * rows
    assert count("PUT", "/staging/") == rows
    assert count("HEAD", "/staging/") == 0
    assert count("PUT", "/archive/20") == 2 * rows  # output and metadata.json, dated folders
    assert count("GET", "/archive/20") == 0  # no look for an earlier archive
    bucket_checks = sum(1 for method, path in sent if (method, path) == ("HEAD", f"/{s3_bucket}"))
    assert bucket_checks <= 3  # for the batch (planning's two, the results'), not one a row
    # The rest is the batch's, not the rows': the bucket checks, the learned run times
    # (read at the start, read and written at the end) and the results manifest.
    batch_requests = [
        (method, path)
        for method, path in sent
        if "/_ledger/" not in path and "/staging/" not in path and "/archive/20" not in path
    ]
    assert len(batch_requests) <= 8, batch_requests
    assert len(sent) == 6 * rows + len(batch_requests)
    assert len(submits_seen_when_staged) == rows
    assert submits_seen_when_staged[0] == 0
    assert max(submits_seen_when_staged) >= lanes, submits_seen_when_staged


async def test_the_report_previews_outputs_from_archiving_without_reading_them_back(
    emulator_factory, use_emulator, moto_server, s3_bucket, tmp_path, monkeypatch
):
    """The rows the report previews make their thumbnails while archiving, from the
    fetched file: the report neither HEADs nor GETs those outputs on S3 again (20
    full-size downloads a batch before), and still shows every one."""
    from urllib.parse import urlsplit

    import prefect_nanobanana.flows.batch.report as report_module
    from prefect_nanobanana.flows import batch_edit
    from prefect_nanobanana.flows.batch import BatchJob
    from prefect_nanobanana.storage.backends import make_s3_client

    rows, previewed = 3, 2
    use_emulator(emulator_factory(workers=rows, time_scale=TIME_SCALE))
    jobs = []
    for row in range(rows):
        Image.new("RGB", (16, 16), (row * 60, 40, 90)).save(tmp_path / f"in-{row}.png")
        jobs.append(BatchJob(prompt=f"row {row}", images=[str(tmp_path / f"in-{row}.png")]))
    reports: list[str] = []
    real_report = report_module._report_markdown

    def keep_report(*args, **kwargs):
        reports.append(real_report(*args, **kwargs))
        return reports[-1]

    monkeypatch.setattr(report_module, "_report_markdown", keep_report)
    sent: list[tuple[str, str]] = []

    def note(request, **_):
        sent.append((request.method, urlsplit(request.url).path))

    s3 = make_s3_client()
    s3.meta.events.register("before-send.s3", note)
    try:
        result = await batch_edit(
            jobs=jobs,
            archive_uri=f"s3://{s3_bucket}/archive",
            max_concurrency=rows,
            concurrency_limit_name="test-s3-previews",
            preview_rows=previewed,
        )
    finally:
        s3.meta.events.unregister("before-send.s3", note)
    assert result.archived == rows, [row.error for row in result.rows]
    reads = [(method, path) for method, path in sent if method in ("GET", "HEAD")]
    assert not [read for read in reads if "/archive/20" in read[1]], reads
    (report,) = reports
    # Each previewed row: its input (a local file) and its output, as thumbnails.
    assert report.count("data:image/jpeg;base64,") == 2 * previewed
    assert all(row.output_thumbnails for row in result.rows[:previewed])
    assert not any(row.output_thumbnails for row in result.rows[previewed:])
    assert "output_thumbnails" not in result.rows[0].model_dump()


async def test_a_row_whose_input_is_gone_at_its_submit_fails_alone_and_unpaid(
    emulator_factory, use_emulator, moto_server, s3_bucket, sample_images, tmp_path, monkeypatch
):
    """Planning checked the file; it was deleted before its row's turn: that row fails,
    named, with nothing claimed or paid; the others are archived."""
    import prefect_nanobanana.flows.batch.row as row_module
    from prefect_nanobanana.flows import batch_edit
    from prefect_nanobanana.flows.batch import BatchJob

    emulator = use_emulator(emulator_factory(workers=2, time_scale=TIME_SCALE))
    doomed = tmp_path / "doomed.png"
    doomed.write_bytes((sample_images / "a.png").read_bytes())
    real_stage = row_module.stage_row_images

    def delete_then_stage(plan, staging):
        if plan.job.id == "doomed":
            doomed.unlink()
        real_stage(plan, staging)

    monkeypatch.setattr(row_module, "stage_row_images", delete_then_stage)
    result = await batch_edit(
        jobs=[
            BatchJob(prompt="kept", images=[str(sample_images / "b.jpg")], id="kept"),
            BatchJob(prompt="gone", images=[str(doomed)], id="doomed"),
        ],
        archive_uri=f"s3://{s3_bucket}/archive",
        staging_uri=f"s3://{s3_bucket}/staging",
        concurrency_limit_name="test-input-gone",
        allow_partial=True,
    )
    by_id = {row.id: row for row in result.rows}
    assert by_id["kept"].status == "archived"
    assert by_id["doomed"].status == "failed" and by_id["doomed"].request_id is None
    assert "row 2" in by_id["doomed"].error and "file not found" in by_id["doomed"].error
    assert emulator.stats.submits_accepted == 1


def test_planning_asks_each_https_input_once_however_many_rows_use_it(image_server, tmp_path):
    """The pixel cap and the image probe of an http(s) input are asked once per URL:
    a batch of 50 rows of one picture read its header 50 times (7 s of planning)."""
    from prefect_nanobanana.flows.batch import BatchJob
    from prefect_nanobanana.flows.batch.plan import _plan_rows, _stage_rows
    from prefect_nanobanana.storage import Ledger
    from prefect_nanobanana.tasks.storage import resolve_location

    url = image_server.url_for("wide.png")
    jobs = [BatchJob(prompt="p", images=[url], id=f"row-{row}") for row in range(50)]
    defaults = {"aspect_ratio": "auto", "resolution": "1K", "output_format": "png", "num_images": 1}
    plans = _plan_rows(jobs, defaults, Ledger(str(tmp_path / "archive")))
    before = len(image_server.requested_paths)
    _stage_rows(plans, resolve_location(None, None), dry_run=False)
    assert not [plan.error for plan in plans if plan.error]
    # A ranged GET of its header by the first row's check of the staging target, one by
    # the check each URL gets once (HEAD, the probe's first look, is not logged): not 50.
    assert image_server.requested_paths[before:] == ["/wide.png", "/wide.png"]
