"""Prefect tasks: the submit guard, the request tasks, the storage tasks.

- `guard.py`: the submit guard inside a run (`prefect_nanobanana.guard` is the guard
  itself, free of Prefect): job-key scope, the run as a claim's owner, its logger, the
  `on_cancellation` hook. Every paid submit goes through the guard.
- `records.py`: Prefect's result store + flow-run labels as a `RecordStore`.
- `requests.py`: `submit_edit`, `get_request_status`, `get_request_result`,
  `cancel_request`, `wait_for_request`, each with an `a*` async twin.
- `storage.py`: `stage_images` / `archive_request` (+ `a*`), over the storage room.
- `options.py`: what every request task shares (no cache, retries of transient errors).
"""

from ..guard.protocol import (
    ArchiveTurn,
    SubmittedRequest,
    abandons_request,
    archive_claim,
    cancel_if_queued,
    mark_archived,
    mark_failed,
    outcome_unknown,
    submit_once,
)
from ..guard.records import MemoryRecordStore, RecordStore
from .guard import cancel_recorded_requests, default_job_key, withdraw_if_queued
from .options import TASK_OPTIONS, retry_if_transient
from .records import RECORD_LABEL_PREFIX, PrefectRecordStore, recorded_request_ids
from .requests import (
    RequestOutcome,
    acancel_request,
    aget_request_result,
    aget_request_status,
    alet_go_of_request,
    asubmit_edit,
    await_for_request,
    cancel_request,
    get_request_result,
    get_request_status,
    let_go_of_request,
    submit_edit,
    wait_for_request,
)
from .storage import aarchive_request, archive_request, astage_images, stage_images

__all__ = [
    "RECORD_LABEL_PREFIX",
    "TASK_OPTIONS",
    "ArchiveTurn",
    "MemoryRecordStore",
    "PrefectRecordStore",
    "RecordStore",
    "RequestOutcome",
    "SubmittedRequest",
    "aarchive_request",
    "abandons_request",
    "acancel_request",
    "aget_request_result",
    "aget_request_status",
    "alet_go_of_request",
    "archive_claim",
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
    "let_go_of_request",
    "mark_archived",
    "mark_failed",
    "outcome_unknown",
    "recorded_request_ids",
    "retry_if_transient",
    "stage_images",
    "submit_edit",
    "submit_once",
    "wait_for_request",
    "withdraw_if_queued",
]
