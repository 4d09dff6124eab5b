"""The lane scheduler: work items through a fixed number of lanes, a lane per request in flight.

Knows nothing of Prefect, rows or the API, so it can be tested alone. A lane hands
an item an `asyncio.Event` and moves on to its next item as soon as the item sets
it (for a row: its request ended), while the item finishes on its own (a row
archives meanwhile: our I/O, not a request in flight).
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Generic, TypeVar

from ...stop import STOP_GRACE_SECONDS, Stop

Item = TypeVar("Item")


async def run_in_lanes(
    items: Iterable[Item] | AsyncIterable[Item],
    lanes: int,
    run_item: Callable[[Item, asyncio.Event], Awaitable[None]],
    hold: Callable[[int], AbstractAsyncContextManager[object]] | None = None,
    stop: Stop | None = None,
) -> None:
    """Run every item, at most `lanes` of them before their events are set; return when all end.

    `items` may be a stream (an async iterable): the lanes take its items as it
    produces them, so the first items run while later ones are still being made
    (a listed batch's rows, planned as the listing goes on).

    `hold(lanes)` is entered once the first item is there, for as long as the lanes
    run (the batch's concurrency slots, one a lane: no more lanes than a list has
    items), not while the last items finish. An item's event is
    set for it when it ends, however it ends, so a lane never waits for an item that
    is gone. Once `stop` is set, no lane starts another item, and the items started
    get `STOP_GRACE_SECONDS` to finish (a row lets go of its request at once; one
    archiving finishes) before they are cancelled. When this is cancelled, the items
    still finishing are cancelled with it.
    """
    feed = _Feed(items)
    finishing: list[asyncio.Task[None]] = []

    async def run_one(item: Item, released: asyncio.Event) -> None:
        try:
            await run_item(item, released)
        finally:
            released.set()

    def stopped() -> bool:
        return stop is not None and stop.is_set

    async def lane() -> None:
        while not stopped():
            item = await feed.next()
            if item is _END or stopped():
                return
            released = asyncio.Event()
            finishing.append(asyncio.create_task(run_one(item, released)))
            await released.wait()

    async def run_all() -> None:
        first = await feed.next()
        if first is _END:
            return  # no slots held for nothing
        feed.put_back(first)
        count = min(lanes, feed.most_lanes)
        async with hold(count) if hold is not None else nullcontext():
            await asyncio.gather(*(lane() for _ in range(count)))
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


class _End:
    """What a feed gives once it has no more items."""


_END = _End()


class _Feed(Generic[Item]):
    """The items the lanes take one at a time: a list's, or a stream's as it produces them."""

    def __init__(self, items: Iterable[Item] | AsyncIterable[Item]) -> None:
        self.waiting: deque[Item] = deque()
        self.stream: AsyncIterator[Item] | None = None
        if isinstance(items, AsyncIterable):
            self.stream = aiter(items)
        else:
            self.waiting.extend(items)
        # Lanes take a stream's items one after another: an async iterator serves one
        # caller at a time.
        self.turn = asyncio.Lock()

    @property
    def most_lanes(self) -> int:
        """How many lanes the items can keep busy: a list's length; a stream's, unknown."""
        return len(self.waiting) if self.stream is None else sys.maxsize

    def put_back(self, item: Item) -> None:
        self.waiting.appendleft(item)

    async def next(self) -> Item | _End:
        if self.waiting:
            return self.waiting.popleft()
        if self.stream is None:
            return _END
        async with self.turn:
            if self.waiting:
                return self.waiting.popleft()
            if self.stream is None:
                return _END
            try:
                return await anext(self.stream)
            except StopAsyncIteration:
                self.stream = None
                return _END
