"""One row of a batch, in one task run: submit (at most once), wait, archive."""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
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
    RunComfyError,
    SubmitOutcomeUnknownError,
    WaitTimeoutError,
)
from ...client.pricing import BudgetExceededError, CostBudget
from ...errors import NanoBananaError
from ...guard.protocol import (
    SubmittedRequest,
    Unread,
    archive_claim,
    end_archiving_claim,
    mark_archived,
    mark_failed,
    release_archiving,
    submit_once,
    withdraw,
)
from ...stop import RunStopped, Stop
from ...storage import (
    ArchiveError,
    ArchiveMetadata,
    Ledger,
    StorageError,
    VersionedEntry,
    archive_outputs,
    redact_text,
    strip_signature,
)
from ...tasks.guard import run_log
from ...tasks.options import TASK_OPTIONS, retry_if_transient
from ...tasks.storage import ResolvedLocation
from .models import BatchRowResult, RowStatus, _RowPlan
from .plan import stage_row_images


class BatchRowError(NanoBananaError, RuntimeError):
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
        stop: Stop,
        ledger: Ledger,
        archive: ResolvedLocation,
        staging: ResolvedLocation,
        max_concurrency: int,
        timeout_seconds: float,
        budget: CostBudget | None = None,
        preview_rows: int = 0,
    ) -> None:
        self.client = client
        # Set when the run is asked to end: no row claims or submits after it, and the
        # rows waiting let go of their requests (see `_stopped_while_waiting`).
        self.stop = stop
        self.ledger = ledger
        # Resolved once for the batch (a block name is loaded once, not once a row), and
        # checked by planning: rows write without asking again.
        self.archive = archive
        self.staging = staging
        self.lanes = max_concurrency
        self.timeout_seconds = timeout_seconds
        # Rows 1..preview_rows make their outputs' thumbnails while archiving, for the report.
        self.preview_rows = preview_rows
        self.flow_run_id = observe.current_flow_run_id()
        # Row → its request, as soon as the request exists: a failed row still names it.
        self.request_ids: dict[int, str] = {}
        # Rows whose task ran before: a retry reads the ledger afresh, not the plan's copy.
        self.attempted: set[int] = set()
        self.budget = budget or CostBudget(None)
        # Row → the estimate counted in flight for it, until its bill replaces it.
        self.in_flight: dict[int, float] = {}
        # Row → what its request (submitted by this run) was billed, once known.
        self.bills: dict[int, float] = {}

    async def check_budget(self, plan: _RowPlan) -> None:
        """The budget check of a paid submit (the guard calls it right before sending): count
        the row's estimate in flight, or raise `BudgetExceededError` to hold the row back.

        A retry of the row's task (after a submit the API refused) keeps its first
        reservation instead of counting the row twice.
        """
        self.stop.check()
        if plan.row in self.in_flight:
            return
        estimate = plan.estimated_cost or 0.0
        spent = self.budget.spent_usd
        if not self.budget.reserve(estimate):
            assert self.budget.max_cost_usd is not None
            raise BudgetExceededError(
                estimate, self.budget.max_cost_usd, rows_to_pay=1, spent_usd=spent
            )
        self.in_flight[plan.row] = estimate

    def settle(self, row: int, billed_usd: float | None) -> None:
        """The row's request ended: its bill (None: unknown, the estimate counts) replaces
        its estimate in the spend."""
        if (estimate := self.in_flight.pop(row, None)) is not None:
            self.budget.settle(estimate, billed_usd)
            if billed_usd is not None:
                self.bills[row] = billed_usd

    def release(self, row: int) -> None:
        """The row's submit provably cost nothing: its estimate leaves the spend."""
        if (estimate := self.in_flight.pop(row, None)) is not None:
            self.budget.release(estimate)

    def held_back(self, plan: _RowPlan, refusal: BudgetExceededError) -> BatchRowResult:
        """The row `max_cost_usd` did not let through: unpaid, and said so everywhere."""
        observe.emit_over_budget_event(
            plan.job_key or str(plan.row),
            {
                "row": plan.row,
                "estimated_cost": plan.estimated_cost,
                "spent": refusal.spent_usd,
                "max_cost_usd": refusal.max_cost_usd,
            },
        )
        return plan.result("over_budget", estimated_cost=plan.estimated_cost, error=str(refusal))

    def not_started(self, plan: _RowPlan) -> BatchRowResult:
        """The row the run's stop came before: nothing claimed, sent or paid."""
        return plan.result("failed", error=f"{not_finished(self.stop)}; nothing was submitted")


