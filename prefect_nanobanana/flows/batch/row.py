"""One row of a batch, in one task run, through the pipeline: the Prefect side of a row.

The steps themselves (submit at most once, wait, archive once) are
`prefect_nanobanana.pipeline`; here a row becomes a pipeline `Job`, runs in its
own task run, and what the pipeline tells (`RowObserver`) becomes the row's log
lines, events and assets in Prefect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from ... import observe, previews
from ...client import (
    NANO_BANANA_EDIT_MODEL_ID,
    JobCancelledError,
    JobFailedError,
    NanoBananaEditInput,
    RequestResult,
    RunComfyError,
)
from ...client.pricing import BudgetExceededError
from ...errors import NanoBananaError
from ...guard.protocol import SubmittedRequest, Unread
from ...pipeline import Job, JobOutcome, Observer, Pipeline
from ...stop import Stop
from ...storage import (
    ArchiveError,
    StorageError,
    VersionedEntry,
    redact_text,
    strip_signature,
)
from ...tasks.options import TASK_OPTIONS, retry_if_transient
from ...tasks.storage import ResolvedLocation
from .models import BatchRowResult, _RowPlan
from .plan import stage_row_images


class BatchRowError(NanoBananaError, RuntimeError):
    """A row that could not be submitted: invalid or unstageable (found while planning)."""


class _RowLog(logging.LoggerAdapter):
    """The row's task-run logger, every line led by the row's id: `row 3 (harbour-sunset): …`."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['label']}: {msg}", kwargs


def _row_log(job: Job) -> _RowLog:
    label = f"row {job.row} ({job.row_id})" if job.row_id else f"row {job.row}"
    return _RowLog(get_run_logger(), {"label": label})


class RowObserver(Observer):
    """A row's notices as Prefect sees them: log lines in the row's task run, the request's
    events, and the archived outputs' log line, event and assets."""

    async def submitted(self, job: Job, request: SubmittedRequest) -> None:
        await observe.aannounce_submitted(
            _row_log(job),
            request.request_id,
            job.job_key,
            row=job.row,
            row_id=job.row_id,
            model_id=NANO_BANANA_EDIT_MODEL_ID,
        )

    def ended(self, job: Job, request: SubmittedRequest, result: RequestResult) -> None:
        observe.emit_request_event(
            observe.EVENT_COMPLETED,
            request.request_id,
            payload=observe.event_payload(
                request.request_id,
                "completed",
                row=job.row,
                row_id=job.row_id,
                cost=result.cost,
                estimated_cost=job.estimated_cost,
                outputs=len(result.output_urls),
            ),
        )

    def failed(self, job: Job, request: SubmittedRequest, error: RunComfyError) -> None:
        ended = "cancelled" if isinstance(error, JobCancelledError) else "failed"
        observe.emit_request_event(
            observe.EVENT_FOR_STATUS[ended],
            request.request_id,
            payload=observe.event_payload(
                request.request_id, ended, row=job.row, row_id=job.row_id, error=str(error)
            ),
        )

    def withdrawn(self, job: Job, request: SubmittedRequest) -> None:
        observe.emit_request_event(
            observe.EVENT_CANCELLED,
            request.request_id,
            payload=observe.event_payload(
                request.request_id, "cancelled", row=job.row, row_id=job.row_id
            ),
        )

    def archived(self, job: Job, outcome: JobOutcome) -> None:
        if outcome.record is None:
            return  # another run archived them, and said so
        previews.announce_archived(
            _row_log(job),
            "Archived",
            outcome.record,
            sources=[strip_signature(source) for source in job.sources],
            model_id=NANO_BANANA_EDIT_MODEL_ID,
            prompt=job.prompt,
            cost=outcome.cost,
            row=job.row,
            row_id=job.row_id,
            resolution=job.options.get("resolution"),
        )

    def held_back(self, job: Job, refusal: BudgetExceededError) -> None:
        observe.emit_over_budget_event(
            job.job_key,
            {
                "row": job.row,
                "estimated_cost": job.estimated_cost,
                "spent": refusal.spent_usd,
                "max_cost_usd": refusal.max_cost_usd,
                "cap": refusal.cap_name,
            },
        )


