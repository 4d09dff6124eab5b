"""The lane scheduler: work items through a fixed number of lanes, a lane per request in flight.

Knows nothing of Prefect, rows or the API, so it can be tested alone. A lane hands
an item an `asyncio.Event` and moves on to its next item as soon as the item sets
it (for a row: its request ended), while the item finishes on its own (a row
archives meanwhile: our I/O, not a request in flight).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import TypeVar

from ...stop import STOP_GRACE_SECONDS, Stop

Item = TypeVar("Item")


async def run_in_lanes(
    items: Iterable[Item],
    lanes: int,
    run_item: Callable[[Item, asyncio.Event], Awaitable[None]],
    hold: AbstractAsyncContextManager[object] | None = None,
    stop: Stop | None = None,
) -> None:
    """Run every item, at most `lanes` of them before their events are set; return when all end.

    `hold` is entered for as long as lanes run (the batch's concurrency slots), not
    while the last items finish. An item's event is set for it when it ends, however
    it ends, so a lane never waits for an item that is gone. Once `stop` is set, no
    lane starts another item, and the items started get `STOP_GRACE_SECONDS` to
    finish (a row lets go of its request at once; one archiving finishes) before
    they are cancelled. When this is cancelled, the items still finishing are
    cancelled with it.
    """
    waiting = deque(items)
    lanes = min(lanes, len(waiting))
    if not lanes:
        return
    finishing: list[asyncio.Task[None]] = []

    async def run_one(item: Item, released: asyncio.Event) -> None:
        try:
            await run_item(item, released)
        finally:
            released.set()

    async def lane() -> None:
        while waiting and not (stop is not None and stop.is_set):
            released = asyncio.Event()
            finishing.append(asyncio.create_task(run_one(waiting.popleft(), released)))
            await released.wait()

    async def run_all() -> None:
        async with hold or nullcontext():
            await asyncio.gather(*(lane() for _ in range(lanes)))
        await asyncio.gather(*finishing)

    running = asyncio.ensure_future(run_all())
    try:
        if stop is None:
            await running
            return
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The task awaiting the lanes was cancelled (a caller's timeout, a notebook's
            # interrupt): the same stop as a cancel, then the cancellation goes on.
            stop.set("cancelling")
            await asyncio.wait({running}, timeout=STOP_GRACE_SECONDS)
            raise
        finally:
            stopping.cancel()
        if not running.done():
            await asyncio.wait({running}, timeout=STOP_GRACE_SECONDS)
        if running.done():
            running.result()
    finally:
        running.cancel()
        for task in finishing:
            task.cancel()
        await asyncio.gather(running, *finishing, return_exceptions=True)
