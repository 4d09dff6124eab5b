"""What every task here shares: one body for the sync and async twins; for request tasks,
no caching, and Prefect retries only transient errors."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.utilities.asyncutils import run_coro_as_sync

from ..client import RunComfyError
from ..stop import signals_deferred

P = ParamSpec("P")
R = TypeVar("R")

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

    Args:
        task: The task (Prefect passes it).
        task_run: Its run.
        state: The Failed state, carrying the raised exception.

    Returns:
        True for a transient `RunComfyError` (a 429, a 5xx on a read, a timeout);
        auth, validation and balance errors fail at once.
    """
    error = state.data
    return isinstance(error, RunComfyError) and error.is_transient


def sync_and_async_tasks(
    body: Callable[P, Coroutine[Any, Any, R]],
    *,
    public_name: str | None = None,
    defer_signals: bool = False,
    **task_options: Any,
) -> tuple[Task[P, R], Task[P, Coroutine[Any, Any, R]]]:
    """A task and its `a*` async twin, both from one async body: the one mechanism here.

    The async task awaits `body`; the sync one runs it to its end on Prefect's
    loop thread (`run_coro_as_sync`, which carries the run's context along), so a
    sync flow calls the same code an async flow awaits, and no body is written twice.
    `defer_signals`: the body is a paid submit; SIGTERM or Ctrl-C reaching the sync
    task's main thread meanwhile takes effect once the body has ended (its request
    id recorded), not in the middle of it.
    """

    @functools.wraps(body)
    async def run_async(*args: P.args, **kwargs: P.kwargs) -> R:
        return await body(*args, **kwargs)

    @functools.wraps(body)
    def run_sync(*args: P.args, **kwargs: P.kwargs) -> R:
        with signals_deferred() if defer_signals else contextlib.nullcontext():
            return run_coro_as_sync(body(*args, **kwargs))

    public_name = public_name or body.__name__.lstrip("_")
    for function, name in ((run_sync, public_name), (run_async, f"a{public_name}")):
        function.__name__ = function.__qualname__ = name
    return task(run_sync, **task_options), task(run_async, **task_options)
