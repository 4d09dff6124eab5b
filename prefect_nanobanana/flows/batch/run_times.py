"""The batch's wait schedule starts from the run times earlier batches saw, and saves its own.

Kept with the archive (`RunTimeHistory`, `{archive}/_run_times.json`), so every run
and every chunk that shares an archive learns from the others; see
`RunDurationEstimator.seed`. Run times are priors, not records: a history that
cannot be read or written costs a little polling, never the batch.
"""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from prefect.logging import get_run_logger

from ...client import NANO_BANANA_EDIT_MODEL_ID, AsyncRunComfyClient
from ...storage import RunTimeHistory


async def alearn_run_times(
    client: AsyncRunComfyClient, archive_location: Any, s3_client: Any
) -> RunTimeHistory | None:
    """Seed the client's estimator from the archive's history; the history, to save to."""
    try:
        history = RunTimeHistory(archive_location, s3_client=s3_client)
        saved = await to_thread.run_sync(history.load, NANO_BANANA_EDIT_MODEL_ID)
    except Exception as error:  # a prior only: the batch goes on from the reported times
        get_run_logger().warning("Could not read earlier run times: %s", error)
        return None
    client.duration_estimator.seed(saved, client.polling_policy.time_scale)
    return history


async def asave_run_times(client: AsyncRunComfyClient, history: RunTimeHistory | None) -> None:
    """Add the run times this batch observed to the archive's history."""
    if history is None:
        return
    observed = client.duration_estimator.recorded(client.polling_policy.time_scale)
    try:
        await to_thread.run_sync(history.save, NANO_BANANA_EDIT_MODEL_ID, observed)
    except Exception as error:
        get_run_logger().warning("Could not save this batch's run times: %s", error)
