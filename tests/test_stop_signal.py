"""The run's stop on its own: set once from anywhere, read between steps, signals deferred."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from prefect_nanobanana.stop import RunStopped, Stop, signals_deferred, stop_on_signals


async def test_a_stop_set_from_another_thread_ends_a_wait_at_its_await():
    stop = Stop()
    ended = asyncio.Event()

    async def long_wait() -> str:
        try:
            await asyncio.sleep(60)
        finally:
            ended.set()
        return "done"

    threading.Timer(0.1, stop.set, args=("cancelling",)).start()
    began = time.monotonic()
    assert await stop.first(long_wait()) is None
    assert ended.is_set() and time.monotonic() - began < 5
    assert stop.reason == "cancelling" and "cancelled" in stop.description
    stop.set("sigterm")  # the first reason is kept
    assert stop.reason == "cancelling"
    with pytest.raises(RunStopped, match="not started: the run was cancelled"):
        stop.check()


async def test_a_step_that_ends_first_gives_its_result_and_a_set_stop_starts_nothing():
    stop = Stop()
    assert await stop.first(asyncio.sleep(0, result="done")) == "done"
    stop.check()  # not stopped: nothing raised
    stop.set("sigint")
    started = []

    async def step() -> None:
        started.append(True)

    assert await stop.first(step()) is None
    assert started == []


async def test_sigterm_sets_the_stop_between_callbacks_and_the_handler_found_comes_back():
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        stop = Stop()
        with stop_on_signals(stop, asyncio.get_running_loop()) as received:
            os.kill(os.getpid(), signal.SIGTERM)
            assert await asyncio.wait_for(stop.wait(), 5) == "sigterm"
            assert received == [signal.SIGTERM] and seen == []  # handled as a stop, not raised
        # On the way out the handler found on the way in is back, and nothing reached it.
        assert seen == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


_DEFERRED = """
import os, signal, sys, time
from prefect_nanobanana.stop import signals_deferred
with signals_deferred():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("the block ended", flush=True)
print("not reached", flush=True)
"""


def test_a_signal_during_a_deferred_block_takes_effect_once_the_block_ended():
    """What a blocking submit does between its POST and the record of its request id."""
    child = subprocess.run(
        [sys.executable, "-c", _DEFERRED], capture_output=True, text=True, timeout=60
    )
    assert child.stdout.splitlines() == ["the block ended"]
    assert child.returncode == -signal.SIGTERM


def test_off_the_main_thread_nothing_is_deferred_or_installed():
    done = []

    def in_a_thread() -> None:
        with signals_deferred(), stop_on_signals(Stop(), None) as received:
            done.append(received)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(10)
    assert done == [[]]
