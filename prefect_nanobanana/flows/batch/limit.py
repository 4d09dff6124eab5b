"""The Prefect global concurrency limit all batch runs share: one API quota."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.asyncio import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_run_logger

DEFAULT_CONCURRENCY_LIMIT = "runcomfy-nano-banana"
# A crashed run's slots come back when their lease runs out; the holder renews it.
LEASE_SECONDS = 60.0


async def _ensure_concurrency_limit(name: str, limit: int) -> int:
    """The shared global concurrency limit's size, creating the limit if it is missing."""
    async with get_client() as prefect_client:
        try:
            existing = await prefect_client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            await prefect_client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit)
            )
            return limit
    if existing.limit != limit:
        get_run_logger().info(
            "Global concurrency limit %r allows %d requests in flight across all runs "
            "(this run asked for %d; the shared limit wins)",
            name,
            existing.limit,
            limit,
        )
    return existing.limit


def lane_slots(name: str, lanes: int) -> AbstractAsyncContextManager[object]:
    """One slot of the shared limit per lane, in one acquisition, held while the lanes run.

    Not a slot per row: each acquisition is a write on the Prefect server, and
    thousands of them, serialised by Prefect's client, made the server rather than
    the API the bottleneck. The lease lets a crashed run's slots come back.
    """
    return concurrency(name, occupy=lanes, strict=True, lease_duration=LEASE_SECONDS)
