"""One row of a batch, in one task run: submit (at most once), wait, archive."""

from __future__ import annotations

import asyncio
import time

from prefect import task
from prefect.logging import get_run_logger

from ... import observe
from ...client import (
    NANO_BANANA_EDIT_MODEL_ID,
    AsyncRunComfyClient,
    JobCancelledError,
    JobFailedError,
    NanoBananaEditInput,
)
from ...storage import ArchiveError, ArchiveMetadata, Ledger, VersionedEntry, redact_text
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
    edit: NanoBananaEditInput | None = None
    if plan.image_urls:
        edit = NanoBananaEditInput(
            prompt=plan.job.prompt, image_urls=plan.image_urls, **plan.options
        )

    submitted = await submit_once(
        plan.job_key,
        batch.ledger,
        batch.client,
        edit,
        facts={
            "row": plan.row,
            "model_id": NANO_BANANA_EDIT_MODEL_ID,
            "parameters": plan.options,
            "sources": plan.image_urls,
            "flow_run_id": str(batch.flow_run_id) if batch.flow_run_id else None,
        },
        known=known,
    )
    batch.request_ids[plan.row] = submitted.request_id
    if not (submitted.resumed or submitted.adopted):
        get_run_logger().debug(
            "Row %d submitted as RunComfy request %s", plan.row, submitted.request_id
        )
        observe.emit_request_event(
            observe.EVENT_SUBMITTED,
            submitted.request_id,
            payload={
                "job_key": plan.job_key,
                "row": plan.row,
                "model_id": NANO_BANANA_EDIT_MODEL_ID,
            },
        )
    return submitted


@task(
    name="edit-row",
    task_run_name="row-{plan.row}",
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
    assert plan.job_key is not None
    submitted = await _request_of(plan, batch)
    request_id = submitted.request_id
    status: RowStatus = "adopted" if submitted.adopted else "archived"
    try:
        result = await batch.client.wait(
            request_id,
            batch.timeout_seconds,
            resolution=plan.options["resolution"],
            submitted_at=submitted.submitted_at,
        )
    except (JobFailedError, JobCancelledError) as error:
        if not submitted.adopted:
            ended = "cancelled" if isinstance(error, JobCancelledError) else "failed"
            observe.emit_request_event(
                observe.EVENT_FOR_STATUS[ended],
                request_id,
                payload={"row": plan.row, "error": str(error)},
            )
        await mark_failed(batch.ledger, plan.job_key, error)
        raise
    request_ended.set()  # first: the lane's next submit is the batch's critical path
    if not submitted.adopted:
        observe.emit_request_event(
            observe.EVENT_COMPLETED,
            request_id,
            payload={"row": plan.row, "cost": result.cost, "outputs": len(result.output_urls)},
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
        await mark_archived(
            batch.ledger,
            plan.job_key,
            metadata_location=record.metadata_location,
            output_locations=record.output_locations,
            cost=result.cost,
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
    """The row's task, its failure turned into a failed row so the batch goes on."""
    started = time.monotonic()
    try:
        row = await aedit_batch_row(plan, batch, request_ended)
        return row.model_copy(update={"seconds": round(time.monotonic() - started, 3)})
    except Exception as error:
        request_id = batch.request_ids.get(plan.row) or getattr(error, "request_id", None)
        get_run_logger().error("Row %d failed (request %s): %s", plan.row, request_id, error)
        # Outputs archived before another one failed are kept: the row lists them.
        partial = error.partial_record if isinstance(error, ArchiveError) else None
        return plan.result(
            "failed",
            request_id=request_id,
            output_locations=partial.output_locations if partial else [],
            seconds=round(time.monotonic() - started, 3),
            error=redact_text(str(error)),
        )
    finally:
        request_ended.set()


def _settled_without_api(plan: _RowPlan) -> BatchRowResult | None:
    """The outcome of a row that needs no request: invalid, or archived earlier."""
    if plan.error:
        return plan.result("failed", error=plan.error)
    if plan.entry is not None and plan.entry.status == "archived":
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
