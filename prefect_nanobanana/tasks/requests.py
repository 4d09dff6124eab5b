"""Prefect tasks for RunComfy requests: submit at most once, poll, fetch, cancel, wait.

`submit_edit` is the pipeline's submit step (`Pipeline.submit`, through the one
submit guard), with its records in Prefect's result store and the flow run's
labels (`records.PrefectRecordStore`), so a retry, a rerun or another run with the
same `job_key` never pays twice.

Every task has one async body; `submit_edit` and `asubmit_edit` (and each other
pair) are its sync and async faces (`options.sync_and_async_tasks`). Status and
result polls never cache and Prefect retries them only for transient errors;
auth, validation and balance errors fail at once.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from .. import observe
from ..blocks.credentials import RunComfyCredentials, run_logger_or_none
from ..client import (
    DEFAULT_WAIT_TIMEOUT,
    NANO_BANANA_EDIT_MODEL_ID,
    CancelResult,
    JobCancelledError,
    JobFailedError,
    NanoBananaEditInput,
    RequestResult,
    RequestStatus,
    RunComfyError,
)
from ..guard.protocol import SubmittedRequest, let_go, log_cancel_outcome
from ..pipeline import Job, Observer, Pipeline
from ..stop import Stop
from .guard import default_job_key, job_scope, run_id, run_log, submit_run_name
from .options import TASK_OPTIONS, retry_if_transient, sync_and_async_tasks
from .records import PrefectRecordStore

REQUEST_TASK_OPTIONS: dict[str, Any] = {"retry_condition_fn": retry_if_transient, **TASK_OPTIONS}


class RequestOutcome(BaseModel):
    """How a request ended, as `wait_for_request` saw it."""

    request_id: str
    status: str
    statuses: list[str]
    output_urls: list[str]
    cost: float | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    waited_seconds: float
    result: RequestResult


async def _submit_edit_once(
    edit: NanoBananaEditInput | dict[str, Any],
    credentials: RunComfyCredentials | None = None,
    job_key: str | None = None,
) -> SubmittedRequest:
    """Submit a Nano Banana Pro edit at most once per job key (through the submit guard).

    Args:
        edit: The edit's inputs, validated before anything is sent or recorded.
        credentials: RunComfy credentials; None uses the environment variables.
        job_key: Names the logical job. Defaults to a hash of the flow run id and
            the inputs, so a retry or rerun of the same flow run resumes its request;
            the same key in another run adopts the request instead of paying again.

    Returns:
        The request this job owns: `resumed` if an earlier attempt of this run made
        it, `adopted` if another run did.

    Raises:
        SubmitOutcomeUnknownError: A submit with this key may have been billed and its
            outcome is unknown (a 5xx or a timeout after sending, a process that died
            mid-submit); it is never resent.
        AuthenticationError: The API token was refused.
        InsufficientBalanceError: The account balance is too low.
        pydantic.ValidationError: The edit is not valid (nothing was sent).

    Example:
        ```python
        from prefect import flow
        from prefect_nanobanana.tasks import submit_edit, wait_for_request

        @flow
        def edit(url: str) -> list[str]:
            submitted = submit_edit({"prompt": "Add snow", "image_urls": [url]})
            return wait_for_request(submitted.request_id).output_urls
        ```
    """
    return await asubmit_through_pipeline(
        NanoBananaEditInput.model_validate(edit),
        credentials or RunComfyCredentials(),
        job_key,
        log=run_log(),
    )


async def asubmit_through_pipeline(
    edit: NanoBananaEditInput,
    credentials: RunComfyCredentials,
    job_key: str | None,
    *,
    log: logging.Logger | logging.LoggerAdapter,
) -> SubmittedRequest:
    """The submit step alone (`Pipeline.submit`), with its records in Prefect's result
    store: what `submit_edit` and `NanoBananaEditJob.trigger` do.

    Args:
        edit: The edit, validated.
        credentials: Who submits it.
        job_key: The job's name across runs; None: a key scoped to this run
            (`default_job_key`), so a retry of the run resumes its request.
        log: Where the guard and the announcement of a fresh submit say what they do.

    Returns:
        The request the job owns: submitted now, or `resumed` / `adopted`.

    Raises:
        SubmitOutcomeUnknownError: A submit with this key may have been billed and its
            outcome is unknown; it is never resent.
        RunComfyError: The submit was refused, or the API could not be reached.
    """
    store = PrefectRecordStore()
    if job_key:
        store.warn_if_machine_local()
    job = edit_job(edit, job_key or default_job_key(edit, job_scope()))
    async with credentials.get_async_client() as client:
        pipeline = Pipeline(client, store, observer=RequestObserver(store, log), log=log)
        return await pipeline.submit(job)


def edit_job(edit: NanoBananaEditInput, job_key: str, **fields: Any) -> Job:
    """A single edit as the pipeline's `Job`, for this run.

    Args:
        edit: The edit to send (its inputs staged).
        job_key: The job's key.
        **fields: More of the job's fields (`sources`, `estimated_cost`), or other
            `options` than every field of the edit but its prompt and images.

    Returns:
        The `Job`.
    """
    fields.setdefault("options", _parameters(edit))
    return Job(job_key=job_key, prompt=edit.prompt, edit=edit, run_id=run_id(), **fields)


class RequestObserver(Observer):
    """A single edit's notices as Prefect sees them (a task, a job block, an edit flow).

    A fresh submit is announced (log line, event, the request's note artifact); a
    request resumed or adopted is named in this run's labels, where the run's
    cancellation hook looks for its requests; the statuses seen are collected
    (`trail`), and how the request ended is kept for `arecord_outcome`.

    Args:
        store: The run's record store.
        log: The run's logger.
    """

    def __init__(
        self, store: PrefectRecordStore, log: logging.Logger | logging.LoggerAdapter
    ) -> None:
        self.store = store
        self.log = log
        self.trail = _StatusTrail()
        self._outcome_row: dict[str, Any] | None = None

    def holding(self, job: Job, request: SubmittedRequest) -> None:
        if request.resumed or request.adopted:
            self.store.ensure_label(job.job_key, request.request_id)

    async def submitted(self, job: Job, request: SubmittedRequest) -> None:
        await observe.aannounce_submitted(
            self.log,
            request.request_id,
            job.job_key,
            result_url=request.result_url,
            model_id=NANO_BANANA_EDIT_MODEL_ID,
        )

    def status(self, job: Job, status: RequestStatus) -> None:
        self.trail(status)

    def ended(self, job: Job, request: SubmittedRequest, result: RequestResult) -> None:
        self._outcome_row = _success_row(self.trail.outcome(result))

    def failed(self, job: Job, request: SubmittedRequest, error: RunComfyError) -> None:
        self._outcome_row = self.trail.failure_row(request.request_id, error)

    def withdrawn(self, job: Job, request: SubmittedRequest) -> None:
        observe.emit_request_event(observe.EVENT_CANCELLED, request.request_id)

    async def arecord_outcome(self) -> None:
        """The final event and outcome table of the request this run paid for, once it ended
        (an adopted request's are its submitter's)."""
        if self._outcome_row is not None:
            await observe.arecord_outcome(self._outcome_row)


def _parameters(edit: NanoBananaEditInput) -> dict[str, Any]:
    return edit.model_dump(mode="json", exclude={"prompt", "image_urls"})


submit_edit, asubmit_edit = sync_and_async_tasks(
    _submit_edit_once,
    public_name="submit_edit",
    defer_signals=True,
    name="submit-edit",
    task_run_name=submit_run_name,
    **REQUEST_TASK_OPTIONS,
)


async def _get_request_status(
    request_id: str, credentials: RunComfyCredentials | None = None
) -> RequestStatus:
    """A request's current status. Never cached: every run asks the API.

    Args:
        request_id: The request.
        credentials: RunComfy credentials; None uses the environment variables.

    Returns:
        The `RequestStatus` (`status`, and `queue_position` while queued).

    Raises:
        NotFoundError: RunComfy knows no such request.
        RunComfyError: The API refused or could not be reached (transient errors
            are retried by the client, then by Prefect).
    """
    async with (credentials or RunComfyCredentials()).get_async_client() as client:
        return await client.status(request_id)


get_request_status, aget_request_status = sync_and_async_tasks(
    _get_request_status,
    name="get-request-status",
    task_run_name="status-{request_id}",
    **REQUEST_TASK_OPTIONS,
)


async def _get_request_result(
    request_id: str, credentials: RunComfyCredentials | None = None
) -> RequestResult:
    """A request's result with its cost; while unfinished, its current status.

    Args:
        request_id: The request.
        credentials: RunComfy credentials; None uses the environment variables.

    Returns:
        The `RequestResult` (`status`, `output_urls`, `cost`, times).

    Raises:
        NotFoundError: RunComfy knows no such request.
        RunComfyError: The API refused or could not be reached (after retries).
    """
    async with (credentials or RunComfyCredentials()).get_async_client() as client:
        return await client.result(request_id)


get_request_result, aget_request_result = sync_and_async_tasks(
    _get_request_result,
    name="get-request-result",
    task_run_name="result-{request_id}",
    **REQUEST_TASK_OPTIONS,
)


async def _cancel_request(
    request_id: str, credentials: RunComfyCredentials | None = None
) -> CancelResult:
    """Cancel a queued request, and log and announce the outcome.

    Args:
        request_id: The request.
        credentials: RunComfy credentials; None uses the environment variables.

    Returns:
        The `CancelResult`: `outcome` is `cancelled` (a `nanobanana.request.cancelled`
        event follows), or `not_cancellable` for a request already running (it runs
        on, and is billed).

    Raises:
        RunComfyError: The API refused or could not be reached (after retries).
    """
    async with (credentials or RunComfyCredentials()).get_async_client() as client:
        result = await client.cancel(request_id)
    log_cancel_outcome(run_logger_or_none() or observe.logger, result.request_id, result.outcome)
    if result.outcome == "cancelled":
        observe.emit_request_event(observe.EVENT_CANCELLED, result.request_id)
    return result


cancel_request, acancel_request = sync_and_async_tasks(
    _cancel_request,
    name="cancel-request",
    task_run_name="cancel-{request_id}",
    **REQUEST_TASK_OPTIONS,
)


async def _let_go_of_request(
    submitted: SubmittedRequest, reason: str, credentials: RunComfyCredentials | None = None
) -> bool:
    """A run that is stopping lets go of its request, through the guard (`withdraw`).

    A queued request is cancelled at RunComfy (nothing is billed), its record in the
    run's result store says "withdrawn" so a retry submits the job again, and an
    event says so. A running one cannot be withdrawn: it stays recorded, for a retry
    or another run with its job key to adopt.

    Args:
        submitted: The request the run holds (what `submit_edit` returned).
        reason: Why the run stops, for the log.
        credentials: RunComfy credentials; None uses the environment variables.

    Returns:
        True when the request was withdrawn.
    """
    async with (credentials or RunComfyCredentials()).get_async_client() as client:
        withdrawn = await let_go(
            PrefectRecordStore(), client, submitted, reason=reason, log=run_log()
        )
    if withdrawn:
        observe.emit_request_event(observe.EVENT_CANCELLED, submitted.request_id)
    return withdrawn


let_go_of_request, alet_go_of_request = sync_and_async_tasks(
    _let_go_of_request,
    name="let-go-of-request",
    task_run_name="let-go-{submitted.request_id}",
    **REQUEST_TASK_OPTIONS,
)


class _StatusTrail:
    """Collects the distinct statuses a wait passes through (the `on_status` callback)."""

    def __init__(self) -> None:
        self.statuses: list[str] = []
        self.started = time.monotonic()

    def __call__(self, status: RequestStatus) -> None:
        if not self.statuses or self.statuses[-1] != status.status:
            self.statuses.append(status.status)

    def outcome(self, result: RequestResult) -> RequestOutcome:
        if not self.statuses or self.statuses[-1] != result.status:
            self.statuses.append(result.status)
        return RequestOutcome(
            request_id=result.request_id,
            status=result.status,
            statuses=self.statuses,
            output_urls=result.output_urls,
            cost=result.cost,
            created_at=result.created_at,
            finished_at=result.finished_at,
            waited_seconds=time.monotonic() - self.started,
            result=result,
        )

    def failure_row(self, request_id: str, error: RunComfyError) -> dict[str, Any]:
        """The outcome row of a job that ended failed or cancelled."""
        status = "cancelled" if isinstance(error, JobCancelledError) else "failed"
        if not self.statuses or self.statuses[-1] != status:
            self.statuses.append(status)
        return observe.outcome_row(
            request_id=request_id,
            status=status,
            statuses=self.statuses,
            seconds=time.monotonic() - self.started,
            error=str(error),
        )


def _success_row(outcome: RequestOutcome) -> dict[str, Any]:
    return observe.outcome_row(
        request_id=outcome.request_id,
        status=outcome.status,
        statuses=outcome.statuses,
        output_urls=outcome.output_urls,
        cost=outcome.cost,
        submitted_at=outcome.created_at,
        finished_at=outcome.finished_at,
        seconds=outcome.waited_seconds,
    )


async def _wait_for_request(
    request_id: str,
    credentials: RunComfyCredentials | None = None,
    timeout_seconds: float | None = DEFAULT_WAIT_TIMEOUT,
    resolution: str | None = None,
    submitted_at: datetime | None = None,
    stop: Stop | None = None,
) -> RequestOutcome | None:
    """Poll until the request ends; its outcome, or JobFailed/JobCancelled/WaitTimeout.

    Each status change is logged to the run (request id, queue position, elapsed);
    the final event and an outcome table artifact record how it ended. A retry
    resumes polling the same request id.

    Args:
        request_id: The request to follow.
        credentials: RunComfy credentials; None uses the environment variables.
        timeout_seconds: Give up waiting after this long (the job may still run);
            30 minutes by default, None waits without limit.
        resolution: The edit's resolution, so polling can expect its run time.
        submitted_at: When the request was submitted, so a retry of this task does
            not poll as if the job had just started.
        stop: The run's `Stop` (see `flows.stopping.RunStop`): once it is set, the
            wait ends at its next await and returns None. The request is left as it
            is; the caller lets go of it (`let_go_of_request`).

    Returns:
        The `RequestOutcome`: status, the statuses seen, output URLs, cost, times;
        None when `stop` ended the wait.

    Raises:
        JobFailedError: The job failed at RunComfy.
        JobCancelledError: The job was cancelled.
        WaitTimeoutError: `timeout_seconds` passed first; the job may still finish.
    """
    trail = _StatusTrail()
    async with (credentials or RunComfyCredentials()).get_async_client() as client:
        waiting = client.wait(
            request_id,
            timeout_seconds,
            resolution=resolution,
            on_status=trail,
            submitted_at=submitted_at,
        )
        try:
            result = await (stop.first(waiting) if stop is not None else waiting)
        except (JobFailedError, JobCancelledError) as error:
            await observe.arecord_outcome(trail.failure_row(request_id, error))
            raise
    if result is None:
        return None
    outcome = trail.outcome(result)
    await observe.arecord_outcome(_success_row(outcome))
    return outcome


wait_for_request, await_for_request = sync_and_async_tasks(
    _wait_for_request,
    name="wait-for-request",
    task_run_name="wait-{request_id}",
    **REQUEST_TASK_OPTIONS,
)
