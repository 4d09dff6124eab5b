"""What a batch tells afterwards: the results manifest, the artifacts, the log line."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import ContextVar
from datetime import datetime
from functools import partial
from typing import Any
from uuid import UUID, uuid4

from anyio import to_thread
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.logging import get_run_logger

from ... import observe
from ...client.pricing import format_usd, spend_by_resolution
from ...previews import DEFAULT_PREVIEW_ROWS, ShownRow, preview_markdown
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


def _shown(row: BatchRowResult) -> ShownRow:
    return ShownRow(
        label=row.id or f"row {row.row}",
        status=row.status,
        request_id=row.request_id,
        sources=row.sources,
        output_locations=row.output_locations,
        output_thumbnails=row.output_thumbnails,
        metadata_location=row.metadata_location,
        error=observe.short_error(redact_text(row.error) if row.error else None),
    )


def _report_markdown(
    rows: list[BatchRowResult], total_cost: float, s3_client: Any, preview_rows: int
) -> str:
    summary = (
        f"{sum(r.new for r in rows)} new (unknown to the ledger when planned); "
        f"{sum(r.status == 'archived' for r in rows)} archived, "
        f"{sum(r.status == 'skipped' for r in rows)} skipped (done earlier), "
        f"{sum(r.status == 'adopted' for r in rows)} adopted (another run's request), "
        f"{sum(r.status == 'failed' for r in rows)} failed, "
        f"{sum(r.status == 'over_budget' for r in rows)} held back by the budget; "
        f"total billed {format_usd(total_cost)}."
    )
    return preview_markdown(
        "Nano Banana batch",
        [_shown(row) for row in rows],
        s3_client=s3_client,
        preview_rows=preview_rows,
        summary=summary,
    )


def _table_rows(rows: list[BatchRowResult]) -> list[dict[str, Any]]:
    """The table artifact: every row by its id, all its outputs, a one-line error."""
    return [
        {
            "row": row.row,
            "id": row.id,
            "status": row.status,
            "request_id": row.request_id,
            "adopted_from": row.adopted_from,
            "seconds": row.seconds,
            "cost": row.cost,
            "estimated_cost": row.estimated_cost,
            "outputs": "\n".join(row.output_locations),
            "metadata": row.metadata_location,
            "error": observe.short_error(row.error),
        }
        for row in rows
    ]


def cost_summary_markdown(rows: list[BatchRowResult]) -> str:
    """The run's money: estimated beside billed, by resolution, for the rows it paid for."""
    paid = [row for row in rows if row.estimated_cost is not None and row.status != "over_budget"]
    lines = spend_by_resolution(
        (row.resolution or "?", row.estimated_cost, row.cost) for row in paid
    )
    table = [
        "# Nano Banana batch: cost",
        "",
        "Estimates come from the listed price (no guaranteed minimum); bills from RunComfy.",
        "",
        "| resolution | rows paid | estimated | billed |",
        "| --- | --- | --- | --- |",
    ]
    for line in lines:
        table.append(
            f"| {line.resolution} | {line.rows} | {format_usd(line.estimated_usd)} (estimate) "
            f"| {format_usd(line.billed_usd)} |"
        )
    table.append(
        f"| all | {sum(line.rows for line in lines)} "
        f"| {format_usd(sum(line.estimated_usd for line in lines))} (estimate) "
        f"| {format_usd(sum(line.billed_usd for line in lines))} |"
    )
    held = [row for row in rows if row.status == "over_budget"]
    earlier = sum(row.cost or 0.0 for row in rows if row.status == "skipped")
    table += [
        "",
        f"Held back by the budget, unpaid: {len(held)} rows "
        f"(estimated {format_usd(sum(row.estimated_cost or 0.0 for row in held))}).",
        f"Billed in earlier runs for the rows archived then (skipped now): {format_usd(earlier)}.",
    ]
    return "\n".join(table)


