"""deployments/prefect.yaml deployed and run for real, as an operator would.

The stack (`prefect server start`, the process pool, two workers, `prefect deploy`,
the emulator and a loopback staging store) comes from `tests/fixtures/deployments.py`
and is shared with the browser tests. The workers take one flow run at a time
(`--limit 1`), so two chunks started together must land on both workers: that is
how the scale-out test sees them shared.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.fixtures.deployments import (
    CHUNK,
    INCOMING,
    NIGHTLY,
    POOL,
    REPO,
    RUN_SECONDS,
    SINGLE_EDIT,
    WORKERS,
    Stack,
)


def _deployment(name: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def _metadata(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(folder.rglob("metadata.json"))]


def test_deployments_carry_the_schedule_form_and_pull_step(stack: Stack) -> None:
    nightly = _deployment(NIGHTLY)
    (schedule,) = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "UTC")
    assert schedule.active
    assert nightly.parameters == {
        "manifest_uri": str(stack.manifest),
        "archive_uri": str(stack.archive),
        "staging_uri": stack.store.base_url,
        "max_concurrency": 8,
        "allow_partial": False,
        "chunk_size": 500,
        "chunk_deployment": CHUNK,
    }
    single = _deployment(SINGLE_EDIT)
    assert single.schedules == []
    form = single.parameter_openapi_schema
    assert form["required"] == ["prompt", "images"]
    assert form["properties"]["prompt"]["type"] == "string"
    # The form refuses what the run would: an empty prompt, a wait of no time; and so
    # does `prefect deploy` an empty archive (an unset variable in prefect.yaml).
    assert form["properties"]["prompt"]["minLength"] == 1
    assert form["properties"]["timeout_seconds"]["exclusiveMinimum"] == 0
    assert form["properties"]["archive_uri"]["minLength"] == 1
    nightly_form = nightly.parameter_openapi_schema["properties"]
    assert nightly_form["archive_uri"]["minLength"] == 1
    assert {"type": "string", "minLength": 1} in nightly_form["manifest_uri"]["anyOf"]
    assert form["properties"]["images"]["type"] == "array"
    assert form["properties"]["images"]["items"] == {"type": "string"}
    for name, choices in {
        "aspect_ratio": {"auto", "16:9", "1:1", "9:16"},
        "resolution": {"1K", "2K", "4K"},
        "output_format": {"jpeg", "png", "webp"},
    }.items():
        assert choices <= set(form["properties"][name]["enum"]), name
    chunk = _deployment(CHUNK)
    assert chunk.work_queue_name == "chunks" and chunk.schedules == []
    for deployment in (nightly, single, chunk):
        assert deployment.work_pool_name == POOL
        # The clone's own path, recorded when deploying: no machine's path in the file.
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]


async def test_incoming_folder_runs_hourly_and_pays_only_for_new_images(stack: Stack) -> None:
    """The `incoming-folder` deployment: hourly over NANOBANANA_INCOMING_URI; a run on a
    worker edits each image once, the next run finds them all archived and pays nothing."""
    from prefect.deployments import run_deployment

    incoming = _deployment(INCOMING)
    (schedule,) = incoming.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 * * * *", "UTC")
    assert schedule.active
    assert incoming.parameters["images_uri"] == str(stack.images)
    assert incoming.parameters["prompt"] == "put it on a white background"
    assert incoming.parameters["archive_uri"] == str(stack.archive)
    assert incoming.work_pool_name == POOL
    images = sorted(path.name for path in stack.images.iterdir())

    def manifest_of(flow_run: Any) -> list[dict[str, Any]]:
        (found,) = (stack.archive / "_results").glob(f"batch-*-{flow_run.id}.jsonl")
        return [json.loads(line) for line in found.read_text().splitlines()]

    before = stack.emulator.stats.submits_accepted
    first = await run_deployment(
        INCOMING, timeout=RUN_SECONDS, poll_interval=0.25, as_subflow=False
    )
    assert first.state and first.state.is_completed(), (first.state, stack.log_tail())
    rows = manifest_of(first)
    assert sorted(row["id"] for row in rows) == images
    assert all(row["new"] and row["status"] == "archived" for row in rows)
    assert stack.emulator.stats.submits_accepted == before + len(images)
    again = await run_deployment(
        INCOMING, timeout=RUN_SECONDS, poll_interval=0.25, as_subflow=False
    )
    assert again.state and again.state.is_completed(), (again.state, stack.log_tail())
    assert {(row["new"], row["status"]) for row in manifest_of(again)} == {(False, "skipped")}
    assert stack.emulator.stats.submits_accepted == before + len(images)


async def test_single_edit_deployment_runs_on_a_worker(stack: Stack) -> None:
    from prefect.deployments import run_deployment

    submits_before = stack.emulator.stats.submits_accepted
    flow_run = await run_deployment(
        SINGLE_EDIT,
        parameters={
            "prompt": "make it look like a watercolour",
            "images": [str(stack.images / "a.png"), str(stack.images / "b.jpg")],
            "aspect_ratio": "4:3",
            "output_format": "jpeg",
            "num_images": 2,
        },
        timeout=RUN_SECONDS,
        poll_interval=0.25,
        as_subflow=False,
    )
    assert flow_run.state and flow_run.state.is_completed(), (flow_run.state, stack.log_tail())
    assert flow_run.labels["prefect.worker.name"] in WORKERS
    assert stack.emulator.stats.submits_accepted == submits_before + 1
    # Archived under the deployment's default archive_uri, staged through its staging_uri.
    (metadata,) = [m for m in _metadata(stack.archive) if m["flow_run_id"] == str(flow_run.id)]
    assert metadata["prompt"] == "make it look like a watercolour"
    assert metadata["parameters"]["aspect_ratio"] == "4:3"
    outputs = sorted((stack.archive).rglob(f"{metadata['request_id']}/*.jp*g"))
    assert len(outputs) == 2
    assert all(Image.open(path).format == "JPEG" for path in outputs)
    fetched = stack.emulator.stats.fetched_input_urls
    assert sum(url.startswith(stack.store.base_url) for url in fetched) >= 2


async def test_nightly_batch_deployment_runs_its_manifest(stack: Stack) -> None:
    from prefect.deployments import run_deployment

    submits_before = stack.emulator.stats.submits_accepted
    flow_run = await run_deployment(
        NIGHTLY, timeout=RUN_SECONDS, poll_interval=0.25, as_subflow=False
    )
    assert flow_run.state and flow_run.state.is_completed(), (flow_run.state, stack.log_tail())
    assert stack.emulator.stats.submits_accepted == submits_before + 3
    nightly = [m for m in _metadata(stack.archive) if m["flow_run_id"] == str(flow_run.id)]
    assert sorted(m["row_id"] for m in nightly) == ["night-0", "night-1", "night-2"]


async def test_batch_scales_out_in_chunks_over_both_workers(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from prefect_nanobanana.client import BudgetExceededError
    from prefect_nanobanana.flows import batch_edit
    from prefect_nanobanana.flows.batch import chunks

    monkeypatch.setattr(chunks, "CHUNK_POLL_SECONDS", 0.25)
    # The in-process rerun at the end reaches the emulator as the workers do.
    for name in ("RUNCOMFY_API_TOKEN", "RUNCOMFY_BASE_URL", "RUNCOMFY_POLL_TIME_SCALE"):
        monkeypatch.setenv(name, stack.env[name])
    monkeypatch.setenv("NANOBANANA_STAGING_TOKEN", stack.store.upload_token)
    names = ["a.png", "b.jpg", "c.webp"]
    jobs = [
        {
            "prompt": f"variation {i}",
            "images": [str(stack.images / names[i % 3])],
            # Rows without ids are told apart by position: the chunks must keep the parent's.
            **({"id": f"row-{i}"} if i % 2 else {}),
        }
        for i in range(10)
    ]
    limit = f"deploy-chunks-{uuid.uuid4().hex[:6]}"
    async with get_client() as client:
        # Sized for the fleet: both chunks' lanes (4 each) fit at once.
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=limit, limit=8)
        )
    archive = tmp_path / "archive"
    options = {
        "jobs": jobs,
        "archive_uri": str(archive),
        "staging_uri": stack.store.base_url,
        "max_concurrency": 4,
        "concurrency_limit_name": limit,
    }
    submits_before = stack.emulator.stats.submits_accepted
    planned = await batch_edit(**options, dry_run=True)
    assert planned.estimated_cost
    # A budget under the whole batch's estimate is refused before any chunk starts.
    with pytest.raises(BudgetExceededError, match="over the budget"):
        await batch_edit(
            **options,
            chunk_size=4,
            chunk_deployment=CHUNK,
            max_cost_usd=planned.estimated_cost / 2,
        )
    assert stack.emulator.stats.submits_accepted == submits_before
    budget = planned.estimated_cost * 1.5

    state = await batch_edit(
        **options,
        chunk_size=4,
        chunk_deployment=CHUNK,
        max_cost_usd=budget,
        return_state=True,
    )

    assert state.is_completed(), (state, stack.log_tail())
    result = await state.aresult()
    assert (result.archived, result.skipped, result.failed) == (10, 0, 0)
    assert [row.row for row in result.rows] == list(range(1, 11))
    assert [row.id for row in result.rows] == [job.get("id") for job in jobs]
    assert [row.prompt for row in result.rows] == [job["prompt"] for job in jobs]
    # Every row paid and archived exactly once, over all chunks.
    assert stack.emulator.stats.submits_accepted == submits_before + 10
    assert len(_metadata(archive)) == 10
    lines = Path(result.results_manifest).read_text().splitlines()
    assert [json.loads(line)["row"] for line in lines] == list(range(1, 11))

    async with get_client() as client:
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(
                    any_=[state.state_details.flow_run_id]
                )
            )
        )
    assert len(children) == 3
    assert all(child.state and child.state.is_completed() for child in children)
    assert sorted(len(child.parameters["jobs"]) for child in children) == [2, 4, 4]
    # The chunks draw from one budget, named after the parent run, kept beside the ledger.
    shared = {child.parameters["shared_budget_name"] for child in children}
    assert shared == {f"batch-{state.state_details.flow_run_id}"}
    assert {child.parameters["max_cost_usd"] for child in children} == {budget}
    from prefect_nanobanana.storage import SharedBudget

    (name,) = shared
    total = SharedBudget(archive, name, budget).read()
    assert total.in_flight == 0 and total.settled == 10
    assert total.spent_usd == pytest.approx(result.paid_cost)
    workers = {child.labels["prefect.worker.name"] for child in children}
    assert workers == set(WORKERS), [(c.name, c.labels, c.infrastructure_pid) for c in children]
    assert len({child.infrastructure_pid for child in children}) == 3

    # The same batch unchunked: every row is found in the ledger the chunks kept.
    again = await batch_edit(**options)
    assert (again.archived, again.skipped, again.failed) == (0, 10, 0)
    assert stack.emulator.stats.submits_accepted == submits_before + 10


async def test_three_runs_one_chunked_over_the_workers_share_one_daily_cap(
    stack: Stack, tmp_path: Path, monkeypatch
) -> None:
    """Three runs at once on one archive under one `daily_budget_usd`, billed at twice the
    listed price; one is chunked, its chunks run by the workers (other processes). Together
    they stay within the cap plus the estimates in flight, hold the rest back
    `over_budget`, and a fourth run the same day submits nothing."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from prefect_nanobanana import RunComfyCredentials
    from prefect_nanobanana.emulator import EmulatorConfig, EmulatorServer
    from prefect_nanobanana.flows import batch_edit
    from prefect_nanobanana.flows.batch import chunks
    from prefect_nanobanana.storage import daily_totals

    monkeypatch.setattr(chunks, "CHUNK_POLL_SECONDS", 0.25)
    price, lanes, rows = 0.15, 2, 6
    cap = 8 * price
    images = tmp_path / "images"
    images.mkdir()
    for index in range(rows):
        Image.new("RGB", (24, 16), (40 * index, 80, 160)).save(images / f"{index}.png")
    archive = tmp_path / "archive"
    config = EmulatorConfig(
        api_tokens=(TOKEN_FOR_BLOCK,), workers=8, time_scale=0.005, bill_multiplier=2.0
    )
    with EmulatorServer(config) as emulator:
        # The chunks load the credentials by name on the workers: this emulator, not theirs.
        block = f"daily-cap-{uuid.uuid4().hex[:6]}"
        await RunComfyCredentials(api_token=TOKEN_FOR_BLOCK, base_url=emulator.base_url).asave(
            block
        )
        limit = f"daily-cap-{uuid.uuid4().hex[:6]}"
        async with get_client() as client:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=limit, limit=16)
            )

        def run(name: str, **chunking: Any) -> Any:
            return batch_edit(
                images_uri=str(images),
                prompt=f"edit for {name}",  # each run its own edits: nothing adopted
                archive_uri=str(archive),
                daily_budget_usd=cap,
                max_concurrency=lanes,
                concurrency_limit_name=limit,
                credentials=block,
                allow_partial=True,
                preview_rows=0,
                return_state=True,
                **chunking,
            )

        states = await asyncio.gather(
            run("nightly", chunk_size=3, chunk_deployment=CHUNK), run("alice"), run("bob")
        )
        assert all(state.is_completed() for state in states), (states, stack.log_tail())
        results = [await state.aresult() for state in states]
        in_flight_at_most = (2 + 1 + 1) * lanes  # two chunks, two runs, `lanes` rows each
        billed = sum(result.paid_cost for result in results)
        assert emulator.stats.spent_usd == pytest.approx(billed)
        assert billed <= cap + in_flight_at_most * price + 1e-9, billed
        held = [row for result in results for row in result.rows if row.status == "over_budget"]
        assert held and all("daily_budget_usd" in (row.error or "") for row in held)
        assert sum(result.archived + result.over_budget for result in results) == 3 * rows
        (total,) = daily_totals(archive).values()
        assert total.in_flight == 0 and total.spent_usd == pytest.approx(billed)
        async with get_client() as client:
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(
                        any_=[states[0].state_details.flow_run_id]
                    )
                )
            )
        assert len(children) == 2
        assert {child.labels["prefect.worker.name"] for child in children} <= set(WORKERS)

        paid = emulator.stats.submits_accepted
        fourth = await (await run("carol")).aresult()
        assert emulator.stats.submits_accepted == paid  # nothing submitted
        assert fourth.over_budget == rows and fourth.paid_cost == 0


