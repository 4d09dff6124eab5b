"""Prefect tasks: the submit guard, the request tasks, the storage tasks.

- `guard.py`: the one submit guard (job keys, their records, "outcome unknown",
  withdrawing a queued request). Every paid submit goes through it.
- `requests.py`: `submit_edit`, `get_request_status`, `get_request_result`,
  `cancel_request`, `wait_for_request`, each with an `a*` async twin.
- `storage.py`: `stage_images` / `archive_request` (+ `a*`), over the storage room.
- `options.py`: what every request task shares (no cache, retries of transient errors).
"""

from .guard import (
    RECORD_LABEL_PREFIX,
    SubmittedRequest,
    cancel_if_queued,
    cancel_recorded_requests,
    default_job_key,
    recorded_request_ids,
)
from .options import TASK_OPTIONS, retry_if_transient
from .requests import (
    RequestOutcome,
    acancel_request,
    aget_request_result,
    aget_request_status,
    asubmit_edit,
    await_for_request,
    cancel_request,
    get_request_result,
    get_request_status,
    submit_edit,
    wait_for_request,
)
from .storage import aarchive_request, archive_request, astage_images, stage_images

__all__ = [
    "RECORD_LABEL_PREFIX",
    "TASK_OPTIONS",
    "RequestOutcome",
    "SubmittedRequest",
    "aarchive_request",
    "acancel_request",
    "aget_request_result",
    "aget_request_status",
    "archive_request",
    "astage_images",
    "asubmit_edit",
    "await_for_request",
    "cancel_if_queued",
    "cancel_recorded_requests",
    "cancel_request",
    "default_job_key",
    "get_request_result",
    "get_request_status",
    "recorded_request_ids",
    "retry_if_transient",
    "stage_images",
    "submit_edit",
    "wait_for_request",
]
