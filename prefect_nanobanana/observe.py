"""What a RunComfy request leaves behind in Prefect: events, artifacts and their names.

Every event name and artifact key of the package lives here, so automations and
dashboards have one file to read. Each request is its own event resource
(`runcomfy.request.<id>`), related to the flow run that owns it, so an
automation can react to "any Nano Banana request failed" without knowing flows.

Observability is best effort: a request that is already paid for must not fail
because an artifact could not be written, so failures here are logged, not raised.
Nothing here ever sees a token: only request ids, URLs and outcomes.

This is also the Prefect side of the one redaction (`prefect_nanobanana.redaction`):
server text and URLs reach Prefect's database through events, artifacts, logs and
state messages. Event payloads and artifacts made here are redacted; log records
are redacted by `RedactingFilter`, installed on the loggers whose records Prefect
ships to its API (`install_log_redaction`, run when this module is imported);
state messages come from exceptions, and ours (`RunComfyError`, `StorageError`)
redact their message when they are made.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.events import emit_event
from prefect.logging import get_logger

from .redaction import redact, redact_text

EVENT_PREFIX = "nanobanana.request"
EVENT_SUBMITTED = f"{EVENT_PREFIX}.submitted"
EVENT_COMPLETED = f"{EVENT_PREFIX}.completed"
EVENT_FAILED = f"{EVENT_PREFIX}.failed"
EVENT_CANCELLED = f"{EVENT_PREFIX}.cancelled"
# After the outputs of a completed request were archived: where they went.
EVENT_ARCHIVED = f"{EVENT_PREFIX}.archived"
REQUEST_EVENTS = (EVENT_SUBMITTED, EVENT_COMPLETED, EVENT_FAILED, EVENT_CANCELLED, EVENT_ARCHIVED)
# A batch row that failed for any reason but its request failing (that one is
# `nanobanana.request.failed`): invalid, unstageable, unknown submit, not archived.
# So every failure is announced once, and an automation counts both names.
EVENT_ROW_FAILED = "nanobanana.row.failed"
# The keys every event payload of the package has (None when not known yet).
PAYLOAD_KEYS = (
    "row",
    "row_id",
    "request_id",
    "status",
    "cost",
    "metadata_location",
    "output_locations",
    "error",
)

# A batch row that `max_cost_usd` held back: no request exists, so the resource is the job.
EVENT_ROW_OVER_BUDGET = "nanobanana.row.over_budget"

# The final status of a request -> the event that announces it.
EVENT_FOR_STATUS = {
    "completed": EVENT_COMPLETED,
    "failed": EVENT_FAILED,
    "cancelled": EVENT_CANCELLED,
}

OUTCOME_TABLE_KEY = "nanobanana-request-outcomes"
# Before/after thumbnails and where every output and metadata.json went.
EDIT_PREVIEW_KEY = "nanobanana-edit-preview"
BATCH_ROWS_KEY = "nanobanana-batch-rows"
BATCH_REPORT_KEY = "nanobanana-batch-report"
_MAX_URL_CHARS = 200

# The loggers whose records Prefect's logging configuration sends to its API
# (`APILogHandler` on prefect.flow_runs, prefect.task_runs and prefect.extra), the
# engine's own run loggers among them, and ours.
API_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.extra", "prefect_nanobanana")


class RedactingFilter(logging.Filter):
    """Rewrites a record so that neither its message nor its traceback carries a secret.

    A filter, not a formatter: it runs before any handler formats the record, so
    Prefect's API handler, the console and any handler a user adds all see the
    redacted text. The traceback is formatted here once and cached in `exc_text`,
    which `logging.Formatter` uses instead of formatting the exception again.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it when a handler formats it
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = redact_text(
                "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            )
        return True


_REDACTING_FILTER = RedactingFilter()


def install_log_redaction() -> None:
    """Put `RedactingFilter` on the API loggers and on the handlers attached to them.

    On a logger it sees the records logged there directly (what `get_run_logger`
    and the engines write), and survives Prefect reconfiguring logging; on a
    handler it also sees records that propagate from child loggers. Idempotent.
    """
    for name in API_LOGGERS:
        target = logging.getLogger(name)
        for filterer in (target, *target.handlers):
            if _REDACTING_FILTER not in filterer.filters:
                filterer.addFilter(_REDACTING_FILTER)


install_log_redaction()

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


def event_payload(
    request_id: str | None,
    status: str,
    *,
    row: int | None = None,
    row_id: str | None = None,
    cost: float | None = None,
    metadata_location: str | None = None,
    output_locations: Sequence[str] = (),
    error: str | None = None,
    **details: Any,
) -> dict[str, Any]:
    """The one payload shape of every event here: `PAYLOAD_KEYS`, then event-specific details.

    An automation or a dashboard reads `payload.row_id` or `payload.cost` the same
    way whichever flow (single edit, batch row, job block) sent the event.
    """
    return {
        "row": row,
        "row_id": row_id,
        "request_id": request_id,
        "status": status,
        "cost": cost,
        "metadata_location": metadata_location,
        "output_locations": list(output_locations),
        "error": error,
        **details,
    }


def emit_row_failed(
    row: int,
    row_id: str | None,
    error: str,
    *,
    request_id: str | None = None,
    task_run_id: UUID | None = None,
) -> None:
    """Announce a failed batch row; its resource is `nanobanana.row.<flow run>.<row>`.

    Related to the flow run and to the row's task run, so the event links to the
    red `row-N` in the UI.
    """
    flow_run_id = current_flow_run_id()
    related = (
        [
            {
                "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
                "prefect.resource.role": "flow-run",
            }
        ]
        if flow_run_id
        else []
    )
    if task_run_id:
        related.append(
            {
                "prefect.resource.id": f"prefect.task-run.{task_run_id}",
                "prefect.resource.role": "task-run",
            }
        )
    try:
        emit_event(
            EVENT_ROW_FAILED,
            resource={
                "prefect.resource.id": f"nanobanana.row.{flow_run_id}.{row}",
                "prefect.resource.name": row_id or f"row {row}",
            },
            related=related,
            payload=event_payload(request_id, "failed", row=row, row_id=row_id, error=error),
        )
    except Exception:
        logger.warning("Could not emit %s for row %s", EVENT_ROW_FAILED, row, exc_info=True)


def short_error(error: str | None, limit: int = 240) -> str | None:
    """An error fit for a table cell: its first line, at most `limit` characters."""
    if not error:
        return error
    first = error.strip().splitlines()[0] if error.strip() else error
    return first if len(first) <= limit else first[: limit - 1] + "…"


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
        emit_event(event, resource=resource, related=related, payload=redact(payload or {}))
    except Exception:
        logger.warning("Could not emit %s about %s", event, about, exc_info=True)


def describe_url(url: str) -> str:
    """A URL fit for a log line or an artifact: data URIs (sync mode) are summarised, and
    signatures removed by the one redaction."""
    if url.startswith("data:"):
        media_type = url[5:].split(";", 1)[0].split(",", 1)[0] or "data"
        return f"<inline {media_type}, {len(url)} characters>"
    url = redact_text(url)
    if len(url) > _MAX_URL_CHARS:
        return url[: _MAX_URL_CHARS - 1] + "…"
    return url


def _artifact_key(text: str) -> str:
    # Artifact keys allow only lowercase letters, digits and dashes.
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def _in_a_run() -> bool:
    # Prefect deprecates artifacts made outside a flow or task run: nothing to attach them to.
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _request_note_arguments(
    request_id: str, result_url: str, job_key: str | None
) -> dict[str, Any]:
    # Markdown, not a link artifact: the result URL answers 401 to a browser (it needs
    # the token as a Bearer header), so it is shown as text with the way to collect it.
    key_line = f"\n\nJob key: `{job_key}`." if job_key else ""
    return {
        "key": _artifact_key(f"runcomfy-request-{request_id}"),
        "markdown": (
            f"### RunComfy request `{request_id}`\n\n"
            f"Result: `{describe_url(result_url)}` (the API asks for the RunComfy token as a "
            "Bearer header, so a browser cannot open it). To collect the output later: "
            f"`nanobanana result {request_id} --download DIR`.{key_line}"
        ),
        "description": f"RunComfy request {request_id}",
    }


async def aannounce_submitted(
    log: logging.Logger | logging.LoggerAdapter,
    request_id: str,
    job_key: str,
    *,
    result_url: str | None = None,
    **facts: Any,
) -> None:
    """The one announcement of a fresh (paid) submit: a log line, the `submitted` event
    with `facts` (row, model…), and, given `result_url`, the request's note artifact
    (a batch leaves it out: an artifact a row is more than its bookkeeping can bear).
    """
    log.info("Submitted RunComfy request %s (job key %s)", request_id, job_key)
    emit_request_event(
        EVENT_SUBMITTED,
        request_id,
        payload=event_payload(request_id, "submitted", job_key=job_key, **facts),
    )
    if result_url is not None:
        await alink_request(request_id, result_url, job_key)


async def alink_request(
    request_id: str, result_url: str | None, job_key: str | None = None
) -> None:
    """A note naming the request and how to collect it, made as soon as the request exists.

    The request id (not the token) is what a person needs to collect an output when
    the run that asked for it is gone.
    """
    if not result_url or not _in_a_run():
        return
    try:
        await acreate_markdown_artifact(**_request_note_arguments(request_id, result_url, job_key))
    except Exception:
        logger.warning("Could not create the artifact of request %s", request_id, exc_info=True)


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
        "table": [redact(row)],
        "key": OUTCOME_TABLE_KEY,
        "description": f"Outcome of RunComfy request `{row['request_id']}`.",
    }


def _outcome_payload(row: dict[str, Any]) -> dict[str, Any]:
    details = {name: value for name, value in row.items() if name not in PAYLOAD_KEYS}
    return event_payload(
        row["request_id"], row["status"], cost=row["cost"], error=row["error"], **details
    )


async def arecord_outcome(row: dict[str, Any]) -> None:
    """Announce how a request ended: the final event and a table artifact."""
    emit_request_event(
        EVENT_FOR_STATUS.get(row["status"], EVENT_FAILED),
        row["request_id"],
        payload=_outcome_payload(row),
    )
    if not _in_a_run():
        return
    try:
        await acreate_table_artifact(**_outcome_table_arguments(row))
    except Exception:
        logger.warning(
            "Could not create the outcome artifact of request %s", row["request_id"], exc_info=True
        )
