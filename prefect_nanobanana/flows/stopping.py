"""The Prefect side of a run's stop: who sets it, and the state the run ends in.

A run's `Stop` (see `prefect_nanobanana.stop`) is set

- by SIGTERM (what a worker sends a flow run it cancels, and Kubernetes an evicted
  pod) or Ctrl-C, handled as callbacks on the run's event loop (`stop_on_signals`),
  in place of Prefect's SIGTERM bridge while the run's rows are worked on;
- by the run entering Cancelling, which `CancellingWatch` reads from the API: a run
  started directly (a script, a notebook) has no runner that would act on a cancel
  from the UI, and a deployment's run learns of it before its runner's SIGTERM.

Once the run has handled its stop (requests withdrawn, results manifest written),
`stopped_state` tells how it ends: Cancelled when it was cancelled; else the
signal goes on to the handler that Prefect installed (`stop.redeliver`), and the run
ends as Prefect reports a terminated run (Crashed).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.states import Cancelled, State

from ..stop import Stop

__all__ = ["CancellingWatch", "asked_to_cancel", "direct_flow_run_id", "stopped_state"]

# How often a run's state is read while it works: "within a few seconds".
CANCELLING_POLL_SECONDS = 1.0


class CancellingWatch:
    """Watches a flow run's state; once it is Cancelling, calls `on_cancelling` once.

    A daemon thread reads the run's state from the Prefect API every
    `CANCELLING_POLL_SECONDS` (none without a run id). `fired` says whether the run
    was asked to cancel; the run then ends in `cancelled_state()`.
    """

    def __init__(
        self, flow_run_id: UUID | None, on_cancelling: Callable[[], None], message: str
    ) -> None:
        self.flow_run_id = flow_run_id
        self.fired = False
        self._on_cancelling = on_cancelling
        self._message = message
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
                    self.fired = True
                    self._on_cancelling()
                    return

    def cancelled_state(self) -> State[Any]:
        """The state a run ends in once it was asked to cancel."""
        return Cancelled(message=self._message)


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
    could not complete) or by a runner's SIGTERM that followed a cancel; None for a run
    that was not stopped, or that a signal alone stopped (`stop.redeliver` then ends it
    as Prefect does).
    """
    if stop.reason != "cancelling" and await asked_to_cancel(flow_run_id):
        stop.set("cancelling")
    if stop.reason != "cancelling":
        return None
    return Cancelled(message=f"{message} ({stop.description})")
