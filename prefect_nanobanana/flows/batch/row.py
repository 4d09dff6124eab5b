"""One row of a batch, in one task run: submit (at most once), wait, archive."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from anyio import to_thread
from prefect import task
from prefect.logging import get_run_logger

from ... import observe, previews
from ...client import (
    NANO_BANANA_EDIT_MODEL_ID,
    AsyncRunComfyClient,
    JobCancelledError,
    JobFailedError,
    NanoBananaEditInput,
)
from ...storage import (
    ArchiveError,
    ArchiveMetadata,
    Ledger,
    VersionedEntry,
    redact_text,
    strip_signature,
)
from ...tasks.guard import (
    SubmittedRequest,
    Unread,
    archive_claim,
    mark_archived,
    mark_failed,
    submit_once,
)
from ...tasks.options import TASK_OPTIONS, retry_if_transient
from ...tasks.storage import aarchive_request
from .models import BatchRowResult, RowStatus, _RowPlan
from .plan import inline_images


class BatchRowError(RuntimeError):
    """A row that could not be submitted: invalid or unstageable (found while planning)."""


class _RowLog(logging.LoggerAdapter):
    """The row's task-run logger, every line led by the row's id: `row 3 (harbour-sunset): …`."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['label']}: {msg}", kwargs


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
        # Rows whose task ran before: a retry reads the ledger afresh, not the plan's copy.
        self.attempted: set[int] = set()


async def _request_of(plan: _RowPlan, batch: _Batch) -> SubmittedRequest:
    """The row's request, through the one submit guard: recorded, adopted, or one submit.

    The plan's read of the ledger saves the guard a read on the row's first attempt;
    whatever happened since (another run claimed the row) the guard's atomic claim
    sees, and then it adopts instead of submitting.
    """
    assert plan.job_key is not None
    known: VersionedEntry | object | None = Unread
    if plan.row not in batch.attempted:
        known = VersionedEntry(plan.entry, plan.version) if plan.entry and plan.version else None
    batch.attempted.add(plan.row)
    if plan.inline_at_submit and not plan.image_urls:
        await to_thread.run_sync(inline_images, plan)
    edit: NanoBananaEditInput | None = None
    if plan.image_urls:
        edit = NanoBananaEditInput(
            prompt=plan.job.prompt, image_urls=plan.image_urls, **plan.options
        )
    if plan.inline_at_submit:
        plan.image_urls = []  # megabytes of data URIs: kept only as long as the submit needs them

    submitted = await submit_once(
        plan.job_key,
        batch.ledger,
        batch.client,
        edit,
        facts={
            "row": plan.row,
            "model_id": NANO_BANANA_EDIT_MODEL_ID,
            "parameters": plan.options,
            "sources": plan.sources or plan.image_urls,
            "flow_run_id": str(batch.flow_run_id) if batch.flow_run_id else None,
        },
        known=known,
    )
    batch.request_ids[plan.row] = submitted.request_id
    if not (submitted.resumed or submitted.adopted):
        get_run_logger().info(
            "%s: submitted as RunComfy request %s", plan.label, submitted.request_id
        )
        observe.emit_request_event(
            observe.EVENT_SUBMITTED,
            submitted.request_id,
            payload=observe.event_payload(
                submitted.request_id,
                "submitted",
                row=plan.row,
                row_id=plan.job.id,
                job_key=plan.job_key,
                model_id=NANO_BANANA_EDIT_MODEL_ID,
            ),
        )
    return submitted


