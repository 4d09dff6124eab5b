"""One row of a batch, in one task run: submit (at most once), wait, archive."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from functools import partial

from anyio import to_thread
from prefect import task
from prefect.logging import get_run_logger

from ... import observe
from ...client import (
    NANO_BANANA_EDIT_MODEL_ID,
    AsyncRunComfyClient,
    JobCancelledError,
    JobFailedError,
    NanoBananaEditInput,
    RunComfyError,
    SubmitOutcomeUnknownError,
)
from ...storage import (
    ArchiveMetadata,
    Ledger,
    LedgerEntry,
    redact_text,
)
from ...tasks.options import TASK_OPTIONS, retry_if_transient
from ...tasks.storage import aarchive_request
from .models import BatchRowResult, _RowPlan


class _Batch:
    """What every row of one batch run shares."""

    def __init__(
        self,
        client: AsyncRunComfyClient,
        ledger: Ledger,
        archive_uri: str,
        aws_credentials: str | None,
        max_concurrency: int,
        timeout_seconds: float,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.archive_uri = archive_uri
        self.aws_credentials = aws_credentials
        self.lanes = max_concurrency
        self.timeout_seconds = timeout_seconds
        self.flow_run_id = observe.current_flow_run_id()
        # Row → its request, as soon as the request exists: a failed row still names it.
        self.request_ids: dict[int, str] = {}
        # Job keys this run has tried to submit: their retries must ask the ledger again.
        self.submits_tried: set[str] = set()


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
    metadata = ArchiveMetadata(
        prompt=plan.job.prompt,
        parameters=plan.options,
        model_id=NANO_BANANA_EDIT_MODEL_ID,
        sources=plan.job.images,
        row=plan.row,
        row_id=plan.job.id,
        created_at=result.created_at,
        finished_at=result.finished_at,
        cost=result.cost,
        flow_run_id=str(batch.flow_run_id) if batch.flow_run_id else None,
    )
    record = await aarchive_request.fn(
        request_id,
        result.output_urls,
        batch.archive_uri,
        metadata,
        result.created_at,
        batch.aws_credentials,
        list(batch.client.output_hosts),
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
