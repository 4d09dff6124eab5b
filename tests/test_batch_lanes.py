"""The batch's lane scheduler, alone: no Prefect, no API, just items and events."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import pytest

from prefect_nanobanana.flows.batch.lanes import run_in_lanes


async def test_a_lane_moves_on_when_the_request_ends_not_when_the_item_does() -> None:
    in_flight, most_in_flight, finished = 0, 0, []
    archive_gate = asyncio.Event()

    async def item(number: int, request_ended: asyncio.Event) -> None:
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        await asyncio.sleep(0)
        in_flight -= 1
        request_ended.set()
        await archive_gate.wait()  # "archiving": holds no lane
        finished.append(number)

    running = asyncio.create_task(run_in_lanes(range(10), 3, item))
    while len(finished) < 10 and in_flight == 0 and not running.done():
        await asyncio.sleep(0.01)
        if all(n in range(10) for n in finished) and not archive_gate.is_set():
            # Every item got a lane although none has finished archiving.
            archive_gate.set()
    await running
    assert sorted(finished) == list(range(10))
    assert most_in_flight == 3


async def test_an_item_that_fails_frees_its_lane_and_the_rest_still_run() -> None:
    ran = []

    async def item(number: int, request_ended: asyncio.Event) -> None:
        ran.append(number)
        if number == 0:
            raise RuntimeError("row 0 broke")  # never sets its event itself

    with pytest.raises(RuntimeError, match="row 0 broke"):
        await run_in_lanes(range(4), 1, item)
    assert ran == [0, 1, 2, 3]


async def test_the_hold_spans_the_lanes_only_and_is_skipped_without_items() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def slots(lanes: int):
        events.append(f"acquired {lanes}")
        yield
        events.append("released")

    async def item(number: int, request_ended: asyncio.Event) -> None:
        request_ended.set()
        await asyncio.sleep(0.01)
        events.append(f"finished {number}")

    await run_in_lanes([1], 2, item, hold=slots)
    assert events == ["acquired 1", "released", "finished 1"]  # a lane per item, at most
    events.clear()
    await run_in_lanes([], 2, item, hold=slots)
    assert events == []


async def test_cancelling_the_run_cancels_items_still_finishing() -> None:
    started = asyncio.Event()
    cancelled = []

    async def item(number: int, request_ended: asyncio.Event) -> None:
        request_ended.set()
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(number)
            raise

    running = asyncio.create_task(run_in_lanes([7], 1, item))
    await started.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await asyncio.sleep(0)
    assert cancelled == [7]


async def test_a_stream_s_items_run_as_it_produces_them() -> None:
    first_ran = asyncio.Event()
    ran: list[int] = []
    held: list[int] = []

    async def stream():
        yield 0
        # The rest is produced only once the first item ran: lanes that waited for the
        # whole stream would wait here forever.
        await asyncio.wait_for(first_ran.wait(), timeout=5)
        for number in range(1, 5):
            yield number

    @asynccontextmanager
    async def slots(lanes: int):
        held.append(lanes)
        yield

    async def item(number: int, request_ended: asyncio.Event) -> None:
        ran.append(number)
        first_ran.set()
        request_ended.set()

    await run_in_lanes(stream(), 3, item, hold=slots)
    assert ran == [0, 1, 2, 3, 4]
    assert held == [3]  # a stream's length is unknown: every lane's slot
