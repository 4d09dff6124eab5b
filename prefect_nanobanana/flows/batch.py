"""The batch flow: many edits from a list or a manifest, nothing paid twice, nothing lost.

The way of one row: plan (validate, look it up in the ledger) → stage its images
→ then, in one task run `row-N`, submit (the ledger records the request id at
once) → wait → archive → mark archived. Rows run concurrently in one event loop,
sharing one API client, so a 429 slows the whole batch and the poll schedule
learns run times from the rows already finished. Requests in flight are capped
by a Prefect global concurrency limit that all batch runs share, so several flow
runs stay within one API quota: the run works its rows through at most
`max_concurrency` lanes and takes one slot of the limit per lane, in one
acquisition, for as long as it has rows. (Not a slot per row: each acquisition
is a write on the Prefect server, and thousands of them, serialised by Prefect's
client, made the server rather than the API the bottleneck.)

A rerun of the same batch (same manifest and archive) skips rows already
archived and adopts requests already submitted, so a crashed batch resumes
without paying twice. Rows are told apart by their `id`, else by their position:
give rows ids when a manifest may be reordered between runs.

Scale-out: with `chunk_size` and `chunk_deployment`, the run splits its rows into
chunks and runs each as a child run of a deployment of this flow, so the chunks
spread over the workers of that deployment's pool; the parent gathers their rows.
The ledger and the global concurrency limit are what make this safe: children skip
rows already archived, and together they stay within one API quota.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import datetime
from functools import partial
from typing import Annotated, Any, Literal
from uuid import uuid4

from anyio import to_thread
from prefect import flow, task
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.asyncio import concurrency
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_run_logger
from pydantic import BaseModel, Field, ValidationError

from .. import observe
from ..client import (
    NANO_BANANA_EDIT_MODEL_ID,
    AspectRatio,
    AsyncRunComfyClient,
    JobCancelledError,
    JobFailedError,
    NanoBananaEditInput,
    OutputFormat,
    Resolution,
    RunComfyError,
    SubmitOutcomeUnknownError,
)
from ..credentials import DEFAULT_CREDENTIALS_BLOCK, RunComfyCredentials, aresolve_credentials
from ..storage import (
    DEFAULT_ARCHIVE_URI,
    Ledger,
    LedgerEntry,
    StorageError,
    job_key_for,
    read_manifest,
    redact_text,
    stage_assets,
    strip_signature,
    write_results_manifest,
)
from ..storage.backends import open_object
from ..storage_tasks import SIGNED_RESULT_OPTIONS, aarchive_request, resolve_location
from ..tasks import TASK_OPTIONS, retry_if_transient

DEFAULT_CONCURRENCY_LIMIT = "runcomfy-nano-banana"
RESULTS_FOLDER = "_results"
# A crashed run's slots come back when their lease runs out; the holder renews it.
LEASE_SECONDS = 60.0
# How often the parent of a chunked batch asks the server whether a chunk's run ended.
CHUNK_POLL_SECONDS = 5.0

RowStatus = Literal["archived", "skipped", "failed"]

# A caller in the same process (the CLI's progress bar) hears (rows done, rows in all).
ROW_PROGRESS: ContextVar[Callable[[int, int], None] | None] = ContextVar(
    "nanobanana_row_progress", default=None
)


class BatchJob(BaseModel):
    """One edit of a batch; unset options take the batch's defaults."""

    prompt: str = Field(description="The edit instruction.")
    images: list[str] = Field(
        min_length=1, description="Local files, folders, globs, s3:// or https:// URLs."
    )
    aspect_ratio: AspectRatio | None = Field(default=None, description="Output aspect ratio.")
    resolution: Resolution | None = Field(default=None, description="Output resolution.")
    output_format: OutputFormat | None = Field(default=None, description="Output format.")
    num_images: int | None = Field(default=None, ge=1, le=4, description="Images to produce.")
    id: str | None = Field(default=None, description="A stable id, so reruns find the row.")


