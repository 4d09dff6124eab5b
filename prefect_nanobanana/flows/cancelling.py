"""A direct flow run's cancel: read from the API, since no runner will act on it.

A run started by a deployment's runner is stopped by that runner when it is
cancelled (SIGTERM, then the `on_cancellation` hook). A run started directly (a
script, a notebook, a subflow of one) has no runner: a cancel from the UI or the
API only sets its state. The edit flows and the batch read that state while they
wait, and stop themselves.
"""

import threading
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.states import Cancelled, State

# How often a direct run's state is read while it waits: "within a few seconds".
CANCELLING_POLL_SECONDS = 1.0


class CancellingWatch:
    """Watches a direct flow run's state; once it is Cancelling, calls `on_cancelling` once.

    A daemon thread reads the run's state from the Prefect API every
    `CANCELLING_POLL_SECONDS` (none for a run that is not direct: its runner acts on
    a cancel). `fired` says whether the run was asked to cancel; the run then ends
    in `cancelled_state()`.
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

    def __enter__(self) -> "CancellingWatch":
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
