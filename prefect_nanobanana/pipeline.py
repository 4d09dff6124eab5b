"""The one way a job goes: stage → submit through the guard → wait → archive.

Every surface runs its jobs through `Pipeline.run`: each row of `batch_edit`,
`edit_and_archive`, `edit_image` (which has no archive: its job ends with the
result) and the CLI's `edit`; a surface that only submits (the `submit_edit` task,
`NanoBananaEditJob.trigger`, the CLI's `submit`) takes the first step alone,
`Pipeline.submit`. What differs between them comes in as values, never as another
copy of the steps:

- the record store the guard claims in (the archive's ledger, Prefect's result
  store, memory);
- the run's `Budget` (a row is submitted only while it fits; one call settles it
  when the job ends);
- the run's `Stop` (no claim or submit after it; a request still queued is
  withdrawn through the guard, a running one left recorded for the next run);
- an `Observer`, told at each step what happened: the Prefect layer turns its
  notices into logs, events and artifacts, the CLI into its status line.

Knows nothing of Prefect and nothing of the command line.

Where things are decided: whether a job pays is `guard.protocol.decide` (asked by
the claim here and by a batch's planning); how the budget stops a job is
`Budget.reserve`, called by the guard right before the paid POST; how an output
reaches the archive is `Pipeline._archive`: the archiving claimed once through
the guard, `storage.archive_outputs`, the record marked archived.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol

from anyio import to_thread

from .client import (
    NANO_BANANA_EDIT_MODEL_ID,
    AsyncRunComfyClient,
    JobCancelledError,
    JobFailedError,
    NanoBananaEditInput,
    RequestResult,
    RequestStatus,
    RunComfyError,
    SubmitOutcomeUnknownError,
    WaitTimeoutError,
)
from .client.pricing import BudgetExceededError, CostBudget
from .guard.protocol import (
    SubmittedRequest,
    Unread,
    archive_claim,
    end_archiving_claim,
    let_go,
    mark_archived,
    mark_failed,
    release_archiving,
    submit_once,
)
from .guard.records import LedgerEntry, RecordStore, VersionedEntry
from .stop import RunStopped, Stop
from .storage import ArchiveMetadata, ArchiveRecord, archive_outputs
from .storage.budget import BudgetRefusal, Reservation

__all__ = ["Budget", "Job", "JobOutcome", "Observer", "Pipeline", "SharedTotal", "bill_after"]

Log = logging.Logger | logging.LoggerAdapter  # type: ignore[type-arg]
logger = logging.getLogger(__name__)

OutcomeStatus = Literal["archived", "adopted", "completed", "over_budget", "not_started", "stopped"]


@dataclass
class Job:
    """One logical edit, ready to go through the pipeline.

    Args:
        job_key: The guard's key for it (see `storage.job_key_for`).
        prompt: The edit instruction.
        options: aspect_ratio, resolution, output_format, num_images.
        sources: What `metadata.json` and the record say the inputs were.
        edit: The request to send, when its inputs are ready (staged URLs).
        stage: Or how to make it right before the submit, blocking (uploads a
            row's local images, or encodes them inline); raises for a row that
            cannot be staged, before anything is claimed.
        known: The job's record as the caller read it (a batch's plan), to save
            the guard a read; `Unread` to read it afresh.
        estimated_cost: What the budget counts for it until its bill is known.
        facts: Kept in the record with the request id.
        row: Its row in a batch, for the archive's metadata and the notices.
        row_id: Its row's id.
        thumbnails: Make the outputs' thumbnails while archiving (a report's previews).
        run_id: The run that works on it (a flow run id), for its claims and metadata.
        log: Where this job's lines go (the pipeline's logger when None).
        request_id: Set by the pipeline as soon as the job has a request.
    """

    job_key: str
    prompt: str
    options: dict[str, Any]
    sources: list[str] = field(default_factory=list)
    edit: NanoBananaEditInput | None = None
    stage: Callable[[], tuple[NanoBananaEditInput, list[str]]] | None = None
    known: VersionedEntry | object | None = Unread
    estimated_cost: float | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    row: int | None = None
    row_id: str | None = None
    thumbnails: bool = False
    run_id: str | None = None
    log: Log | None = None
    request_id: str | None = None


@dataclass
class JobOutcome:
    """How a job left the pipeline (errors raise instead: failed job, outcome unknown…).

    - "archived": this run's request, its outputs archived (here or by another run);
    - "adopted": another run's request, waited on and archived once;
    - "completed": the request completed, for a pipeline without an archive (the
      outputs are in `result`; `request.adopted` tells whose request it was);
    - "over_budget": held back by the budget before its submit; nothing paid;
    - "not_started": the run's stop came first; nothing claimed, sent or paid;
    - "stopped": the stop came while waiting: `withdrawn` says whether the request
      was still queued (withdrawn, not billed; also when a cancel from outside the
      run withdrew it first), else it stays recorded for a rerun.
    """

    status: OutcomeStatus
    request: SubmittedRequest | None = None
    result: RequestResult | None = None
    record: ArchiveRecord | None = None
    archived_elsewhere: LedgerEntry | None = None
    refusal: BudgetExceededError | None = None
    withdrawn: bool = False

    @property
    def request_id(self) -> str | None:
        """The job's request, when it has one."""
        return self.request.request_id if self.request is not None else None

    @property
    def cost(self) -> float | None:
        """What the request was billed, as the archive's record or the result says."""
        if self.archived_elsewhere is not None and self.archived_elsewhere.cost is not None:
            return self.archived_elsewhere.cost
        return self.result.cost if self.result is not None else None