class BatchRowResult(BaseModel):
    """How one row ended; one line of the results manifest."""

    row: int = Field(description="1-based position of the row in the batch.")
    id: str | None = None
    status: RowStatus
    request_id: str | None = None
    prompt: str
    sources: list[str] = Field(default_factory=list, description="Inputs, signatures removed.")
    output_locations: list[str] = Field(default_factory=list)
    metadata_location: str | None = None
    cost: float | None = None
    seconds: float | None = None
    error: str | None = None


class BatchEditResult(BaseModel):
    """What a batch did, for the next step of an ETL: no bucket listing needed."""

    rows: list[BatchRowResult]
    results_manifest: str = Field(description="Where the JSONL results manifest was written.")
    archived: int
    skipped: int
    failed: int
    total_cost: float

    @property
    def output_locations(self) -> list[str]:
        return [location for row in self.rows for location in row.output_locations]


class BatchFailedError(RuntimeError):
    """Some rows failed (and `allow_partial` was off); `result` has every row."""

    def __init__(self, message: str, result: BatchEditResult | None = None) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect pickles a failed flow's exception; keep the rows with it.
        return (type(self), (str(self), self.result))


class _RowPlan(BaseModel):
    """A row made ready: validated edit options, its job key, what the ledger knows."""

    row: int
    job: BatchJob
    options: dict[str, Any]
    job_key: str | None = None
    entry: LedgerEntry | None = None
    image_urls: list[str] = Field(default_factory=list)
    error: str | None = None

    def result(self, status: RowStatus, **facts: Any) -> BatchRowResult:
        return BatchRowResult(
            row=self.row,
            id=self.job.id,
            status=status,
            prompt=self.job.prompt,
            sources=[strip_signature(source) for source in self.job.images],
            **facts,
        )


