"""Prefect tasks for RunComfy requests: submit at most once, poll, fetch, cancel, wait.

`submit_edit` goes through the one submit guard (`guard.py`), which keeps a record
per job key so a retry, a rerun or a second run never pays twice.

Status and result polls never cache (`NO_CACHE`) and Prefect retries them only for
transient errors; auth, validation and balance errors fail at once.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from prefect import task
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
    SubmitOutcomeUnknownError,
)
from .guard import (
    SubmittedRequest,
    _job_scope,
    _JobLedger,
    _record_failure_warning,
    _resumed_or_raise,
    _submit_run_name,
    _SubmitRecord,
    _submitted,
    default_job_key,
)
from .options import TASK_OPTIONS, retry_if_transient


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


def _announce(submitted: SubmittedRequest) -> None:
    """Log and emit the submit; the link artifact is made by the caller (sync or async)."""
    logger = run_logger_or_none() or observe.logger
    logger.info(
        "Submitted RunComfy request %s (job key %s)", submitted.request_id, submitted.job_key
    )
    observe.emit_request_event(
        observe.EVENT_SUBMITTED,
        submitted.request_id,
        payload={"job_key": submitted.job_key, "model_id": NANO_BANANA_EDIT_MODEL_ID},
    )


# --------------------------------------------------------------------------- submit


@task(
    name="submit-edit",
    task_run_name=_submit_run_name,
    retry_condition_fn=retry_if_transient,
    **TASK_OPTIONS,
)
def submit_edit(
    edit: NanoBananaEditInput | dict[str, Any],
    credentials: RunComfyCredentials | None = None,
    job_key: str | None = None,
) -> SubmittedRequest:
    """Submit a Nano Banana Pro edit at most once per job key; see the module docstring.

    Args:
        edit: The edit's inputs, validated before anything is sent or recorded.
        credentials: RunComfy credentials; None uses the environment variables.
        job_key: Names the logical job. Defaults to a hash of the flow run id and
            the inputs, so a retry or rerun of the same flow run resumes its request.

    Returns:
        The request this job owns, `resumed=True` if an earlier attempt made it.
    """
    edit = NanoBananaEditInput.model_validate(edit)
    credentials = credentials or RunComfyCredentials()
    job_key = job_key or default_job_key(edit, _job_scope())
    ledger = _JobLedger(job_key)
    resumed = _resumed_or_raise(ledger.find(), job_key)
    if resumed is not None:
        if ledger.labels_missing:
            ledger.write(_SubmitRecord(state="submitted", request=resumed))
        return resumed
    ledger.write(_SubmitRecord(state="submitting"))
    try:
        with credentials.get_client() as client:
            handle = client.submit_edit(edit)
    except SubmitOutcomeUnknownError:
        raise  # the marker stays: a rerun must not submit blindly
    except RunComfyError:
        ledger.write(_SubmitRecord(state="not_submitted"))
        raise
    submitted = _submitted(job_key, handle)
    try:
        ledger.write(_SubmitRecord(state="submitted", request=submitted))
    except Exception:
        _record_failure_warning(submitted)
    _announce(submitted)
    observe.link_request(submitted.request_id, submitted.result_url, job_key)
    return submitted


@task(
    name="submit-edit",
    task_run_name=_submit_run_name,
    retry_condition_fn=retry_if_transient,
    **TASK_OPTIONS,
)
async def asubmit_edit(
    edit: NanoBananaEditInput | dict[str, Any],
    credentials: RunComfyCredentials | None = None,
    job_key: str | None = None,
) -> SubmittedRequest:
    """The async twin of `submit_edit`, with the same at-most-once record."""
    edit = NanoBananaEditInput.model_validate(edit)
    credentials = credentials or RunComfyCredentials()
    job_key = job_key or default_job_key(edit, _job_scope())
    ledger = _JobLedger(job_key)
    resumed = _resumed_or_raise(await ledger.afind(), job_key)
    if resumed is not None:
        if ledger.labels_missing:
            await ledger.awrite(_SubmitRecord(state="submitted", request=resumed))
        return resumed
    await ledger.awrite(_SubmitRecord(state="submitting"))
    try:
        async with credentials.get_async_client() as client:
            handle = await client.submit_edit(edit)
    except SubmitOutcomeUnknownError:
        raise
    except RunComfyError:
        await ledger.awrite(_SubmitRecord(state="not_submitted"))
        raise
    submitted = _submitted(job_key, handle)
    try:
        await ledger.awrite(_SubmitRecord(state="submitted", request=submitted))
    except Exception:
        _record_failure_warning(submitted)
    _announce(submitted)
    await observe.alink_request(submitted.request_id, submitted.result_url, job_key)
    return submitted


# --------------------------------------------------------------------------- reads


@task(
    name="get-request-status",
    task_run_name="status-{request_id}",
    retry_condition_fn=retry_if_transient,
    **TASK_OPTIONS,
)
def get_request_status(
    request_id: str, credentials: RunComfyCredentials | None = None
) -> RequestStatus:
    """The request's current status (and queue position while queued)."""
    with (credentials or RunComfyCredentials()).get_client() as client:
        return client.status(request_id)