class Observer:
    """Told what happened at each step; does nothing unless a surface overrides it.

    Its methods must not raise (observability never fails a paid request), but for
    `holding`, where a surface may still refuse the request it was handed.
    """

    def holding(self, job: Job, request: SubmittedRequest) -> None:
        """The job holds its request (submitted now, resumed or adopted), before any wait;
        raising here refuses it (the CLI refuses a job key reused for another edit)."""

    async def submitted(self, job: Job, request: SubmittedRequest) -> None:
        """A paid submit was made (not one resumed or adopted)."""

    def status(self, job: Job, status: RequestStatus) -> None:
        """A status poll of the job's request answered."""

    def ended(self, job: Job, request: SubmittedRequest, result: RequestResult) -> None:
        """The job's request completed."""

    def failed(self, job: Job, request: SubmittedRequest, error: RunComfyError) -> None:
        """The job's request failed or was cancelled at RunComfy."""

    def withdrawn(self, job: Job, request: SubmittedRequest) -> None:
        """The run stopped and the request, still queued, was withdrawn."""

    def archived(self, job: Job, outcome: JobOutcome) -> None:
        """The job's outputs are in the archive (`outcome.record`, or another run's)."""

    def held_back(self, job: Job, refusal: BudgetExceededError) -> None:
        """The budget held the job back before its submit."""


class SharedTotal(Protocol):
    """A running total other runs draw from too (`storage.DailyBudget`, `storage.SharedBudget`)."""

    cap_name: str

    def reserve(self, estimate_usd: float, label: str | None = None) -> Reservation | BudgetRefusal:
        """Reserve the estimate, or refuse it (see `storage.SharedBudget.reserve`)."""
        ...

    def settle(self, reservation: Reservation, billed_usd: float | None) -> None:
        """Replace the reservation by the bill."""
        ...

    def release(self, reservation: Reservation) -> None:
        """Give the reservation back: nothing was paid."""
        ...