@task(
    name="edit-row",
    task_run_name="{plan.run_name}",
    retry_condition_fn=retry_if_transient,
    **TASK_OPTIONS,
)
async def aedit_batch_row(
    plan: _RowPlan, batch: _Batch, request_ended: asyncio.Event
) -> BatchRowResult:
    """One row in one task run: submit (at most once), wait, archive (once), mark archived.

    One task run per row rather than one per step, because the Prefect server
    records every task run's state changes as events, and at three task runs a row
    that bookkeeping, not the API, set the pace of a batch. A retry comes back here
    and resumes the request its first attempt recorded; a row another run submitted
    meanwhile is adopted (waited on, never paid again). `request_ended` is set once
    the request is over, so the row's lane can start the next row while this one
    archives: archiving is our I/O, not a request in flight.
    """
    if plan.error:
        raise BatchRowError(plan.error)  # found while planning; nothing was paid
    assert plan.job_key is not None
    log = _RowLog(get_run_logger(), {"label": plan.label})
    submitted = await _request_of(plan, batch)
    request_id = submitted.request_id
    status: RowStatus = "adopted" if submitted.adopted else "archived"
    try:
        result = await batch.client.wait(
            request_id,
            batch.timeout_seconds,
            resolution=plan.options["resolution"],
            submitted_at=submitted.submitted_at,
            log=log,
        )
    except (JobFailedError, JobCancelledError) as error:
        if not submitted.adopted:
            ended = "cancelled" if isinstance(error, JobCancelledError) else "failed"
            observe.emit_request_event(
                observe.EVENT_FOR_STATUS[ended],
                request_id,
                payload=observe.event_payload(
                    request_id, ended, row=plan.row, row_id=plan.job.id, error=str(error)
                ),
            )
        await mark_failed(batch.ledger, plan.job_key, error)
        raise
    request_ended.set()  # first: the lane's next submit is the batch's critical path
    if not submitted.adopted:
        observe.emit_request_event(
            observe.EVENT_COMPLETED,
            request_id,
            payload=observe.event_payload(
                request_id,
                "completed",
                row=plan.row,
                row_id=plan.job.id,
                cost=result.cost,
                outputs=len(result.output_urls),
            ),
        )
    async with archive_claim(batch.ledger, plan.job_key) as archived_elsewhere:
        if archived_elsewhere is not None:
            return plan.result(
                status,
                request_id=request_id,
                output_locations=archived_elsewhere.output_locations,
                metadata_location=archived_elsewhere.metadata_location,
                cost=archived_elsewhere.cost
                if archived_elsewhere.cost is not None
                else result.cost,
                adopted_from=submitted.submitted_by if submitted.adopted else None,
            )
        metadata = ArchiveMetadata(
            prompt=plan.job.prompt,
            parameters=plan.options,
            model_id=NANO_BANANA_EDIT_MODEL_ID,
            sources=plan.sources or plan.job.images,
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
        )
        await mark_archived(
            batch.ledger,
            plan.job_key,
            metadata_location=record.metadata_location,
            output_locations=record.output_locations,
            cost=result.cost,
        )
    previews.announce_archived(
        log,
        "Archived",
        record,
        sources=[strip_signature(source) for source in plan.job.images],
        model_id=NANO_BANANA_EDIT_MODEL_ID,
        prompt=plan.job.prompt,
        cost=result.cost,
        row=plan.row,
        row_id=plan.job.id,
    )
    return plan.result(
        status,
        request_id=request_id,
        output_locations=record.output_locations,
        metadata_location=record.metadata_location,
        cost=result.cost,
        adopted_from=submitted.submitted_by if submitted.adopted else None,
    )


async def _run_row(plan: _RowPlan, batch: _Batch, request_ended: asyncio.Event) -> BatchRowResult:
    """The row's task run, its failure turned into a failed row so the batch goes on.

    A failed row is a red `row-N` in the run's graph, whatever stopped it (invalid,
    unstageable, outcome unknown, the job failed, not archived), and
    `nanobanana.row.failed` is emitted unless its request's own failure event
    already said so.
    """
    started = time.monotonic()
    try:
        state = await aedit_batch_row(plan, batch, request_ended, return_state=True)
        outcome = await state.aresult(raise_on_failure=False)
        if not isinstance(outcome, BaseException) and state.is_completed():
            return outcome.model_copy(update={"seconds": round(time.monotonic() - started, 3)})
        error = outcome if isinstance(outcome, BaseException) else RuntimeError(state.message)
        request_id = batch.request_ids.get(plan.row) or getattr(error, "request_id", None)
        message = redact_text(str(error))
        get_run_logger().error("%s failed (request %s): %s", plan.label, request_id, message)
        if not isinstance(error, JobFailedError):
            observe.emit_row_failed(
                plan.row,
                plan.job.id,
                message,
                request_id=request_id,
                task_run_id=state.state_details.task_run_id,
            )
        # Outputs archived before another one failed are kept: the row lists them.
        partial = error.partial_record if isinstance(error, ArchiveError) else None
        return plan.result(
            "failed",
            request_id=request_id,
            output_locations=partial.output_locations if partial else [],
            seconds=round(time.monotonic() - started, 3),
            error=message,
        )
    finally:
        request_ended.set()


def _settled_without_api(plan: _RowPlan) -> BatchRowResult | None:
    """The outcome of a row archived earlier; None for one that needs its task run.

    A row that cannot be submitted (invalid, or an earlier submit's outcome is
    unknown) is not settled here: its task run fails at once, so it shows red.
    """
    if plan.entry is not None and plan.entry.status == "archived" and not plan.error:
        return _skipped(plan)
    return None


def _skipped(plan: _RowPlan) -> BatchRowResult:
    entry = plan.entry
    assert entry is not None
    return plan.result(
        "skipped",
        request_id=entry.request_id,
        output_locations=entry.output_locations,
        metadata_location=entry.metadata_location,
        # Entries of earlier releases kept no cost of their own.
        cost=entry.cost if entry.cost is not None else entry.facts.get("cost"),
    )
