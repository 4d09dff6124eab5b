"""What every request task shares: no caching, and Prefect retries only transient errors."""

from __future__ import annotations

from typing import Any

from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from ..client import RunComfyError

# The client already retries each call (six attempts with backoff); Prefect's
# retries ride out a longer outage, and only for transient errors. No caching:
# a poll must ask the API every time, and `submit_edit` keeps its own record.
TASK_OPTIONS: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "retries": 3,
    "retry_delay_seconds": [2.0, 10.0, 30.0],
}


def retry_if_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """`retry_condition_fn` of every task here: retry only what the client calls transient.

    Prefect hands the raised exception over as the data of a Failed state.
    """
    error = state.data
    return isinstance(error, RunComfyError) and error.is_transient
