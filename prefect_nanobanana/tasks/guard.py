"""The one submit guard: a paid submit happens at most once per *job key*.

A submit is billed and the API has no idempotency key, so every path that
submits keeps a record per job key and never submits twice for one key:

1. Before sending, a "submitting" marker is written; once the request id exists,
   the id. For bare tasks both go to two places: Prefect's result store (works
   for tasks outside a flow run too) and the flow run's labels (on the API, so a
   rerun on another machine and an `on_cancellation` hook in the runner's process
   can read them after the flow's process is gone).
2. A retry of the task or the flow run, or a rerun after a crash, finds the record:
   a request id means "resume polling it"; a bare "submitting" marker means an
   attempt died mid-submit, whose outcome nobody knows, so it fails with
   `SubmitOutcomeUnknownError` rather than risk a second bill.
3. When the server provably refused the submit (auth, validation, balance, rate
   limit), the marker is cleared so a retry may submit.

The job key defaults to a hash of the flow run id and the inputs; pass `job_key`
to span flow runs, or to tell apart two identical edits in one run.

Also here: the one way to withdraw a request that is still queued when the run
that owns it stops for good (`cancel_if_queued`, and the `on_cancellation` hook
`cancel_recorded_requests` that reads the recorded ids back from the API).
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from typing import Any, Literal
from uuid import UUID, uuid4

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.loggers import flow_run_logger
from prefect.results import get_result_store
from prefect.states import State
from pydantic import BaseModel, Field

from .. import observe
from ..blocks.credentials import resolve_credentials, run_logger_or_none
from ..client import (
    NANO_BANANA_EDIT_MODEL_ID,
    NanoBananaEditInput,
    RequestHandle,
    RunComfyClient,
    RunComfyError,
    SubmitOutcomeUnknownError,
)

RECORD_LABEL_PREFIX = "nanobanana.job."
_SUBMITTING = "submitting"
_NOT_SUBMITTED = "not-submitted"


class SubmittedRequest(BaseModel):
    """The request a job key owns; `resumed` is True when an earlier attempt submitted it."""

    job_key: str
    request_id: str
    status_url: str | None = None
    result_url: str | None = None
    cancel_url: str | None = None
    submitted_at: datetime | None = Field(
        default=None, description="Unknown when resumed from a flow-run label alone."
    )
    resumed: bool = False


class _SubmitRecord(BaseModel):
    state: Literal["submitting", "submitted", "not_submitted"]
    request: SubmittedRequest | None = None


# --------------------------------------------------------------------------- job keys


def _job_scope() -> str:
    """What makes a default job key unique: the flow run, else the task run, else nothing."""
    flow_run_id = observe.current_flow_run_id()
    if flow_run_id:
        return str(flow_run_id)
    task_run_context = TaskRunContext.get()
    if task_run_context is not None:
        return str(task_run_context.task_run.id)
    # No run to resume: a fresh key, so identical inputs never alias an old job.
    return str(uuid4())


def default_job_key(edit: NanoBananaEditInput, scope: str) -> str:
    """A hash of the scope (usually the flow run id), the model and the inputs."""
    material = json.dumps(
        {"scope": scope, "model": NANO_BANANA_EDIT_MODEL_ID, "input": edit.model_dump(mode="json")},
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def _record_names(job_key: str) -> tuple[str, str]:
    """The result-store key and the flow-run label of a job key (safe for paths and labels)."""
    digest = hashlib.sha256(job_key.encode()).hexdigest()[:24]
    return f"nanobanana-submit-{digest}", f"{RECORD_LABEL_PREFIX}{digest}"


def _submit_run_name(parameters: dict[str, Any]) -> str:
    """`submit-edit-<job key>`: the request id does not exist yet when the run is named."""
    job_key = parameters.get("job_key")
    flow_run_context = FlowRunContext.get()
    if not job_key and flow_run_context is not None and flow_run_context.flow_run is not None:
        try:
            edit = NanoBananaEditInput.model_validate(parameters["edit"])
        except ValueError:
            return "submit-edit"  # the task itself reports the invalid input
        job_key = default_job_key(edit, str(flow_run_context.flow_run.id))
    return f"submit-edit-{job_key}" if job_key else "submit-edit"


# --------------------------------------------------------------------------- the record


def _label_record(value: Any) -> _SubmitRecord | None:
    if not isinstance(value, str) or not value:
        return None
    if value == _SUBMITTING:
        return _SubmitRecord(state="submitting")
    if value == _NOT_SUBMITTED:
        return _SubmitRecord(state="not_submitted")
    return _SubmitRecord(state="submitted", request=SubmittedRequest(job_key="", request_id=value))


def _label_value(record: _SubmitRecord) -> str:
    if record.request is not None:
        return record.request.request_id
    return _SUBMITTING if record.state == "submitting" else _NOT_SUBMITTED


def _merge(records: list[_SubmitRecord | None]) -> _SubmitRecord | None:
    """A known request id wins; else any "submitting" marker; else whatever says "free"."""
    known = [record for record in records if record is not None]
    for state in ("submitted", "submitting", "not_submitted"):
        for record in known:
            if record.state == state:
                return record
    return None


def recorded_request_ids(labels: dict[str, Any]) -> list[str]:
    """The request ids a flow run recorded in its labels, in the order they were made."""
    return [
        value
        for key, value in labels.items()
        if key.startswith(RECORD_LABEL_PREFIX)
        and isinstance(value, str)
        and value not in (_SUBMITTING, _NOT_SUBMITTED)
    ]


class _JobLedger:
    """The two records of one job key, read and written by `submit_edit`/`asubmit_edit`."""

    def __init__(self, job_key: str) -> None:
        self.job_key = job_key
        self.storage_key, self.label = _record_names(job_key)
        self.flow_run_id = observe.current_flow_run_id()
        self.store = get_result_store()
        # Whether this flow run's labels already name the request (see `labels_missing`).
        self.labelled = False

    @property
    def labels_missing(self) -> bool:
        """True when a request found elsewhere (another run's key) is not yet in this run's
        labels, where this run's cancellation hook looks for it."""
        return self.flow_run_id is not None and not self.labelled

    def _from_labels(self, labels: dict[str, Any]) -> _SubmitRecord | None:
        record = _label_record(labels.get(self.label))
        self.labelled = record is not None and record.request is not None
        return record

    def _found(self, records: list[_SubmitRecord | None]) -> _SubmitRecord | None:
        record = _merge(records)
        if record is not None and record.request is not None:
            record.request = record.request.model_copy(
                update={"job_key": self.job_key, "resumed": True}
            )
        return record

    def find(self) -> _SubmitRecord | None:
        records: list[_SubmitRecord | None] = []
        if self.store.exists(self.storage_key):
            records.append(_SubmitRecord.model_validate(self.store.read(self.storage_key).result))
        if self.flow_run_id is not None:
            with get_client(sync_client=True) as client:
                labels = client.read_flow_run(self.flow_run_id).labels
            records.append(self._from_labels(labels))
        return self._found(records)

    async def afind(self) -> _SubmitRecord | None:
        records: list[_SubmitRecord | None] = []
        if await self.store.aexists(self.storage_key):
            record = await self.store.aread(self.storage_key)
            records.append(_SubmitRecord.model_validate(record.result))
        if self.flow_run_id is not None:
            async with get_client() as client:
                labels = (await client.read_flow_run(self.flow_run_id)).labels
            records.append(self._from_labels(labels))
        return self._found(records)

    def write(self, record: _SubmitRecord) -> None:
        self.store.write(record.model_dump(mode="json"), key=self.storage_key)
        if self.flow_run_id is not None:
            with get_client(sync_client=True) as client:
                client.update_flow_run_labels(self.flow_run_id, {self.label: _label_value(record)})

    async def awrite(self, record: _SubmitRecord) -> None:
        await self.store.awrite(record.model_dump(mode="json"), key=self.storage_key)
        if self.flow_run_id is not None:
            async with get_client() as client:
                await client.update_flow_run_labels(
                    self.flow_run_id, {self.label: _label_value(record)}
                )


def _unknown_from_marker(job_key: str) -> SubmitOutcomeUnknownError:
    return SubmitOutcomeUnknownError(
        f"An earlier attempt of job {job_key!r} stopped while submitting, so RunComfy may or "
        "may not have accepted (and billed) that request. It was NOT submitted again. Check "
        "your RunComfy request history; to submit anew on purpose, run with a new job_key"
    )


def _submitted(job_key: str, handle: RequestHandle) -> SubmittedRequest:
    return SubmittedRequest(
        job_key=job_key,
        request_id=handle.request_id,
        status_url=handle.status_url,
        result_url=handle.result_url,
        cancel_url=handle.cancel_url,
        submitted_at=datetime.now(timezone.utc),
    )


def _resumed_or_raise(record: _SubmitRecord | None, job_key: str) -> SubmittedRequest | None:
    if record is None or record.state == "not_submitted":
        return None
    if record.request is None:
        raise _unknown_from_marker(job_key)
    logger = run_logger_or_none() or observe.logger
    logger.info(
        "Job %s already owns RunComfy request %s; resuming it instead of submitting again",
        job_key,
        record.request.request_id,
    )
    return record.request


def _record_failure_warning(submitted: SubmittedRequest) -> None:
    logger = run_logger_or_none() or observe.logger
    logger.warning(
        "Could not record RunComfy request %s for job %s; this run goes on with it, but a "
        "rerun after a crash will refuse to submit again until you check the request history",
        submitted.request_id,
        submitted.job_key,
        exc_info=True,
    )


# --------------------------------------------------------------------------- release


def cancel_if_queued(
    client: RunComfyClient,
    request_id: str,
    *,
    log: logging.Logger | logging.LoggerAdapter,
    flow_run_id: UUID | None = None,
) -> str | None:
    """Cancel `request_id` if it still waits in the queue; what happened, or None if over.

    Used when the Prefect run that owns a request stops for good: a queued job is
    withdrawn (nothing is billed), a running one is reported with its request id
    so its output can still be collected, and a finished one is left alone.
    """
    status = client.status(request_id)
    if status.is_terminal:
        return None
    if status.status == "in_progress":
        observe.log_cancel_outcome(log, request_id, "not_cancellable")
        return "not_cancellable"
    outcome = client.cancel(request_id).outcome
    observe.log_cancel_outcome(log, request_id, outcome)
    if outcome == "cancelled":
        observe.emit_request_event(observe.EVENT_CANCELLED, request_id, flow_run_id=flow_run_id)
    return outcome


def cancel_recorded_requests(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:
    """`on_cancellation` hook: withdraw the queued requests a flow run recorded.

    It may run in the runner's process after the flow's process was killed, so
    it knows nothing from memory: it reads the flow run's labels (the request ids
    `submit_edit` recorded) and its `credentials` parameter back from the API.
    Running it twice (in the flow's process and in the runner's) is harmless: a
    request already cancelled is finished and left alone.
    """
    log = flow_run_logger(flow_run, flow)
    with get_client(sync_client=True) as prefect_client:
        fresh = prefect_client.read_flow_run(flow_run.id)
    request_ids = recorded_request_ids(fresh.labels or {})
    if not request_ids:
        return
    credentials = resolve_credentials(fresh.parameters.get("credentials"))
    with credentials.get_client() as client:
        for request_id in request_ids:
            try:
                cancel_if_queued(client, request_id, log=log, flow_run_id=flow_run.id)
            except RunComfyError as error:
                log.warning("Could not cancel RunComfy request %s: %s", request_id, error)