class _Batch:
    """What every row of one batch run shares."""

    def __init__(
        self,
        client: AsyncRunComfyClient,
        ledger: Ledger,
        archive_uri: str,
        aws_credentials: str | None,
        limit_name: str,
        max_concurrency: int,
        timeout_seconds: float,
        total: int,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.archive_uri = archive_uri
        self.aws_credentials = aws_credentials
        self.limit_name = limit_name
        self.lanes = max_concurrency
        self.timeout_seconds = timeout_seconds
        self.total = total
        self.done = 0
        self.percent_shown = 0
        self.percent_sent = 0
        self.flow_run_id = observe.current_flow_run_id()
        # Row → its request, as soon as the request exists: a failed row still names it.
        self.request_ids: dict[int, str] = {}
        # Job keys this run has tried to submit: their retries must ask the ledger again.
        self.submits_tried: set[str] = set()


# --------------------------------------------------------------------------- planning


def _plan_rows(jobs: list[BatchJob], defaults: dict[str, Any], ledger: Ledger) -> list[_RowPlan]:
    """Validate every row and look it up in the ledger, before anything is paid."""
    plans = []
    for row, job in enumerate(jobs, start=1):
        options = {
            name: value if value is not None else defaults[name]
            for name, value in job.model_dump(include=set(defaults)).items()
        }
        plan = _RowPlan(row=row, job=job, options=options)
        try:
            NanoBananaEditInput(prompt=job.prompt, image_urls=job.images, **options)
            plan.job_key = job_key_for(job.prompt, job.images, options, row_id=job.id or str(row))
            plan.entry = ledger.lookup(plan.job_key)
        except (ValidationError, StorageError, ValueError) as error:
            plan.error = f"row {row} is invalid: {redact_text(str(error))}"
        plans.append(plan)
    return plans


def _stage_rows(
    plans: list[_RowPlan], staging_uri: str | None, aws_credentials: str | None
) -> None:
    """Stage the images of rows that still need a submit; a bad image fails only its row."""
    location, s3_client = resolve_location(staging_uri, aws_credentials)
    for plan in plans:
        if plan.error or (plan.entry and plan.entry.status in ("submitted", "archived")):
            continue
        try:
            staged = stage_assets(plan.job.images, location, s3_client=s3_client)
            plan.image_urls = [asset.url for asset in staged]
            NanoBananaEditInput(prompt=plan.job.prompt, image_urls=plan.image_urls, **plan.options)
        except (StorageError, ValidationError, ValueError) as error:
            plan.error = f"row {plan.row}: {redact_text(str(error))}"


@task(name="plan-batch", **SIGNED_RESULT_OPTIONS)
async def aplan_batch(
    jobs: list[BatchJob],
    defaults: dict[str, Any],
    archive_uri: str,
    staging_uri: str | None,
    aws_credentials: str | None,
) -> list[_RowPlan]:
    """Validate rows, find what earlier runs did, stage the inputs still needed."""
    location, s3_client = resolve_location(archive_uri, aws_credentials)
    ledger = Ledger(location, s3_client=s3_client)
    await to_thread.run_sync(ledger.check)
    plans = await to_thread.run_sync(_plan_rows, jobs, defaults, ledger)
    await to_thread.run_sync(_stage_rows, plans, staging_uri, aws_credentials)
    return plans


@task(name="read-manifest", cache_policy=NO_CACHE)
async def aread_batch_manifest(
    manifest_uri: str, aws_credentials: str | None = None
) -> list[BatchJob]:
    """The rows of a JSONL or CSV manifest, local or on S3."""
    location, s3_client = resolve_location(manifest_uri, aws_credentials)
    rows = await to_thread.run_sync(partial(read_manifest, location, s3_client=s3_client))
    return [BatchJob.model_validate({k: v for k, v in row.items() if k != "line"}) for row in rows]


# --------------------------------------------------------------------------- one row


def _unknown_outcome(job_key: str, location: str) -> SubmitOutcomeUnknownError:
    return SubmitOutcomeUnknownError(
        f"an earlier run stopped while submitting job {job_key}, so RunComfy may have accepted "
        "(and billed) it. It was NOT submitted again. Check your RunComfy request history; to "
        f"submit anew, delete the ledger entry {location}"
    )


async def _request_of(
    plan: _RowPlan, batch: _Batch
) -> tuple[str, asyncio.Future[LedgerEntry] | None, datetime | None]:
    """The row's request: the one an earlier attempt or run recorded, else one submit.

    At most once: a marker goes to the ledger before the submit, the request id right
    after. That second write is returned still running, so the caller can start
    polling at once (a late first poll makes the schedule expect the job's end too
    late) and must await it before anything else touches the row's ledger entry.
    A recorded request comes with when it was submitted, for the wait that resumes
    it. The planning step looked the row up already; only a retry of the row's task
    (which may follow a submit that went through) asks the ledger again.
    """
    assert plan.job_key is not None
    ledger, job_key = batch.ledger, plan.job_key
    entry = plan.entry
    if job_key in batch.submits_tried:
        entry = await to_thread.run_sync(ledger.lookup, job_key)
    if entry is not None and entry.status in ("submitted", "archived") and entry.request_id:
        batch.request_ids[plan.row] = entry.request_id
        return entry.request_id, None, entry.submitted_at
    if entry is not None and entry.status == "submitting":
        raise _unknown_outcome(job_key, ledger.location(job_key))
    edit = NanoBananaEditInput(prompt=plan.job.prompt, image_urls=plan.image_urls, **plan.options)
    batch.submits_tried.add(job_key)
    await to_thread.run_sync(ledger.record_submitting, job_key)
    try:
        handle = await batch.client.submit_edit(edit)
    except SubmitOutcomeUnknownError:
        raise  # the marker stays: a rerun must not submit blindly
    except RunComfyError as error:
        await to_thread.run_sync(ledger.mark_failed, job_key, error)
        raise
    # Kept before the ledger write, so an issued id is reported even if that write fails.
    batch.request_ids[plan.row] = handle.request_id
    get_run_logger().debug("Row %d submitted as RunComfy request %s", plan.row, handle.request_id)
    observe.emit_request_event(
        observe.EVENT_SUBMITTED,
        handle.request_id,
        payload={"job_key": job_key, "row": plan.row, "model_id": NANO_BANANA_EDIT_MODEL_ID},
    )
    recording = asyncio.ensure_future(
        to_thread.run_sync(
            partial(
                ledger.record_submit,
                job_key,
                handle.request_id,
                row=plan.row,
                model_id=NANO_BANANA_EDIT_MODEL_ID,
                parameters=edit.model_dump(exclude={"image_urls"}),
                sources=edit.image_urls,
                flow_run_id=str(batch.flow_run_id) if batch.flow_run_id else None,
            )
        )
    )
    return handle.request_id, recording, None


@task(
    name="edit-row",
    task_run_name="row-{plan.row}",
    retry_condition_fn=retry_if_transient,
    **TASK_OPTIONS,
)
async def aedit_batch_row(
    plan: _RowPlan, batch: _Batch, request_ended: asyncio.Event
) -> BatchRowResult:
    """One row in one task run: submit (at most once), wait, archive, mark archived.

    One task run per row rather than one per step, because the Prefect server
    records every task run's state changes as events, and at three task runs a row
    that bookkeeping, not the API, set the pace of a batch. A retry comes back here
    and resumes the request its first attempt recorded. `request_ended` is set once
    the request is over, so the row's lane can start the next row while this one
    archives: archiving is our I/O, not a request in flight.
    """
    request_id, recording, submitted_at = await _request_of(plan, batch)
    waiting = asyncio.ensure_future(
        batch.client.wait(
            request_id,
            batch.timeout_seconds,
            resolution=plan.options["resolution"],
            submitted_at=submitted_at,
        )
    )
    if recording is not None:
        try:
            await recording
        except BaseException:
            waiting.cancel()
            raise
    try:
        result = await waiting
    except (JobFailedError, JobCancelledError) as error:
        status = "cancelled" if isinstance(error, JobCancelledError) else "failed"
        observe.emit_request_event(
            observe.EVENT_FOR_STATUS[status],
            request_id,
            payload={"row": plan.row, "error": str(error)},
        )
        await to_thread.run_sync(batch.ledger.mark_failed, plan.job_key, error)
        raise
    request_ended.set()  # first: the lane's next submit is the batch's critical path
    observe.emit_request_event(
        observe.EVENT_COMPLETED,
        request_id,
        payload={"row": plan.row, "cost": result.cost, "outputs": len(result.output_urls)},
    )
    metadata = {
        "prompt": plan.job.prompt,
        "parameters": plan.options,
        "model_id": NANO_BANANA_EDIT_MODEL_ID,
        "sources": plan.job.images,
        "row": plan.row,
        "row_id": plan.job.id,
        "created_at": result.created_at,
        "finished_at": result.finished_at,
        "cost": result.cost,
        "flow_run_id": str(batch.flow_run_id) if batch.flow_run_id else None,
    }
    record = await aarchive_request.fn(
        request_id,
        result.output_urls,
        batch.archive_uri,
        metadata,
        result.created_at,
        batch.aws_credentials,
    )
    await to_thread.run_sync(
        batch.ledger.mark_archived, plan.job_key, record.metadata_location, record.output_locations
    )
    return plan.result(
        "archived",
        request_id=request_id,
        output_locations=record.output_locations,
        metadata_location=record.metadata_location,
        cost=result.cost,
    )


async def _run_row(plan: _RowPlan, batch: _Batch, request_ended: asyncio.Event) -> BatchRowResult:
    """The row's task, its failure turned into a failed row so the batch goes on."""
    started = time.monotonic()
    try:
        row = await aedit_batch_row(plan, batch, request_ended)
        return row.model_copy(update={"seconds": round(time.monotonic() - started, 3)})
    except Exception as error:
        request_id = batch.request_ids.get(plan.row) or getattr(error, "request_id", None)
        get_run_logger().error("Row %d failed (request %s): %s", plan.row, request_id, error)
        return plan.result(
            "failed",
            request_id=request_id,
            seconds=round(time.monotonic() - started, 3),
            error=redact_text(str(error)),
        )
    finally:
        request_ended.set()


# --------------------------------------------------------------------------- the flow


async def _ensure_concurrency_limit(name: str, limit: int) -> int:
    """The shared global concurrency limit's size, creating the limit if it is missing."""
    async with get_client() as prefect_client:
        try:
            existing = await prefect_client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            await prefect_client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit)
            )
            return limit
    if existing.limit != limit:
        get_run_logger().info(
            "Global concurrency limit %r allows %d requests in flight across all runs "
            "(this run asked for %d; the shared limit wins)",
            name,
            existing.limit,
            limit,
        )
    return existing.limit