async def _finish_batch(
    rows: list[BatchRowResult],
    results_location: str,
    allow_partial: bool,
    aws_credentials: str | None,
    archive_uri: str,
    preview_rows: int = DEFAULT_PREVIEW_ROWS,
    estimated_cost: float | None = None,
) -> BatchEditResult:
    """Write the results manifest and artifacts; raise when rows failed or were held back by
    the budget, unless allowed."""
    results_target, results_s3 = resolve_location(results_location, aws_credentials)
    await to_thread.run_sync(
        partial(
            write_results_manifest,
            results_target,
            [row.model_dump(mode="json") for row in rows],
            s3_client=results_s3,
        )
    )
    # The batch's cost counts every row's bill, whichever run paid for it (a rerun
    # reports the whole batch; a failed row carries one only when it was billed);
    # `paid_cost` is what this run itself paid.
    total_cost = round(sum(row.cost or 0.0 for row in rows), 6)
    result = BatchEditResult(
        rows=rows,
        results_manifest=results_location,
        archived=sum(row.status == "archived" for row in rows),
        skipped=sum(row.status == "skipped" for row in rows),
        adopted=sum(row.status == "adopted" for row in rows),
        failed=sum(row.status == "failed" for row in rows),
        over_budget=sum(row.status == "over_budget" for row in rows),
        new=sum(row.new for row in rows),
        total_cost=total_cost,
        estimated_cost=estimated_cost,
        paid_cost=round(
            sum(row.cost or 0.0 for row in rows if row.status in ("archived", "failed")), 6
        ),
    )
    await acreate_table_artifact(
        key=observe.BATCH_ROWS_KEY,
        table=redact(_table_rows(rows)),
        description=f"Rows of the batch; results manifest: {results_location}",
    )
    _, archive_s3 = resolve_location(archive_uri, aws_credentials)
    report = await to_thread.run_sync(_report_markdown, rows, total_cost, archive_s3, preview_rows)
    await acreate_markdown_artifact(
        key=observe.BATCH_REPORT_KEY,
        markdown=report,
        description=f"Before and after of the first {preview_rows} rows, and where they went",
    )
    await acreate_markdown_artifact(
        key="nanobanana-batch-cost",
        markdown=cost_summary_markdown(rows),
        description="Estimated beside billed cost, by resolution",
    )
    get_run_logger().info(
        "Batch done: %d new; %d archived, %d skipped, %d adopted, %d failed, %d held back by "
        "the budget; total billed %s (%s paid by this run; estimated for its rows: %s); "
        "results in %s",
        result.new,
        result.archived,
        result.skipped,
        result.adopted,
        result.failed,
        result.over_budget,
        format_usd(total_cost),
        format_usd(result.paid_cost),
        "unknown" if estimated_cost is None else format_usd(estimated_cost),
        results_location,
    )
    if (result.failed or result.over_budget) and not allow_partial:
        problems = []
        if result.failed:
            problems.append(f"{result.failed} of {len(rows)} rows failed")
        if result.over_budget:
            problems.append(
                f"{result.over_budget} of {len(rows)} rows were held back by the budget "
                "(max_cost_usd or daily_budget_usd), unpaid"
            )
        raise BatchFailedError(
            f"{' and '.join(problems)} (every success is archived; see {results_location}); "
            "rerun to retry them, or pass allow_partial=True",
            result,
        )
    return result


class BatchProgress:
    """Rows done so far, told to an in-process listener and to the run's progress artifact.

    Updates go out from one background task, never from the lanes: a lane that
    waited on the Prefect API before its next submit would leave its API slot idle.
    At most a hundred updates, however long the batch, and always the latest figure.
    """

    def __init__(self, artifact_id: UUID | None) -> None:
        self.total = 0
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

    def rows_planned(self, count: int) -> None:
        """Count `count` more rows in all (a listed batch's total grows as it is listed)."""
        self.total += count

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