TOKEN_FOR_BLOCK = "daily-cap-token"


def test_chunk_rows_come_back_in_the_parents_numbering(tmp_path: Path) -> None:
    from prefect_nanobanana.flows import BatchJob, BatchRowResult
    from prefect_nanobanana.flows.batch.chunks import _in_parent_numbering, _read_chunk_rows

    chunk = [
        BatchJob(prompt="p5", images=["a.png"]),
        BatchJob(prompt="p6", images=["https://x/b.png?X-Amz-Signature=s"], id="six"),
    ]
    # The child saw the id-less row under its parent position "5", as row 1 of its chunk.
    reported = [BatchRowResult(row=1, id="5", status="archived", prompt="p5")]
    assert _read_chunk_rows(str(tmp_path / "never-written.jsonl"), None) == []
    rows = _in_parent_numbering(chunk, 4, reported, "chunk 2 ended Crashed")
    assert [(row.row, row.id, row.status) for row in rows] == [
        (5, None, "archived"),
        (6, "six", "failed"),
    ]
    assert rows[1].error == "chunk 2 ended Crashed"
    assert rows[1].sources == ["https://x/b.png"]


async def test_chunks_too_large_for_prefect_are_refused_before_any_starts(monkeypatch) -> None:
    """Prefect refuses a flow run whose parameters pass 512 KiB. A chunk that large used
    to fail only at its own `run_deployment`, after other chunks had started and paid:
    now every chunk's parameters are sized first, and the error names a size that fits."""
    import logging

    import prefect_nanobanana.flows.batch.chunks as chunks_module
    from prefect_nanobanana.flows.batch.models import BatchJob

    started: list[dict] = []

    async def run_deployment(**kwargs):
        started.append(kwargs)
        raise AssertionError("no chunk may start")

    monkeypatch.setattr(chunks_module, "run_deployment", run_deployment)
    monkeypatch.setattr(chunks_module, "get_run_logger", lambda: logging.getLogger("test"))
    jobs = [BatchJob(prompt="p" * 2_000, images=[f"in-{row}.png"]) for row in range(600)]
    with pytest.raises(ValueError, match=r"chunk_size=300 gives .* or less") as refused:
        await chunks_module.run_in_chunks(
            jobs, 300, "batch-edit/chunk", {}, "/tmp/results.jsonl", None
        )
    assert started == []
    fits = int(str(refused.value).split("use chunk_size=")[1].split()[0])
    assert 100 < fits < 300
    rows = [job.model_dump(exclude_none=True) for job in jobs]
    chunks_module.check_chunk_parameters([{"jobs": rows[:fits]}], fits)  # fits: no error


async def test_chunk_options_go_together(stack: Stack) -> None:
    from prefect_nanobanana.flows import batch_edit

    with pytest.raises(ValueError, match="chunk_deployment"):
        await batch_edit(jobs=[{"prompt": "p", "images": ["a.png"]}], chunk_size=2)