def _settled_without_api(plan: _RowPlan, ledger: Ledger) -> BatchRowResult | None:
    """The outcome of a row that needs no request: invalid, done earlier, or unknowable."""
    if plan.error:
        return plan.result("failed", error=plan.error)
    if plan.entry is not None and plan.entry.status == "archived":
        return _skipped(plan)
    if plan.entry is not None and plan.entry.status == "submitting":
        assert plan.job_key is not None
        return plan.result(
            "failed", error=str(_unknown_outcome(plan.job_key, ledger.location(plan.job_key)))
        )
    return None


def _skipped(plan: _RowPlan) -> BatchRowResult:
    entry = plan.entry
    assert entry is not None
    return plan.result(
        "skipped",
        request_id=entry.request_id,
        output_locations=entry.output_locations,
        metadata_location=entry.metadata_location,
        cost=entry.facts.get("cost"),
    )


def _results_location(archive_uri: str, results_uri: str | None) -> str:
    if results_uri:
        return results_uri
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    return f"{archive_uri.rstrip('/')}/{RESULTS_FOLDER}/batch-{stamp}.jsonl"


def _report_markdown(rows: list[BatchRowResult], total_cost: float) -> str:
    lines = [
        "# Nano Banana batch",
        "",
        f"{sum(r.status == 'archived' for r in rows)} archived, "
        f"{sum(r.status == 'skipped' for r in rows)} skipped (done earlier), "
        f"{sum(r.status == 'failed' for r in rows)} failed; total cost ${total_cost:.2f}.",
        "",
        "| row | request | status | inputs | outputs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        inputs = " ".join(f"[in {i}]({source})" for i, source in enumerate(row.sources))
        outputs = " ".join(
            f"[out {i}]({location})" for i, location in enumerate(row.output_locations)
        )
        detail = outputs or (row.error or "").replace("|", "/")[:200]
        lines.append(
            f"| {row.row} | `{row.request_id or '-'}` | {row.status} | {inputs} | {detail} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- scale-out


def _credentials_parameter(credentials: RunComfyCredentials | str) -> str:
    """The parent's credentials as a child run's parameter: the block's name.

    A block object cannot travel as a parameter (its token is a secret), so a saved
    block goes by its name, which the child loads.
    """
    if isinstance(credentials, str):
        return credentials
    name = credentials._block_document_name
    if name is None:
        raise ValueError(
            "a chunked batch passes its credentials to child runs, so they must be a saved "
            "RunComfyCredentials block (or its name), not an unsaved one"
        )
    return name


def _read_chunk_rows(location: str, aws_credentials: str | None) -> list[BatchRowResult]:
    """The rows a chunk's run wrote to its results manifest; none if it wrote none."""
    target, s3_client = resolve_location(location, aws_credentials)
    assert target is not None
    backend, key = open_object(target, s3_client)
    raw = backend.read_bytes(key)
    lines = raw.decode("utf-8").splitlines() if raw else []
    return [BatchRowResult.model_validate_json(line) for line in lines if line.strip()]


def _in_parent_numbering(
    chunk: list[BatchJob], start: int, child_rows: list[BatchRowResult], missing: str
) -> list[BatchRowResult]:
    """A chunk's rows with the parent's row numbers and ids; a row the child never reported
    (its run crashed, say) fails with `missing` as the reason."""
    found = {row.row: row for row in child_rows}
    rows = []
    for offset, job in enumerate(chunk, start=1):
        row = found.get(offset) or BatchRowResult(
            row=offset,
            status="failed",
            prompt=job.prompt,
            sources=[strip_signature(source) for source in job.images],
            error=missing,
        )
        rows.append(row.model_copy(update={"row": start + offset, "id": job.id}))
    return rows


async def _run_in_chunks(
    jobs: list[BatchJob],
    chunk_size: int,
    chunk_deployment: str,
    options: dict[str, Any],
    results_location: str,
    aws_credentials: str | None,
) -> list[BatchRowResult]:
    """Run the rows as concurrent child runs of `chunk_deployment`; their rows, renumbered.

    A child returns its rows through its results manifest, written next to the
    parent's, rather than through Prefect's result storage: the manifest is written
    even when the child fails on failed rows, it lives in the archive every worker
    must share anyway (for the ledger), and persisting the flow's result would also
    persist its tasks' results, which hold the API's signed output URLs.
    """
    logger = get_run_logger()
    context = FlowRunContext.get()
    parent = context.flow_run.name if context and context.flow_run else "batch"
    # Fresh per run of the parent: a retried parent never reads an earlier attempt's rows.
    token = uuid4().hex[:8]
    starts = range(0, len(jobs), chunk_size)
    done = 0

    async def run_chunk(index: int, start: int) -> list[BatchRowResult]:
        nonlocal done
        chunk = jobs[start : start + chunk_size]
        location = f"{results_location.removesuffix('.jsonl')}.chunk-{index:03d}-{token}.jsonl"
        # A row without an id is told apart by its position: give it its position in
        # the parent, so the child finds the same ledger entry as an unchunked run would.
        child_jobs = [
            {**job.model_dump(exclude_none=True), "id": job.id or str(start + offset)}
            for offset, job in enumerate(chunk, start=1)
        ]
        child = await run_deployment(
            name=chunk_deployment,
            parameters={
                **options,
                "jobs": child_jobs,
                "results_uri": location,
                "chunk_size": None,
                "chunk_deployment": None,
            },
            flow_run_name=f"{parent}-chunk-{index}-of-{len(starts)}",
            poll_interval=CHUNK_POLL_SECONDS,
            as_subflow=True,
        )
        ended = child.state.name if child.state else "unknown"
        if child.state and child.state.message:
            ended = redact_text(f"{ended} ({child.state.message})")
        rows = f"{start + 1}-{start + len(chunk)}"
        logger.info("Chunk %d (rows %s) ran as flow run %r: %s", index, rows, child.name, ended)
        child_rows = await to_thread.run_sync(_read_chunk_rows, location, aws_credentials)
        missing = (
            f"chunk {index} (flow run {child.name}) ended {ended} without a result for this "
            "row; rerun the batch to retry it (rows already archived are skipped)"
        )
        done += len(chunk)
        if (listener := ROW_PROGRESS.get()) is not None:
            listener(done, len(jobs))
        return _in_parent_numbering(chunk, start, child_rows, missing)

    chunks = await asyncio.gather(
        *(run_chunk(index, start) for index, start in enumerate(starts, start=1))
    )
    return [row for rows in chunks for row in rows]


async def _finish_batch(
    rows: list[BatchRowResult],
    results_location: str,
    allow_partial: bool,
    aws_credentials: str | None,
) -> BatchEditResult:
    """Write the results manifest and artifacts; raise when rows failed, unless allowed."""
    results_target, results_s3 = resolve_location(results_location, aws_credentials)
    await to_thread.run_sync(
        partial(
            write_results_manifest,
            results_target,
            [row.model_dump(mode="json") for row in rows],
            s3_client=results_s3,
        )
    )
    total_cost = round(sum(row.cost or 0.0 for row in rows if row.status == "archived"), 6)
    result = BatchEditResult(
        rows=rows,
        results_manifest=results_location,
        archived=sum(row.status == "archived" for row in rows),
        skipped=sum(row.status == "skipped" for row in rows),
        failed=sum(row.status == "failed" for row in rows),
        total_cost=total_cost,
    )
    await acreate_table_artifact(
        key="nanobanana-batch-rows",
        table=[
            {
                "row": row.row,
                "request_id": row.request_id,
                "status": row.status,
                "seconds": row.seconds,
                "cost": row.cost,
                "output": row.output_locations[0] if row.output_locations else None,
                "error": row.error,
            }
            for row in rows
        ],
        description=f"Rows of the batch; results manifest: {results_location}",
    )
    await acreate_markdown_artifact(
        key="nanobanana-batch-report", markdown=_report_markdown(rows, total_cost)
    )
    get_run_logger().info(
        "Batch done: %d archived, %d skipped, %d failed; total cost $%.2f; results in %s",
        result.archived,
        result.skipped,
        result.failed,
        total_cost,
        results_location,
    )
    if result.failed and not allow_partial:
        raise BatchFailedError(
            f"{result.failed} of {len(rows)} rows failed (every success is archived; see "
            f"{results_location}); rerun to retry them, or pass allow_partial=True",
            result,
        )
    return result


@flow(name="nano-banana-batch")
async def batch_edit(
    jobs: list[BatchJob] | None = None,
    manifest_uri: str | None = None,
    archive_uri: str = DEFAULT_ARCHIVE_URI,
    staging_uri: str | None = None,
    aspect_ratio: AspectRatio = "auto",
    resolution: Resolution = "1K",
    output_format: OutputFormat = "png",
    num_images: Annotated[int, Field(ge=1, le=4)] = 1,
    max_concurrency: Annotated[int, Field(ge=1)] = 8,
    concurrency_limit_name: str = DEFAULT_CONCURRENCY_LIMIT,
    allow_partial: bool = False,
    credentials: RunComfyCredentials | str = DEFAULT_CREDENTIALS_BLOCK,
    aws_credentials: str | None = None,
    timeout_seconds: float = 1800,
    results_uri: str | None = None,
    chunk_size: Annotated[int, Field(ge=1)] | None = None,
    chunk_deployment: str | None = None,
) -> BatchEditResult:
    """Run many Nano Banana Pro edits: stage, submit, wait and archive every row.

    Args:
        jobs: The rows, when not read from `manifest_uri`.
        manifest_uri: A JSONL or CSV manifest (local or s3://), one row per edit:
            prompt, images, and optional per-row options and id.
        archive_uri: Where outputs, metadata.json files and the ledger go: a local
            folder, s3://bucket/prefix or s3-bucket://BLOCK/prefix.
        staging_uri: Where local inputs are uploaded for RunComfy to fetch
            (s3://…, s3-bucket://…, or a loopback object store's URL).
        aspect_ratio: Default output ratio of rows that set none.
        resolution: Default resolution of rows that set none.
        output_format: Default format of rows that set none.
        num_images: Default number of images of rows that set none.
        max_concurrency: Requests in flight from this run; also the size of the
            global concurrency limit when this run creates it.
        concurrency_limit_name: The Prefect global concurrency limit shared by all
            runs that use the same RunComfy quota.
        allow_partial: End Completed even when rows failed (after archiving the rest).
        credentials: A `RunComfyCredentials` block or its name ("default" falls back
            to the RUNCOMFY_* environment variables).
        aws_credentials: The name of a prefect-aws `AwsCredentials` block for S3;
            None uses boto3's standard chain and AWS_ENDPOINT_URL.
        timeout_seconds: How long one row may wait for its request.
        results_uri: Where to write the JSONL results manifest; defaults to
            `{archive_uri}/_results/batch-{timestamp}.jsonl`.
        chunk_size: Scale out: with more rows than this, run them in chunks of this
            many, each a child run of `chunk_deployment`, all at once.
        chunk_deployment: The deployment of this flow that runs the chunks, as
            "flow-name/deployment-name" (e.g. "nano-banana-batch/chunk").
    """
    if (jobs is None) == (manifest_uri is None):
        raise ValueError("give exactly one of `jobs` or `manifest_uri`")
    if (chunk_size is None) != (chunk_deployment is None):
        raise ValueError("give both `chunk_size` and `chunk_deployment`, or neither")
    if jobs is None:
        jobs = await aread_batch_manifest(manifest_uri, aws_credentials)
    if chunk_size is not None and chunk_deployment is not None and len(jobs) > chunk_size:
        options = {
            "archive_uri": archive_uri,
            "staging_uri": staging_uri,
            "aspect_ratio": aspect_ratio,
            "resolution": resolution,
            "output_format": output_format,
            "num_images": num_images,
            "max_concurrency": max_concurrency,
            "concurrency_limit_name": concurrency_limit_name,
            "allow_partial": allow_partial,
            "credentials": _credentials_parameter(credentials),
            "aws_credentials": aws_credentials,
            "timeout_seconds": timeout_seconds,
        }
        # Made here, once: children starting together would race to create it.
        await _ensure_concurrency_limit(concurrency_limit_name, max_concurrency)
        results_location = _results_location(archive_uri, results_uri)
        rows = await _run_in_chunks(
            jobs, chunk_size, chunk_deployment, options, results_location, aws_credentials
        )
        return await _finish_batch(rows, results_location, allow_partial, aws_credentials)
    defaults = {
        "aspect_ratio": aspect_ratio,
        "resolution": resolution,
        "output_format": output_format,
        "num_images": num_images,
    }
    plans = await aplan_batch(jobs, defaults, archive_uri, staging_uri, aws_credentials)
    shared_limit = await _ensure_concurrency_limit(concurrency_limit_name, max_concurrency)

    location, s3_client = resolve_location(archive_uri, aws_credentials)
    resolved = await aresolve_credentials(credentials)
    progress_id = await acreate_progress_artifact(
        progress=0.0, description=f"Rows of this batch finished, of {len(plans)}."
    )
    async with resolved.get_async_client() as client:
        batch = _Batch(
            client=client,
            ledger=Ledger(location, s3_client=s3_client),
            archive_uri=archive_uri,
            aws_credentials=aws_credentials,
            limit_name=concurrency_limit_name,
            max_concurrency=min(max_concurrency, shared_limit),
            timeout_seconds=timeout_seconds,
            total=len(plans),
        )

        outcomes: dict[int, BatchRowResult] = {}
        runnable: asyncio.Queue[_RowPlan] = asyncio.Queue()
        for plan in plans:
            settled = _settled_without_api(plan, batch.ledger)
            if settled is None:
                runnable.put_nowait(plan)
            else:
                outcomes[plan.row] = settled

        # Progress goes out from one background task, never from the lanes: a lane that
        # waited on the Prefect API before its next submit would leave its API slot idle.
        progress: asyncio.Task[None] | None = None

        async def show_progress() -> None:
            # One update in flight, always the latest figure: a busy server gets fewer writes.
            while progress_id is not None and batch.percent_sent < batch.percent_shown:
                percent = batch.percent_shown
                await aupdate_progress_artifact(progress_id, float(percent))
                batch.percent_sent = percent

        async def count_done() -> None:
            nonlocal progress
            batch.done += 1
            if (listener := ROW_PROGRESS.get()) is not None:
                listener(batch.done, batch.total)
            percent = 100 * batch.done // batch.total
            if progress_id is not None and percent > batch.percent_shown:
                # At most a hundred updates, however long the batch.
                batch.percent_shown = percent
                if progress is None or progress.done():
                    if progress is not None:
                        progress.result()  # a failed update fails the batch, as before
                    progress = asyncio.create_task(show_progress())

        async def finish_row(plan: _RowPlan, request_ended: asyncio.Event) -> None:
            outcomes[plan.row] = await _run_row(plan, batch, request_ended)
            await count_done()

        finishing: list[asyncio.Task[None]] = []

        async def lane() -> None:
            # A lane is one request in flight: it moves on when its row's request has
            # ended, and the row archives on its own meanwhile.
            while not runnable.empty():
                request_ended = asyncio.Event()
                finishing.append(
                    asyncio.create_task(finish_row(runnable.get_nowait(), request_ended))
                )
                await request_ended.wait()

        for _ in outcomes:
            await count_done()
        lanes = min(batch.lanes, runnable.qsize())
        if lanes:
            try:
                async with concurrency(
                    batch.limit_name, occupy=lanes, strict=True, lease_duration=LEASE_SECONDS
                ):
                    await asyncio.gather(*(lane() for _ in range(lanes)))
                await asyncio.gather(*finishing)
            finally:
                # Rows outlive their lane; when the run stops early they stop with it.
                for row in finishing:
                    row.cancel()
        if progress is not None:
            await progress
        if progress_id is not None:
            # End on the truth, whatever the updater last sent.
            await aupdate_progress_artifact(progress_id, 100.0)
        rows = [outcomes[plan.row] for plan in plans]

    return await _finish_batch(
        rows, _results_location(archive_uri, results_uri), allow_partial, aws_credentials
    )