@task(
    name="get-request-status",
    task_run_name="status-{request_id}",
    retry_condition_fn=retry_if_transient,
    **TASK_OPTIONS,
)
async def aget_request_status(
    request_id: str, credentials: RunComfyCredentials | None = None
) -> RequestStatus:
    """The async twin of `get_request_status`."""
    async with (credentials or RunComfyCredentials()).get_async_client() as client:
        return await client.status(request_id)


@task(
    name="get-request-result",
    task_run_name="result-{request_id}",
    retry_condition_fn=retry_if_transient,
    **TASK_OPTIONS,
)
def get_request_result(
    request_id: str, credentials: RunComfyCredentials | None = None
) -> RequestResult:
    """The request's result with its cost; while unfinished, its current status."""
    with (credentials or RunComfyCredentials()).get_client() as client:
        return client.result(request_id)


@task(
    name="get-request-result",
    task_run_name="result-{request_id}",
    retry_condition_fn=retry_if_transient,
    **TASK_OPTIONS,
)
async def aget_request_result(
    request_id: str, credentials: RunComfyCredentials | None = None
) -> RequestResult:
    """The async twin of `get_request_result`."""
    async with (credentials or RunComfyCredentials()).get_async_client() as client:
        return await client.result(request_id)


def _after_cancel(result: CancelResult) -> CancelResult:
    observe.log_cancel_outcome(
        run_logger_or_none() or observe.logger, result.request_id, result.outcome
    )
    if result.outcome == "cancelled":
        observe.emit_request_event(observe.EVENT_CANCELLED, result.request_id)
    return result


@task(
    name="cancel-request",
    task_run_name="cancel-{request_id}",
    retry_condition_fn=retry_if_transient,
    **TASK_OPTIONS,
)
def cancel_request(request_id: str, credentials: RunComfyCredentials | None = None) -> CancelResult:
    """Cancel a queued request; one already running says `not_cancellable` and runs on."""
    with (credentials or RunComfyCredentials()).get_client() as client:
        return _after_cancel(client.cancel(request_id))


@task(
    name="cancel-request",
    task_run_name="cancel-{request_id}",
    retry_condition_fn=retry_if_transient,
    **TASK_OPTIONS,
)
async def acancel_request(
    request_id: str, credentials: RunComfyCredentials | None = None
) -> CancelResult:
    """The async twin of `cancel_request`."""
    async with (credentials or RunComfyCredentials()).get_async_client() as client:
        return _after_cancel(await client.cancel(request_id))


# --------------------------------------------------------------------------- wait


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


@task(
    name="wait-for-request",
    task_run_name="wait-{request_id}",
    retry_condition_fn=retry_if_transient,
    **TASK_OPTIONS,
)
def wait_for_request(
    request_id: str,
    credentials: RunComfyCredentials | None = None,
    timeout_seconds: float | None = DEFAULT_WAIT_TIMEOUT,
    resolution: str | None = None,
    submitted_at: datetime | None = None,
) -> RequestOutcome:
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
    """
    trail = _StatusTrail()
    with (credentials or RunComfyCredentials()).get_client() as client:
        try:
            result = client.wait(
                request_id,
                timeout_seconds,
                resolution=resolution,
                on_status=trail,
                submitted_at=submitted_at,
            )
        except (JobFailedError, JobCancelledError) as error:
            observe.record_outcome(trail.failure_row(request_id, error))
            raise
    outcome = trail.outcome(result)
    observe.record_outcome(_success_row(outcome))
    return outcome


@task(
    name="wait-for-request",
    task_run_name="wait-{request_id}",
    retry_condition_fn=retry_if_transient,
    **TASK_OPTIONS,
)
async def await_for_request(
    request_id: str,
    credentials: RunComfyCredentials | None = None,
    timeout_seconds: float | None = DEFAULT_WAIT_TIMEOUT,
    resolution: str | None = None,
    submitted_at: datetime | None = None,
) -> RequestOutcome:
    """The async twin of `wait_for_request`."""
    trail = _StatusTrail()
    async with (credentials or RunComfyCredentials()).get_async_client() as client:
        try:
            result = await client.wait(
                request_id,
                timeout_seconds,
                resolution=resolution,
                on_status=trail,
                submitted_at=submitted_at,
            )
        except (JobFailedError, JobCancelledError) as error:
            await observe.arecord_outcome(trail.failure_row(request_id, error))
            raise
    outcome = trail.outcome(result)
    await observe.arecord_outcome(_success_row(outcome))
    return outcome
