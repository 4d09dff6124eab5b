"""What a batch tells afterwards: the results manifest, the artifacts, the log line."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import ContextVar
from datetime import datetime
from functools import partial
from uuid import UUID, uuid4

from anyio import to_thread
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.logging import get_run_logger

from ... import observe
from ...redaction import redact, redact_text
from ...storage import (
    write_results_manifest,
)
from ...tasks.storage import resolve_location
from .models import BatchEditResult, BatchFailedError, BatchRowResult

RESULTS_FOLDER = "_results"

# A caller in the same process (the CLI's progress bar) hears (rows done, rows in all).
ROW_PROGRESS: ContextVar[Callable[[int, int], None] | None] = ContextVar(
    "nanobanana_row_progress", default=None
)


def _results_location(archive_uri: str, results_uri: str | None) -> str:
    """`{archive}/_results/batch-{time}-{flow run id}.jsonl`: unique per run.

    The time sorts the manifests; the run id keeps two runs that end in the same
    second from writing one file.
    """
    if results_uri:
        return results_uri
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    run_id = observe.current_flow_run_id() or uuid4()
    return f"{archive_uri.rstrip('/')}/{RESULTS_FOLDER}/batch-{stamp}-{run_id}.jsonl"


def _report_markdown(rows: list[BatchRowResult], total_cost: float) -> str:
    lines = [
        "# Nano Banana batch",
        "",
        f"{sum(r.status == 'archived' for r in rows)} archived, "
        f"{sum(r.status == 'skipped' for r in rows)} skipped (done earlier), "
        f"{sum(r.status == 'adopted' for r in rows)} adopted (another run's request), "
        f"{sum(r.status == 'failed' for r in rows)} failed; total cost ${total_cost:.2f}.",
        "",
        "| row | request | status | inputs | outputs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        inputs = " ".join(f"[in {i}]({source})" for i, source in enumerate(row.sources))
        outputs = " ".join(
            f"[out {i}]({location})" for i, location in enumerate(row.output_locations)
        )
        detail = outputs or (row.error or "").replace("|", "/")[:200]
        lines.append(
            f"| {row.row} | `{row.request_id or '-'}` | {row.status} | {inputs} | {detail} |"
        )
    return "\n".join(lines)


async def _finish_batch(
    rows: list[BatchRowResult],
    results_location: str,
    allow_partial: bool,
    aws_credentials: str | None,
) -> BatchEditResult:
    """Write the results manifest and artifacts; raise when rows failed, unless allowed."""
    results_target, results_s3 = resolve_location(results_location, aws_credentials)
    await to_thread.run_sync(
        partial(
            write_results_manifest,
            results_target,
            [row.model_dump(mode="json") for row in rows],
            s3_client=results_s3,
        )
    )
    # The batch's cost counts every row with outputs, whichever run paid for it (a
    # rerun reports the whole batch); `paid_cost` is what this run itself paid.
    total_cost = round(sum(row.cost or 0.0 for row in rows if row.status != "failed"), 6)
    result = BatchEditResult(
        rows=rows,
        results_manifest=results_location,
        archived=sum(row.status == "archived" for row in rows),
        skipped=sum(row.status == "skipped" for row in rows),
        adopted=sum(row.status == "adopted" for row in rows),
        failed=sum(row.status == "failed" for row in rows),
        total_cost=total_cost,
        paid_cost=round(sum(row.cost or 0.0 for row in rows if row.status == "archived"), 6),
    )
    await acreate_table_artifact(
        key="nanobanana-batch-rows",
        table=redact(
            [
                {
                    "row": row.row,
                    "request_id": row.request_id,
                    "status": row.status,
                    "adopted_from": row.adopted_from,
                    "seconds": row.seconds,
                    "cost": row.cost,
                    "output": row.output_locations[0] if row.output_locations else None,
                    "error": row.error,
                }
                for row in rows
            ]
        ),
        description=f"Rows of the batch; results manifest: {results_location}",
    )
    await acreate_markdown_artifact(
        key="nanobanana-batch-report", markdown=redact_text(_report_markdown(rows, total_cost))
    )
    get_run_logger().info(
        "Batch done: %d archived, %d skipped, %d adopted, %d failed; total cost $%.2f "
        "($%.2f paid by this run); results in %s",
        result.archived,
        result.skipped,
        result.adopted,
        result.failed,
        total_cost,
        result.paid_cost,
        results_location,
    )
    if result.failed and not allow_partial:
        raise BatchFailedError(
            f"{result.failed} of {len(rows)} rows failed (every success is archived; see "
            f"{results_location}); rerun to retry them, or pass allow_partial=True",
            result,
        )
    return result


class BatchProgress:
    """Rows done so far, told to an in-process listener and to the run's progress artifact.

    Updates go out from one background task, never from the lanes: a lane that
    waited on the Prefect API before its next submit would leave its API slot idle.
    At most a hundred updates, however long the batch, and always the latest figure.
    """

    def __init__(self, total: int, artifact_id: UUID | None) -> None:
        self.total = total
        self.artifact_id = artifact_id
        self.done = 0
        self.percent_shown = 0
        self.percent_sent = 0
        self.sending: asyncio.Task[None] | None = None

    async def _send(self) -> None:
        # One update in flight, always the latest figure: a busy server gets fewer writes.
        while self.artifact_id is not None and self.percent_sent < self.percent_shown:
            percent = self.percent_shown
            await aupdate_progress_artifact(self.artifact_id, float(percent))
            self.percent_sent = percent

    def row_done(self) -> None:
        """Count one row; start sending the new percentage if none is on its way."""
        self.done += 1
        if (listener := ROW_PROGRESS.get()) is not None:
            listener(self.done, self.total)
        percent = 100 * self.done // self.total
        if self.artifact_id is not None and percent > self.percent_shown:
            self.percent_shown = percent
            if self.sending is None or self.sending.done():
                if self.sending is not None:
                    self.sending.result()  # a failed update fails the batch
                self.sending = asyncio.create_task(self._send())

    async def finish(self) -> None:
        """End on the truth, whatever the updater last sent."""
        if self.sending is not None:
            await self.sending
        if self.artifact_id is not None:
            await aupdate_progress_artifact(self.artifact_id, 100.0)
