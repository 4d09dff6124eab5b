"""A run's stop: one flag per run, set by a signal or a cancel, read between steps.

A stop is a state the run handles, not an exception that lands wherever the
main thread happens to be. Whoever asks a run to end sets its `Stop` (SIGTERM or
Ctrl-C through `stop_on_signals`, a run entering Cancelling through the Prefect
adapter), and the steps look at it where looking is safe:

- before a claim or a paid submit: none starts once the run is stopping;
- while waiting on a request: the wait ends, and a request still queued at the
  API is withdrawn through the guard (a running one stays recorded, for the next
  run to adopt);
- never inside a submit whose POST is on its way: it finishes within its own
  deadline and its request id is recorded.

Knows nothing of Prefect or of the API: the pipeline, the batch lanes and the CLI
all read the same flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Awaitable, Iterator
from typing import Literal, TypeVar

from .errors import NanoBananaError

__all__ = [
    "RunStopped",
    "Stop",
    "StopReason",
    "redeliver",
    "signals_deferred",
    "stop_on_signals",
]

StopReason = Literal["sigterm", "sigint", "cancelling"]

# A run that was asked to stop ends within this many seconds, work in hand or not:
# Kubernetes grants a pod 30 s between SIGTERM and SIGKILL, and the stop still has
# to withdraw queued requests and write the results manifest after it.
STOP_GRACE_SECONDS = 12.0

_SIGNAL_REASONS: dict[int, StopReason] = {signal.SIGTERM: "sigterm", signal.SIGINT: "sigint"}

Result = TypeVar("Result")

_DESCRIPTIONS: dict[StopReason, str] = {
    "sigterm": "the process was told to stop (SIGTERM)",
    "sigint": "the run was interrupted (Ctrl-C)",
    "cancelling": "the run was cancelled",
}


class RunStopped(NanoBananaError):
    """A step was not started because its run is stopping; nothing was sent or paid.

    Args:
        reason: Why the run stops.
    """

    def __init__(self, reason: StopReason) -> None:
        super().__init__(f"not started: {_DESCRIPTIONS[reason]}")
        self.reason: StopReason = reason


class Stop:
    """One run's stop: unset until someone asks the run to end; then set for good.

    Thread-safe: a watcher thread may set it while the run's event loop reads it, and
    a signal handler on the main thread may set it again while it is being set (the
    lock is re-entrant). The first reason given is kept.

    Example:
        ```python
        stop = Stop()
        with stop_on_signals(stop, asyncio.get_running_loop()):
            outcome = await stop.first(client.wait(request_id, 600))
            if outcome is None:  # the run is stopping: withdraw, record, end
                ...
        ```
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._reason: StopReason | None = None
        self._loop_events: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def __repr__(self) -> str:
        return f"Stop(reason={self._reason!r})"

    @property
    def reason(self) -> StopReason | None:
        """Why the run stops; None while it runs on."""
        return self._reason

    @property
    def is_set(self) -> bool:
        """Whether the run was asked to stop."""
        return self._reason is not None

    @property
    def description(self) -> str:
        """The reason in words, for a row's or a log line's message."""
        return _DESCRIPTIONS[self._reason] if self._reason else "the run goes on"

    def set(self, reason: StopReason) -> None:
        """Ask the run to stop (from any thread); a second call keeps the first reason."""
        with self._lock:
            if self._reason is not None:
                return
            self._reason = reason
            waiters = list(self._loop_events)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed meanwhile
                loop.call_soon_threadsafe(event.set)

    def check(self) -> None:
        """Raise `RunStopped` if the run is stopping: the gate before a claim or a submit.

        Raises:
            RunStopped: The run was asked to stop.
        """
        if self._reason is not None:
            raise RunStopped(self._reason)

    async def wait(self) -> StopReason:
        """Return once the run is asked to stop (at once if it was)."""
        event = asyncio.Event()
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._reason is None:
                self._loop_events.append((loop, event))
        try:
            if self._reason is None:
                await event.wait()
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._loop_events.remove((loop, event))
        assert self._reason is not None
        return self._reason

    async def first(self, step: Awaitable[Result]) -> Result | None:
        """Run `step` until it ends or the run is asked to stop, whichever comes first.

        Returns:
            What `step` returned, or None when the stop came first (the step is then
            cancelled at its current await: only steps that may be left there, such
            as a wait on a request, belong here; never a paid submit).
        """
        if self._reason is not None:
            if asyncio.iscoroutine(step):
                step.close()
            return None
        work = asyncio.ensure_future(step)
        stopping = asyncio.ensure_future(self.wait())
        try:
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
        if work.cancelled():
            return None
        return work.result()


@contextlib.contextmanager
def stop_on_signals(
    stop: Stop, loop: asyncio.AbstractEventLoop | None = None
) -> Iterator[list[int]]:
    """SIGTERM and SIGINT set `stop` while the block runs; they raise nothing.

    With `loop` (an async run), the signal is handled between two callbacks of the
    run's event loop; without one (a sync run, whose main thread waits on work done
    elsewhere), by a handler that only sets `stop`. Either way no exception lands at
    an arbitrary line. On the way out the handlers found on the way in (Prefect's
    SIGTERM bridge, asyncio's Ctrl-C handler) are put back. The list it yields names
    the signals that came: the caller re-delivers them once its stop is done
    (`redeliver`), so the process ends the way those handlers end it. Outside the
    main thread signals cannot be handled; then nothing is installed and the list
    stays empty.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {signum: signal.getsignal(signum) for signum in _SIGNAL_REASONS}

    def on_signal(signum: int, frame: object = None) -> None:
        received.append(signum)
        stop.set(_SIGNAL_REASONS[signum])

    for signum in _SIGNAL_REASONS:
        if loop is not None:
            loop.add_signal_handler(signum, on_signal, signum)
        else:
            signal.signal(signum, on_signal)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            if loop is not None:
                loop.remove_signal_handler(signum)
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM and Ctrl-C wait until the block has ended, then reach their own handlers.

    For blocking code on the main thread around a paid submit and the record of its
    request id (the CLI's submit, a sync task's): a stop that came meanwhile takes
    effect once the id is recorded, the way the handlers found on the way in
    (Prefect's SIGTERM bridge, Python's KeyboardInterrupt) would have taken it.
    Outside the main thread nothing is deferred.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def defer(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {signum: signal.signal(signum, defer) for signum in _SIGNAL_REASONS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        redeliver(received)


def redeliver(signals: list[int]) -> None:
    """Send this process the signals a stop absorbed, once their own handlers are back:
    the process then ends the way those handlers end it (Prefect's SIGTERM bridge
    reports the run Crashed; Python's Ctrl-C raises KeyboardInterrupt)."""
    for signum in dict.fromkeys(signals):
        os.kill(os.getpid(), signum)