class Budget:
    """A run's spend: each job reserves its estimate right before its paid submit, and
    one call (`end`) settles it when the job ends, whichever way.

    The run's own cap is kept here, in memory; a cap shared with other runs (the
    archive's `daily_budget_usd`, a chunked batch's `max_cost_usd` across its
    chunks) is a stored total in `shared`, reserved in and settled the same way, so
    every run that uses it can pass it only by what is in flight.

    Args:
        max_cost_usd: The run's cap; None counts without refusing.
        shared: Stored totals every reservation must also fit (blocking I/O: run in
            a worker thread).
    """

    def __init__(
        self, max_cost_usd: float | None = None, shared: Sequence[SharedTotal] = ()
    ) -> None:
        self.spend = CostBudget(max_cost_usd)
        self.shared = list(shared)
        self._in_flight: dict[str, float] = {}
        self._held: dict[str, list[tuple[SharedTotal, Reservation]]] = {}
        self.bills: dict[str, float] = {}

    async def reserve(
        self, job_key: str, estimate_usd: float | None, label: str | None = None
    ) -> None:
        """Count the job's estimate in flight, or refuse it (before anything is sent).

        A job that already holds a reservation (a retry after a refused submit) keeps it.

        Args:
            job_key: The job.
            estimate_usd: Its estimate (None counts as 0).
            label: Who reserves, written beside a shared reservation (a row's id).

        Raises:
            BudgetExceededError: The billed cost so far, the estimates in flight and
                this one would pass the run's cap, or a shared total's cap (its
                message is the shared total's reason, naming the cap).
            StorageError: A shared total cannot be read or written (nothing is sent).
        """
        if job_key in self._in_flight:
            return
        estimate = estimate_usd or 0.0
        spent = self.spend.spent_usd
        if not self.spend.reserve(estimate):
            assert self.spend.max_cost_usd is not None
            raise BudgetExceededError(
                estimate, self.spend.max_cost_usd, rows_to_pay=1, spent_usd=spent
            )
        self._in_flight[job_key] = estimate
        held: list[tuple[SharedTotal, Reservation]] = []
        try:
            for total in self.shared:
                answer = await to_thread.run_sync(partial(total.reserve, estimate, label=label))
                if isinstance(answer, BudgetRefusal):
                    raise BudgetExceededError(
                        estimate,
                        answer.cap_usd,
                        rows_to_pay=1,
                        spent_usd=answer.total_usd,
                        cap_name=answer.cap_name,
                        message=answer.reason,
                    )
                held.append((total, answer))
        except BaseException:
            # Refused (or unreadable): nothing will be sent, so nothing stays reserved.
            self._in_flight.pop(job_key, None)
            self.spend.release(estimate)
            await self._give_back(held, 0.0)
            raise
        if held:
            self._held[job_key] = held

    async def end(self, job_key: str, billed_usd: float | None) -> None:
        """The job ended: its bill replaces its estimate (0 when nothing was billed; None
        when unknown, so the estimate keeps counting), here and in the shared totals."""
        if (estimate := self._in_flight.pop(job_key, None)) is None:
            return
        self.spend.settle(estimate, billed_usd)
        if billed_usd:
            self.bills[job_key] = billed_usd
        await self._give_back(self._held.pop(job_key, []), billed_usd)

    @staticmethod
    async def _give_back(
        held: list[tuple[SharedTotal, Reservation]], billed_usd: float | None
    ) -> None:
        """Settle shared reservations to the bill, or release them when nothing was paid.

        A failed write is logged, never raised: the job is paid for already, and the
        stored reservation keeps counting its estimate until its day ends.
        """
        for total, reservation in held:
            try:
                if billed_usd == 0:
                    await to_thread.run_sync(total.release, reservation)
                else:
                    await to_thread.run_sync(total.settle, reservation, billed_usd)
            except Exception as error:
                logger.warning(
                    "Could not settle a reservation of %s (%s): it keeps counting its estimate",
                    reservation.cap_name,
                    error,
                )


def bill_after(error: BaseException) -> float | None:
    """What a job that ended with ``error`` was billed, as far as a budget can tell.

    Args:
        error: Why the job ended without a result.

    Returns:
        0 when provably nothing was billed (the API refused the submit, the job failed
        or was cancelled, a budget held it back); None when it may have been (its
        estimate keeps counting): an unknown submit outcome, a wait given up, a crash.
    """
    if isinstance(error, SubmitOutcomeUnknownError | WaitTimeoutError):
        return None
    if isinstance(error, RunComfyError | BudgetExceededError | RunStopped):
        return 0.0
    return None