def not_finished(stop: Stop) -> str:
    """Why a row did not end, when its run stopped: said in its result and manifest line."""
    return f"not finished: {stop.description}; rerun the batch to finish it"


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
    if plan.stage_at_submit and not plan.image_urls:
        try:
            await to_thread.run_sync(stage_row_images, plan, batch.staging)
        except (StorageError, ValueError) as error:
            # Nothing was claimed or sent: the row fails as if planning had found it.
            raise BatchRowError(f"row {plan.row}: {redact_text(str(error))}") from None
    edit: NanoBananaEditInput | None = None
    if plan.image_urls:
        edit = NanoBananaEditInput(
            prompt=plan.job.prompt, image_urls=plan.image_urls, **plan.options
        )
    if plan.stage_at_submit and batch.staging.location is None:
        plan.image_urls = []  # megabytes of data URIs: kept only as long as the submit needs them

    try:
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
                "estimated_cost": plan.estimated_cost,
                "flow_run_id": str(batch.flow_run_id) if batch.flow_run_id else None,
            },
            before_submit=partial(batch.check_budget, plan),
            known=known,
            hold_archiving=True,
            run_id=str(batch.flow_run_id) if batch.flow_run_id else None,
            log=run_log(),
        )
    except SubmitOutcomeUnknownError:
        batch.settle(plan.row, None)  # it may have been billed: its estimate counts
        raise
    except RunComfyError:
        batch.release(plan.row)  # refused by the API: not billed
        raise
    batch.request_ids[plan.row] = submitted.request_id
    if not (submitted.resumed or submitted.adopted):
        await observe.aannounce_submitted(
            _RowLog(get_run_logger(), {"label": plan.label}),
            submitted.request_id,
            plan.job_key,
            row=plan.row,
            row_id=plan.job.id,
            model_id=NANO_BANANA_EDIT_MODEL_ID,
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
    if batch.stop.is_set:
        return batch.not_started(plan)
    try:
        submitted = await _request_of(plan, batch)
    except BudgetExceededError as refusal:
        return batch.held_back(plan, refusal)
    except RunStopped:
        return batch.not_started(plan)
    try:
        return await _wait_and_archive(plan, batch, request_ended, submitted, log)
    finally:
        end_archiving_claim(submitted)


async def _wait_and_archive(
    plan: _RowPlan,
    batch: _Batch,
    request_ended: asyncio.Event,
    submitted: SubmittedRequest,
    log: _RowLog,
) -> BatchRowResult:
    """The row's request from its submit on: wait, archive once, mark archived. Apart
    from the task so that every way out of it ends the archiving claim its submit took."""
    assert plan.job_key is not None
    request_id = submitted.request_id
    # Set only for a request this run pays for (an adopted one was paid by another run).
    estimated_cost = None if submitted.adopted else plan.estimated_cost
    status: RowStatus = "adopted" if submitted.adopted else "archived"
    waiting = batch.client.wait(
        request_id,
        batch.timeout_seconds,
        resolution=plan.options["resolution"],
        submitted_at=submitted.submitted_at,
        log=log,
    )
    try:
        result = await batch.stop.first(waiting)
    except (JobFailedError, JobCancelledError) as error:
        batch.settle(plan.row, 0.0)  # a job that did not complete is not billed
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
    except WaitTimeoutError:
        # Waited `timeout_seconds` in vain: a request still queued is withdrawn, so
        # nothing is billed for it and a rerun submits the row again.
        await _let_go(plan, batch, submitted, log)
        raise
    except Exception:
        # Not archived here after all (a retry resumes the request): let go of the
        # archiving claimed with the request id, so no other run waits for it.
        await release_archiving(batch.ledger, submitted)
        raise
    if result is None:
        return await _stopped_while_waiting(plan, batch, submitted, log)
    # Before the lane moves on: its next row's budget check must see this bill.
    batch.settle(plan.row, result.cost)
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
                estimated_cost=estimated_cost,
                outputs=len(result.output_urls),
            ),
        )
    async with archive_claim(
        batch.ledger,
        plan.job_key,
        known=submitted.record,
        held_token=submitted.archiving_token,
        run_id=str(batch.flow_run_id) if batch.flow_run_id else None,
    ) as turn:
        if (archived_elsewhere := turn.elsewhere) is not None:
            return plan.result(
                status,
                request_id=request_id,
                output_locations=archived_elsewhere.output_locations,
                metadata_location=archived_elsewhere.metadata_location,
                cost=archived_elsewhere.cost
                if archived_elsewhere.cost is not None
                else result.cost,
                estimated_cost=estimated_cost,
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
        record = await to_thread.run_sync(
            partial(
                archive_outputs,
                request_id,
                result.output_urls,
                date=result.created_at.date() if result.created_at else None,
                archive_uri=batch.archive.location,
                metadata=metadata,
                s3_client=batch.archive.s3_client,
                allowed_hosts=list(batch.client.output_hosts),
                check_target=False,
                check_existing=turn.started_before,
                thumbnails=plan.row <= batch.preview_rows,
            )
        )
        await mark_archived(
            batch.ledger,
            plan.job_key,
            metadata_location=record.metadata_location,
            output_locations=record.output_locations,
            cost=result.cost,
            known=turn.claim,
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
        estimated_cost=estimated_cost,
        adopted_from=submitted.submitted_by if submitted.adopted else None,
        output_thumbnails=record.thumbnails,
    )


async def _let_go(
    plan: _RowPlan, batch: _Batch, submitted: SubmittedRequest, log: _RowLog
) -> str | None:
    """The row will not wait for its request any more: withdrawn through the guard if still
    queued (and said so by an event), else left recorded for the next run; its estimate
    settles at nothing when withdrawn, else at what it may still cost."""
    if submitted.adopted:  # another run's request: that run, or the next, collects it
        batch.settle(plan.row, None)
        return None
    outcome = await withdraw(batch.ledger, batch.client, submitted, log=log)
    if outcome == "cancelled":
        observe.emit_request_event(
            observe.EVENT_CANCELLED,
            submitted.request_id,
            payload=observe.event_payload(
                submitted.request_id, "cancelled", row=plan.row, row_id=plan.job.id
            ),
        )
    batch.settle(plan.row, 0.0 if outcome == "cancelled" else None)
    return outcome


async def _stopped_while_waiting(
    plan: _RowPlan, batch: _Batch, submitted: SubmittedRequest, log: _RowLog
) -> BatchRowResult:
    """The run's stop came while the row waited: the row ends, its request withdrawn if it
    was queued or left recorded if it runs, and its result says which."""
    request_id = submitted.request_id
    log.info(
        "The run is stopping (%s); letting go of RunComfy request %s",
        batch.stop.description,
        request_id,
    )
    outcome = await _let_go(plan, batch, submitted, log)
    if outcome == "cancelled":
        fate = "it was withdrawn while queued (not billed); a rerun submits the row again"
    else:
        fate = "it may still run at RunComfy; a rerun adopts it instead of paying again"
    return plan.result(
        "failed",
        request_id=request_id,
        error=f"{not_finished(batch.stop)}: request {request_id}: {fate}",
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
        kept = error.partial_record if isinstance(error, ArchiveError) else None
        if request_id is None:
            batch.release(plan.row)
        # Still open: the request's end is unknown (it may be billed), so its estimate stays.
        batch.settle(plan.row, None)
        return plan.result(
            "failed",
            request_id=request_id,
            output_locations=kept.output_locations if kept else [],
            seconds=round(time.monotonic() - started, 3),
            cost=batch.bills.get(plan.row),
            estimated_cost=plan.estimated_cost if plan.row in batch.bills else None,
            error=message,
        )
    finally:
        request_ended.set()


def _settled_without_api(plan: _RowPlan) -> BatchRowResult | None:
    """The outcome of a row archived earlier; None for one that needs its task run.

    A row that cannot be submitted (invalid, or an earlier submit's outcome is
    unknown) is not settled here: its task run fails at once, so it shows red.
    """
    if plan.decision == "done":
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
        cost=entry.cost,
    )