class BatchRun:
    """What every row of one batch run shares: the pipeline, and the run's own bookkeeping.

    A plain object on purpose: it travels as a row task's parameter, and Prefect looks
    inside every dataclass, model and collection among a task's parameters (for
    futures to wait on). Inside this one it would walk the pipeline and every row's
    job, a cost that grows with the batch, for each row.

    Args:
        pipeline: The steps, with the run's client, ledger, archive, stop and budget.
        staging: Where rows' local images are uploaded right before their submit.
        lanes: Requests in flight at once.
        preview_rows: Rows 1..preview_rows make their outputs' thumbnails while archiving.
        run_id: The batch's flow run, for its claims and metadata.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        staging: ResolvedLocation,
        lanes: int,
        preview_rows: int = 0,
        run_id: str | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.staging = staging
        self.lanes = lanes
        self.preview_rows = preview_rows
        self.run_id = run_id
        # Row → its pipeline job, made once (a retry of the row's task reuses it).
        self.jobs: dict[int, Job] = {}

    @property
    def stop(self) -> Stop:
        """The run's stop."""
        return self.pipeline.stop

    def job_of(self, plan: _RowPlan) -> Job:
        """The row's pipeline job, made once: a retry of the row's task reuses it (and
        reads the ledger afresh, not the plan's copy)."""
        if (job := self.jobs.get(plan.row)) is not None:
            return job
        assert plan.job_key is not None
        edit = None
        if plan.image_urls and not plan.stage_at_submit:
            edit = NanoBananaEditInput(
                prompt=plan.job.prompt, image_urls=plan.image_urls, **plan.options
            )
        job = Job(
            job_key=plan.job_key,
            prompt=plan.job.prompt,
            options=plan.options,
            sources=plan.sources or plan.job.images,
            edit=edit,
            stage=(lambda: _staged(plan, self.staging)) if plan.stage_at_submit else None,
            known=VersionedEntry(plan.entry, plan.version)
            if plan.entry is not None and plan.version is not None
            else (None if plan.entry is None else Unread),
            estimated_cost=plan.estimated_cost,
            facts={"row": plan.row, "flow_run_id": self.run_id},
            row=plan.row,
            row_id=plan.job.id,
            thumbnails=plan.row <= self.preview_rows,
            run_id=self.run_id,
        )
        self.jobs[plan.row] = job
        return job


def _staged(plan: _RowPlan, staging: ResolvedLocation) -> tuple[NanoBananaEditInput, list[str]]:
    """A row's images, uploaded or encoded right before its submit, as the edit to send."""
    try:
        stage_row_images(plan, staging)
    except (StorageError, ValueError) as error:
        # Nothing was claimed or sent: the row fails as if planning had found it.
        raise BatchRowError(f"row {plan.row}: {redact_text(str(error))}") from None
    edit = NanoBananaEditInput(prompt=plan.job.prompt, image_urls=plan.image_urls, **plan.options)
    if staging.location is None:
        plan.image_urls = []  # megabytes of data URIs: kept only as long as the submit needs them
    return edit, plan.sources


def not_finished(stop: Stop) -> str:
    """Why a row did not end, when its run stopped: said in its result and manifest line."""
    return f"not finished: {stop.description}; rerun the batch to finish it"


@task(
    name="edit-row",
    task_run_name="{plan.run_name}",
    retry_condition_fn=retry_if_transient,
    **TASK_OPTIONS,
)
async def aedit_batch_row(
    plan: _RowPlan, batch: BatchRun, request_ended: asyncio.Event
) -> BatchRowResult:
    """One row in one task run: its pipeline job, and the row's result from its outcome.

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
    job = batch.job_of(plan)
    outcome = await batch.pipeline.run(job, request_ended, log=_row_log(job))
    return _row_result(plan, outcome, batch.stop)


def _row_result(plan: _RowPlan, outcome: JobOutcome, stop: Stop) -> BatchRowResult:
    """What a row's result (and its manifest line) says of its pipeline outcome."""
    request_id = outcome.request_id
    if outcome.status == "not_started":
        return plan.result("failed", error=f"{not_finished(stop)}; nothing was submitted")
    if outcome.status == "over_budget":
        return plan.result(
            "over_budget", estimated_cost=plan.estimated_cost, error=str(outcome.refusal)
        )
    if outcome.status == "stopped":
        if outcome.withdrawn:
            fate = "it was withdrawn while queued (not billed); a rerun submits the row again"
        else:
            fate = "it may still run at RunComfy; a rerun adopts it instead of paying again"
        return plan.result(
            "failed",
            request_id=request_id,
            error=f"{not_finished(stop)}: request {request_id}: {fate}",
        )
    assert outcome.request is not None
    adopted = outcome.request.adopted
    elsewhere, record = outcome.archived_elsewhere, outcome.record
    return plan.result(
        outcome.status,
        request_id=request_id,
        output_locations=(elsewhere or record).output_locations,  # type: ignore[union-attr]
        metadata_location=(elsewhere or record).metadata_location,  # type: ignore[union-attr]
        cost=outcome.cost,
        # Set only for a request this run pays for (an adopted one was paid by another run).
        estimated_cost=None if adopted else plan.estimated_cost,
        adopted_from=outcome.request.submitted_by if adopted else None,
        output_thumbnails=record.thumbnails if record is not None else [],
    )


async def _run_row(plan: _RowPlan, batch: BatchRun, request_ended: asyncio.Event) -> BatchRowResult:
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
        job = batch.jobs.get(plan.row)
        request_id = (job.request_id if job else None) or getattr(error, "request_id", None)
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
        bill = batch.pipeline.budget.bills.get(plan.job_key) if plan.job_key else None
        return plan.result(
            "failed",
            request_id=request_id,
            output_locations=kept.output_locations if kept else [],
            seconds=round(time.monotonic() - started, 3),
            cost=bill,
            estimated_cost=plan.estimated_cost if bill is not None else None,
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
