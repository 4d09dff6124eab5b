"""The Prefect side of a run's stop: who sets it, and the state the run ends in.

A run's `Stop` (see `prefect_nanobanana.stop`) is set

- by SIGTERM (what a worker sends a flow run it cancels, and Kubernetes an evicted
  pod) or Ctrl-C, handled by `stop_on_signals` in place of Prefect's SIGTERM bridge
  while the run works;
- by the run entering Cancelling, which `CancellingWatch` reads from the API: a run
  started directly (a script, a notebook) has no runner that would act on a cancel
  from the UI, and a deployment's run learns of it before its runner's SIGTERM.

Once the run has handled its stop (requests withdrawn, outputs in hand archived,
a batch's results manifest written), `RunStop.end` tells how it ends: Cancelled
when it was cancelled; else the signal goes on to the handler that Prefect
installed (`stop.redeliver`), and the run ends as Prefect reports a terminated run
(Crashed). `batch_edit`, `edit_image` and `edit_and_archive` all stop this way.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.states import Cancelled, State
from prefect.utilities.asyncutils import run_coro_as_sync

from .. import observe
from ..stop import Stop, redeliver, stop_on_signals

__all__ = [
    "CancellingWatch",
    "RunStop",
    "asked_to_cancel",
    "direct_flow_run_id",
    "stopped_state",
]

Result = TypeVar("Result")

# How often a run's state is read while it works: "within a few seconds".
CANCELLING_POLL_SECONDS = 1.0


class CancellingWatch:
    """Watches a flow run's state; once it is Cancelling, calls `on_cancelling` once.

    A daemon thread reads the run's state from the Prefect API every
    `CANCELLING_POLL_SECONDS` (none without a run id).
    """

    def __init__(self, flow_run_id: UUID | None, on_cancelling: Callable[[], None]) -> None:
        self.flow_run_id = flow_run_id
        self._on_cancelling = on_cancelling
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="cancelling-watch", daemon=True)

    def __enter__(self) -> CancellingWatch:
        if self.flow_run_id is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        assert self.flow_run_id is not None
        with get_client(sync_client=True) as prefect_client:
            while not self._stopped.wait(CANCELLING_POLL_SECONDS):
                try:
                    state = prefect_client.read_flow_run(self.flow_run_id).state
                except Exception:  # the API being briefly away must not end the wait
                    continue
                if state is not None and (state.is_cancelling() or state.is_cancelled()):
                    self._on_cancelling()
                    return


class RunStop:
    """One flow run's stop while it works, and the state it ends in.

    Inside `handling()`, SIGTERM and Ctrl-C (`stop_on_signals`) and the run entering
    Cancelling (`CancellingWatch`) set `stop`; the run's steps read it. Before the
    block ends, the run asks `settle()` once: it is Cancelled when it was cancelled.
    After the block, `end(result)` returns that Cancelled state, or re-delivers the
    signals that stopped it (Prefect's bridge then ends the run as it does), or
    returns `result` for a run nobody stopped.

    Args:
        message: The Cancelled state's message (the reason is added to it).

    Example:
        ```python
        run_stop = RunStop("Cancelled while editing")
        with run_stop.handling():
            outcome = wait_for_request(request_id, stop=run_stop.stop)
            run_stop.settle_sync()
        return run_stop.end(outcome)
        ```
    """

    def __init__(self, message: str) -> None:
        self.stop = Stop()
        self.flow_run_id = observe.current_flow_run_id()
        self.message = message
        self.cancelled: State[Any] | None = None
        self._signals: list[int] = []

    @contextmanager
    def handling(self, loop: asyncio.AbstractEventLoop | None = None) -> Iterator[Stop]:
        """Set `stop` on SIGTERM, Ctrl-C or Cancelling while the block runs.

        Args:
            loop: The run's event loop (an async flow); None in a sync flow.
        """
        with (
            stop_on_signals(self.stop, loop) as self._signals,
            CancellingWatch(self.flow_run_id, partial(self.stop.set, "cancelling")),
        ):
            yield self.stop

    async def settle(self) -> None:
        """Ask, once the work is done, whether the run ends Cancelled (`stopped_state`)."""
        self.cancelled = await stopped_state(self.stop, self.flow_run_id, self.message)

    def settle_sync(self) -> None:
        """`settle` for a sync flow."""
        run_coro_as_sync(self.settle())

    def end(self, result: Result) -> Result | State[Any]:
        """What the flow returns: its Cancelled state, else `result`, once the signals
        that stopped it (none when nobody did) have gone on to their own handlers."""
        if self.cancelled is not None:
            return self.cancelled
        if self.stop.is_set:
            _send_logs_and_events()
            redeliver(self._signals)
        return result


# How long a run stopped by a signal waits for its logs and events to reach the API.
SEND_BEFORE_ENDING_SECONDS = 5.0


def _send_logs_and_events() -> None:
    """Send the run's logs and events to the API now: a process a signal ends skips
    Python's exit, where Prefect would send them, and what it said while stopping (the
    requests it let go of) would be lost. Bounded; from a thread of its own, so it also
    works from an async flow's event loop."""

    def drain() -> None:
        for service in (APILogWorker, EventsWorker):
            service.drain_all(timeout=SEND_BEFORE_ENDING_SECONDS)

    sender = threading.Thread(target=drain, name="send-before-ending", daemon=True)
    sender.start()
    sender.join(2 * SEND_BEFORE_ENDING_SECONDS + 1)


def direct_flow_run_id() -> UUID | None:
    """This flow run's id if it was started directly: no runner would act on its cancel."""
    context = FlowRunContext.get()
    flow_run = context.flow_run if context is not None else None
    if flow_run is None or flow_run.deployment_id is not None:
        return None
    return flow_run.id


async def asked_to_cancel(flow_run_id: UUID | None) -> bool:
    """Whether the run is Cancelling (or Cancelled) on the API now; False when there is no
    run, or no API to ask."""
    if flow_run_id is None:
        return False
    try:
        async with get_client() as prefect_client:
            state = (await prefect_client.read_flow_run(flow_run_id)).state
    except Exception:
        return False
    return state is not None and (state.is_cancelling() or state.is_cancelled())


async def stopped_state(stop: Stop, flow_run_id: UUID | None, message: str) -> State[Any] | None:
    """The state a run ends in once its work is done: Cancelled when it was cancelled,
    through the API (also a cancel its watch had not seen yet: a run left Cancelling
    could not complete) or by a runner's SIGTERM that followed a cancel (the stop's
    reason is then "sigterm", the first to come); None for a run that was not stopped,
    or that a signal alone stopped (`stop.redeliver` then ends it as Prefect does).
    """
    if stop.reason != "cancelling" and not await asked_to_cancel(flow_run_id):
        return None
    return Cancelled(message=f"{message} (the run was cancelled)")
