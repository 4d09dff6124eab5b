"""The submit guard inside a Prefect run: who the run is, where it logs, how it cancels.

The guard itself (`prefect_nanobanana.guard`) knows nothing of Prefect. A run
gives it three things, all from here: the scope of its default job keys
(`job_scope`: the flow run, or the parent task run of a subflow), its identity
as a claim's owner (`run_id`), and its logger (`run_log`). And when the run is
stopped for good outside its own process, the `on_cancellation` hook
`cancel_recorded_requests` reads the request ids the run recorded in its labels
back from the API and withdraws the queued ones.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID, uuid4

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.loggers import flow_run_logger
from prefect.states import State

from .. import observe
from ..blocks.credentials import RunComfyCredentials, resolve_credentials, run_logger_or_none
from ..client import NanoBananaEditInput, RunComfyClient, RunComfyError
from ..guard.protocol import cancel_if_queued
from ..storage import job_key_for
from .records import recorded_request_ids

__all__ = [
    "cancel_recorded_requests",
    "default_job_key",
    "job_scope",
    "run_id",
    "run_log",
    "submit_run_name",
    "withdraw_if_queued",
]


def run_id() -> str | None:
    """This flow run's id as a claim's owner names it (None outside a run)."""
    flow_run_id = observe.current_flow_run_id()
    return str(flow_run_id) if flow_run_id else None


def run_log() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger inside a run (its lines reach Prefect's UI), else the package's."""
    return run_logger_or_none() or observe.logger


def job_scope() -> str:
    """What makes a default job key unique: the run whose retries resume the same request.

    That is the flow run, except for a subflow: when its parent flow is retried,
    Prefect starts a fresh run of a subflow that did not complete, under the same
    parent task run. Scoped by its own run id, that retry paid for the edit again;
    scoped by the parent task run, it finds the request the first run paid for (and
    each call of a subflow in the parent is still a job of its own). Else the task
    run, else nothing.
    """
    flow_run_context = FlowRunContext.get()
    flow_run = flow_run_context.flow_run if flow_run_context is not None else None
    if flow_run is not None and flow_run.parent_task_run_id is not None:
        return f"subflow:{flow_run.parent_task_run_id}"
    flow_run_id = observe.current_flow_run_id()
    if flow_run_id:
        return str(flow_run_id)
    task_run_context = TaskRunContext.get()
    if task_run_context is not None:
        return str(task_run_context.task_run.id)
    # No run to resume: a fresh key, so identical inputs never alias an old job.
    return str(uuid4())


def default_job_key(edit: NanoBananaEditInput, scope: str) -> str:
    """The job key of an edit within a scope: the same edit in the same scope, the same key.

    Args:
        edit: The edit (prompt, images as given, options).
        scope: What the key is unique within: usually the flow run id, or a
            subflow's parent task run.

    Returns:
        A sha256 hex digest (`storage.job_key_for`).
    """
    options = edit.model_dump(mode="json", exclude={"prompt", "image_urls"})
    return job_key_for(edit.prompt, edit.image_urls, options, scope=scope)


def submit_run_name(parameters: dict[str, Any]) -> str:
    """`submit-edit-<short job key>`: the request id does not exist yet when the run is named.

    Eight hex digits tell a run's submits apart in the UI; the full key is in the
    task's parameters and in the request's artifact.
    """
    job_key = parameters.get("job_key")
    flow_run_context = FlowRunContext.get()
    if not job_key and flow_run_context is not None and flow_run_context.flow_run is not None:
        try:
            job_key = default_job_key(
                NanoBananaEditInput.model_validate(parameters["edit"]), job_scope()
            )
        except ValueError:
            # The task itself reports the invalid input; a name function that raises
            # leaves its task run Pending for good.
            return "submit-edit"
    return f"submit-edit-{job_key[:8]}" if job_key else "submit-edit"


def _cancel_and_tell(
    client: RunComfyClient,
    request_id: str,
    log: logging.Logger | logging.LoggerAdapter,
    flow_run_id: UUID | None = None,
) -> str | None:
    """`cancel_if_queued`, and an event when it withdrew the request inside a run."""
    outcome = cancel_if_queued(client, request_id, log=log)
    if outcome == "cancelled" and (flow_run_id or observe.current_flow_run_id()):
        observe.emit_request_event(observe.EVENT_CANCELLED, request_id, flow_run_id=flow_run_id)
    return outcome


def withdraw_if_queued(
    credentials: RunComfyCredentials,
    request_id: str,
    *,
    log: logging.Logger | logging.LoggerAdapter,
    flow_run_id: UUID | None = None,
) -> str | None:
    """Cancel `request_id` if it is still queued, with a client of its own, for a run that
    is stopping; an event says so when it was withdrawn.

    Args:
        credentials: The run's RunComfy credentials.
        request_id: The request to withdraw.
        log: Where to say what happened.
        flow_run_id: The run the event is about, when called outside its context.

    Returns:
        "cancelled", "not_cancellable", or None when the request is over or the API
        could not be asked (logged).
    """
    try:
        with credentials.get_client() as client:
            return _cancel_and_tell(client, request_id, log, flow_run_id)
    except RunComfyError as error:
        log.warning("Could not cancel RunComfy request %s: %s", request_id, error)
        return None


def cancel_recorded_requests(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:
    """`on_cancellation` hook: withdraw the queued requests a flow run recorded.

    It may run in the runner's process after the flow's process was killed, so
    it knows nothing from memory: it reads the flow run's labels (the request ids
    `submit_edit` recorded) and its `credentials` parameter back from the API.
    Running it twice (in the flow's process and in the runner's) is harmless: a
    request already cancelled is finished and left alone.

    Args:
        flow: The flow being cancelled (Prefect passes it).
        flow_run: Its flow run.
        state: The Cancelling or Cancelled state.
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
                _cancel_and_tell(client, request_id, log, flow_run.id)
            except RunComfyError as error:
                log.warning("Could not cancel RunComfy request %s: %s", request_id, error)
