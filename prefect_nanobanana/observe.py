"""What a RunComfy request leaves behind in Prefect: events, artifacts and their names.

Every event name and artifact key of the package lives here, so automations and
dashboards have one file to read. Each request is its own event resource
(`runcomfy.request.<id>`), related to the flow run that owns it, so an
automation can react to "any Nano Banana request failed" without knowing flows.

Observability is best effort: a request that is already paid for must not fail
because an artifact could not be written, so failures here are logged, not raised.
Nothing here ever sees a token: only request ids, URLs and outcomes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.artifacts import acreate_link_artifact, acreate_table_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.events import emit_event
from prefect.logging import get_logger

EVENT_PREFIX = "nanobanana.request"
EVENT_SUBMITTED = f"{EVENT_PREFIX}.submitted"
EVENT_COMPLETED = f"{EVENT_PREFIX}.completed"
EVENT_FAILED = f"{EVENT_PREFIX}.failed"
EVENT_CANCELLED = f"{EVENT_PREFIX}.cancelled"
REQUEST_EVENTS = (EVENT_SUBMITTED, EVENT_COMPLETED, EVENT_FAILED, EVENT_CANCELLED)

# A batch row that `max_cost_usd` held back: no request exists, so the resource is the job.
EVENT_ROW_OVER_BUDGET = "nanobanana.row.over_budget"

# The final status of a request -> the event that announces it.
EVENT_FOR_STATUS = {
    "completed": EVENT_COMPLETED,
    "failed": EVENT_FAILED,
    "cancelled": EVENT_CANCELLED,
}

OUTCOME_TABLE_KEY = "nanobanana-request-outcomes"
_MAX_URL_CHARS = 200

logger = get_logger("prefect_nanobanana.observe")


def current_flow_run_id() -> UUID | None:
    """The flow run this code runs in (also from inside a task), or None."""
    task_run_context = TaskRunContext.get()
    if task_run_context is not None and task_run_context.task_run.flow_run_id:
        return task_run_context.task_run.flow_run_id
    flow_run_context = FlowRunContext.get()
    if flow_run_context is not None and flow_run_context.flow_run is not None:
        return flow_run_context.flow_run.id
    return None


def request_resource(request_id: str) -> dict[str, str]:
    """The event resource that stands for one RunComfy request."""
    return {
        "prefect.resource.id": f"runcomfy.request.{request_id}",
        "prefect.resource.name": request_id,
    }


def emit_request_event(
    event: str,
    request_id: str,
    *,
    payload: dict[str, Any] | None = None,
    flow_run_id: UUID | None = None,
) -> None:
    """Emit one of `REQUEST_EVENTS` about `request_id`, related to its flow run.

    `flow_run_id` is for callers outside the run's context (an on_cancellation
    hook in the runner's process); inside a run it is found from the context.
    """
    _emit(event, request_resource(request_id), request_id, payload, flow_run_id)


def emit_over_budget_event(job_key: str, payload: dict[str, Any]) -> None:
    """Emit `EVENT_ROW_OVER_BUDGET` about the job `job_key` (a row with no request)."""
    resource = {
        "prefect.resource.id": f"nanobanana.job.{job_key}",
        "prefect.resource.name": job_key,
    }
    _emit(EVENT_ROW_OVER_BUDGET, resource, job_key, payload, None)


def _emit(
    event: str,
    resource: dict[str, str],
    about: str,
    payload: dict[str, Any] | None,
    flow_run_id: UUID | None,
) -> None:
    flow_run_id = flow_run_id or current_flow_run_id()
    related = (
        [
            {
                "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
                "prefect.resource.role": "flow-run",
            }
        ]
        if flow_run_id
        else None
    )
    try:
        emit_event(event, resource=resource, related=related, payload=payload or {})
    except Exception:
        logger.warning("Could not emit %s about %s", event, about, exc_info=True)


def describe_url(url: str) -> str:
    """A URL fit for a log line or an artifact: data URIs (sync mode) are summarised."""
    if url.startswith("data:"):
        media_type = url[5:].split(";", 1)[0].split(",", 1)[0] or "data"
        return f"<inline {media_type}, {len(url)} characters>"
    if len(url) > _MAX_URL_CHARS:
        return url[: _MAX_URL_CHARS - 1] + "…"
    return url


def _artifact_key(text: str) -> str:
    # Artifact keys allow only lowercase letters, digits and dashes.
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def _in_a_run() -> bool:
    # Prefect deprecates artifacts made outside a flow or task run: nothing to attach them to.
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _link_arguments(request_id: str, result_url: str, job_key: str | None) -> dict[str, Any]:
    description = f"RunComfy request `{request_id}`"
    if job_key:
        description += f" for job key `{job_key}`"
    return {
        "link": result_url,
        "link_text": f"RunComfy request {request_id}",
        "key": _artifact_key(f"runcomfy-request-{request_id}"),
        "description": description
        + ". Fetching it needs the RunComfy API token as a Bearer header.",
    }


async def alink_request(
    request_id: str, result_url: str | None, job_key: str | None = None
) -> None:
    """A link artifact to the request's result URL, made as soon as the request exists.

    The link (not the token) is what a person needs to collect an output when
    the run that asked for it is gone.
    """
    if not result_url or not _in_a_run():
        return
    try:
        await acreate_link_artifact(**_link_arguments(request_id, result_url, job_key))
    except Exception:
        logger.warning(
            "Could not create the link artifact of request %s", request_id, exc_info=True
        )


def outcome_row(
    *,
    request_id: str,
    status: str,
    statuses: Sequence[str] = (),
    output_urls: Sequence[str] = (),
    cost: float | None = None,
    submitted_at: datetime | None = None,
    finished_at: datetime | None = None,
    seconds: float | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """One row of the outcome table; also the payload of the final event."""
    return {
        "request_id": request_id,
        "status": status,
        "statuses": " → ".join(statuses),
        "outputs": ", ".join(describe_url(url) for url in output_urls),
        "cost": cost,
        "submitted_at": submitted_at.isoformat() if submitted_at else None,
        "finished_at": finished_at.isoformat() if finished_at else None,
        "seconds": round(seconds, 3) if seconds is not None else None,
        "error": error,
    }


def _outcome_table_arguments(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "table": [row],
        "key": OUTCOME_TABLE_KEY,
        "description": f"Outcome of RunComfy request `{row['request_id']}`.",
    }


async def arecord_outcome(row: dict[str, Any]) -> None:
    """Announce how a request ended: the final event and a table artifact."""
    emit_request_event(
        EVENT_FOR_STATUS.get(row["status"], EVENT_FAILED), row["request_id"], payload=row
    )
    if not _in_a_run():
        return
    try:
        await acreate_table_artifact(**_outcome_table_arguments(row))
    except Exception:
        logger.warning(
            "Could not create the outcome artifact of request %s", row["request_id"], exc_info=True
        )


def log_cancel_outcome(
    log: logging.Logger | logging.LoggerAdapter, request_id: str, outcome: str
) -> None:
    """The one wording for what a cancel achieved; in-progress jobs run on, and say so."""
    if outcome == "cancelled":
        log.info("Cancelled queued RunComfy request %s", request_id)
    else:
        log.warning(
            "RunComfy request %s is already running (or finished) and cannot be cancelled; "
            "it will still be billed. Collect its output later with its request id, e.g. "
            "`get_request_result(%r)`",
            request_id,
            request_id,
        )