@dataclass
class Pipeline:
    """What every job of one run shares, and the one sequence of its steps.

    Args:
        client: Sends, polls and cancels (shared by the run's jobs).
        store: Where the guard keeps the jobs' records.
        archive_uri: Where outputs and `metadata.json` go; None archives nothing (a
            job then ends "completed", its outputs in its result).
        stop: The run's stop.
        budget: The run's spend.
        observer: Told what happens.
        timeout_seconds: How long one job waits for its request.
        s3_client: For an S3 archive (None: boto3's default chain).
        flat: Write the outputs straight into `archive_uri`, named by the request
            (the CLI's `--out`), instead of a dated folder per request.
        log: Where the guard and the wait say what they do.
    """

    client: AsyncRunComfyClient
    store: RecordStore
    archive_uri: str | None = None
    stop: Stop = field(default_factory=Stop)
    budget: Budget = field(default_factory=Budget)
    observer: Observer = field(default_factory=Observer)
    timeout_seconds: float = 600.0
    s3_client: Any = None
    flat: bool = False
    log: Log = field(default_factory=lambda: logger)

    async def run(
        self, job: Job, request_ended: asyncio.Event | None = None, log: Log | None = None
    ) -> JobOutcome:
        """Take one job through its steps: submit at most once, wait, archive once.

        Args:
            job: The job.
            request_ended: Set once the request is over, before archiving starts (a
                batch's lane then starts its next job).
            log: Where this job's lines go (a batch row's task run).

        Returns:
            How the job ended (see `JobOutcome`).

        Raises:
            SubmitOutcomeUnknownError: A claim stopped mid-submit (now or earlier).
            JobFailedError: The job failed at RunComfy (its record says so: a rerun
                may pay for it again).
            RunComfyError: The submit was refused, or the API could not be reached.
            WaitTimeoutError: `timeout_seconds` passed (a queued request is withdrawn).
            ArchiveError: Outputs could not be archived (those archived are kept).
        """
        if log is not None:
            job.log = log
        if self.stop.is_set:
            return JobOutcome("not_started")
        bill: float | None = None  # unknown until the job tells: the estimate counts
        try:
            try:
                request = await self.submit(job)
            except BudgetExceededError as refusal:
                self.observer.held_back(job, refusal)
                return JobOutcome("over_budget", refusal=refusal)
            except RunStopped:
                return JobOutcome("not_started")
            except SubmitOutcomeUnknownError:
                raise  # it may have been billed: its estimate counts
            except RunComfyError:
                bill = 0.0  # refused by the API: not billed
                raise
            try:
                outcome, bill = await self._wait_and_archive(job, request, request_ended)
            except (JobFailedError, JobCancelledError):
                bill = 0.0  # a job that did not complete is not billed
                raise
            except WaitTimeoutError:
                # Waited `timeout_seconds` in vain: a request still queued is withdrawn,
                # so nothing is billed for it and a rerun submits the job again.
                bill = 0.0 if await self._let_go(job, request) else None
                raise
            finally:
                end_archiving_claim(request)
            return outcome
        finally:
            await self.budget.end(job.job_key, bill)

    async def submit(self, job: Job) -> SubmittedRequest:
        """The first step alone: the job's request, through the guard (the one its record
        names, resumed or adopted, else one paid submit within the budget).

        `run` starts with it; a surface that only submits (a task, a job block) calls it.

        Args:
            job: The job.

        Returns:
            Its request: submitted now, or `resumed` / `adopted`.

        Raises:
            BudgetExceededError: The budget held it back (nothing was sent).
            RunStopped: The run is stopping (nothing was sent).
            SubmitOutcomeUnknownError: A claim stopped mid-submit (now or earlier).
            RunComfyError: The submit was refused, or the API could not be reached.
        """
        edit, sources = job.edit, job.sources
        if edit is None and job.stage is not None:
            edit, sources = await to_thread.run_sync(job.stage)
            job.sources = sources

        async def before_submit() -> None:
            self.stop.check()
            if job.row_id:
                label = f"row {job.row} ({job.row_id})"
            else:
                label = f"flow run {job.run_id}" if job.run_id else job.job_key[:12]
            await self.budget.reserve(job.job_key, job.estimated_cost, label=label)

        known, job.known = job.known, Unread  # a retry reads the record afresh
        request = await submit_once(
            job.job_key,
            self.store,
            self.client,
            edit,
            facts={
                **job.facts,
                "model_id": NANO_BANANA_EDIT_MODEL_ID,
                "parameters": job.options,
                "sources": sources,
                "estimated_cost": job.estimated_cost,
            },
            before_submit=before_submit,
            known=known,
            hold_archiving=True,
            run_id=job.run_id,
            log=job.log or self.log,
        )
        job.request_id = request.request_id
        self.observer.holding(job, request)
        if not (request.resumed or request.adopted):
            await self.observer.submitted(job, request)
        return request

    async def _wait_and_archive(
        self, job: Job, request: SubmittedRequest, request_ended: asyncio.Event | None
    ) -> tuple[JobOutcome, float | None]:
        """Wait (until done or stopped), then archive once: the outcome and the bill."""
        waiting = self.client.wait(
            request.request_id,
            self.timeout_seconds,
            resolution=job.options.get("resolution"),
            on_status=partial(self.observer.status, job),
            submitted_at=request.submitted_at,
            log=job.log or self.log,
        )
        try:
            result = await self.stop.first(waiting)
        except (JobFailedError, JobCancelledError) as error:
            if not request.adopted:
                self.observer.failed(job, request, error)
            await mark_failed(self.store, job.job_key, error)
            if isinstance(error, JobCancelledError) and self.stop.is_set:
                # Withdrawn from outside while this run stopped (a runner's cancellation
                # hook): what the run's own let-go would have done. Not billed.
                return JobOutcome("stopped", request, withdrawn=True), 0.0
            raise
        except WaitTimeoutError:
            raise  # `run` lets go of the request
        except Exception:
            # Not archived here after all (a retry resumes the request): let go of the
            # archiving claimed with the request id, so no other run waits for it.
            await release_archiving(self.store, request)
            raise
        if result is None:  # the run is stopping
            withdrawn = await self._let_go(job, request)
            return JobOutcome("stopped", request, withdrawn=withdrawn), 0.0 if withdrawn else None
        if request_ended is not None:
            request_ended.set()  # first: the lane's next submit is the batch's critical path
        if not request.adopted:
            self.observer.ended(job, request, result)
        if self.archive_uri is None:
            return JobOutcome("completed", request, result), result.cost
        outcome = await self._archive(job, request, result)
        self.observer.archived(job, outcome)
        return outcome, result.cost

    async def _let_go(self, job: Job, request: SubmittedRequest) -> bool:
        """The job will not wait for its request any more: withdrawn through the guard if it
        is still queued (True), else left recorded for the next run to adopt."""
        reason = self.stop.description if self.stop.is_set else "its wait timed out"
        withdrawn = await let_go(
            self.store, self.client, request, reason=reason, log=job.log or self.log
        )
        if withdrawn:
            self.observer.withdrawn(job, request)
        return withdrawn

    async def _archive(
        self, job: Job, request: SubmittedRequest, result: RequestResult
    ) -> JobOutcome:
        """How an output reaches the archive: the archiving claimed once through the guard,
        the outputs and `metadata.json` written, the record marked archived."""
        assert self.archive_uri is not None
        status: OutcomeStatus = "adopted" if request.adopted else "archived"
        async with archive_claim(
            self.store,
            job.job_key,
            known=request.record,
            held_token=request.archiving_token,
            run_id=job.run_id,
        ) as turn:
            if turn.elsewhere is not None:
                return JobOutcome(status, request, result, archived_elsewhere=turn.elsewhere)
            metadata = ArchiveMetadata(
                prompt=job.prompt,
                parameters=job.options,
                model_id=NANO_BANANA_EDIT_MODEL_ID,
                sources=job.sources,
                row=job.row,
                row_id=job.row_id,
                created_at=result.created_at,
                finished_at=result.finished_at,
                cost=result.cost,
                flow_run_id=job.run_id,
            )
            record = await to_thread.run_sync(
                partial(
                    archive_outputs,
                    request.request_id,
                    result.output_urls,
                    date=result.created_at.date() if result.created_at else None,
                    archive_uri=self.archive_uri,
                    metadata=metadata,
                    s3_client=self.s3_client,
                    allowed_hosts=list(self.client.output_hosts),
                    check_target=False,
                    check_existing=turn.started_before,
                    thumbnails=job.thumbnails,
                    flat=self.flat,
                )
            )
            await mark_archived(
                self.store,
                job.job_key,
                metadata_location=record.metadata_location,
                output_locations=record.output_locations,
                cost=result.cost,
                known=turn.claim,
            )
        return JobOutcome(status, request, result, record=record)
