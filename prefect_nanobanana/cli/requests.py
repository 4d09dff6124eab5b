"""The raw request verbs: `submit`, `status`, `cancel`, `result`, one API call each.

They talk to the client directly (no Prefect unless `--credentials` names a
block), print text for people or `--json` for scripts.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..client import RequestResult
from .connection import client_for, daily_budget_cap
from .exit_codes import EXIT_JOB_FAILED, EXIT_OK


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload, default=str) if args.json else text)


def format_cost(cost: float | None) -> str:
    """The billed cost as people read it; the API reports it once a request completed."""
    return "cost: not reported (yet)" if cost is None else f"cost ${cost:.2f}"


def submit(args: argparse.Namespace) -> int:
    """One paid submit, through the submit guard (its record lives in this process only).

    With a daily cap (`--daily-budget`, else the `--credentials` block's
    `daily_budget_usd`) it reserves its estimate in the archive's daily total right
    before the POST; it does not wait for the bill, so the estimate stays counted.
    """
    from uuid import uuid4

    from ..client import NanoBananaEditInput
    from ..guard.protocol import submit_once_blocking
    from ..guard.records import MemoryRecordStore
    from ..storage import stage_assets

    NanoBananaEditInput(prompt=args.prompt, image_urls=args.images)  # the count, before any file
    # URLs go as they are; a local image goes inline, as `edit` sends it without --staging.
    edit = NanoBananaEditInput(
        prompt=args.prompt,
        image_urls=[asset.url for asset in stage_assets(args.images)],
        aspect_ratio=args.aspect_ratio,
        resolution=args.resolution,
        output_format=args.output_format,
        num_images=args.num_images,
        sync_mode=args.sync_mode,
    )
    job_key = uuid4().hex
    from .edit import (
        _refuse_over_budget,
        _StatusDisplay,
        daily_budget_for,
        reserve_daily,
        settle_daily,
    )

    estimate = None
    daily_cap = daily_budget_cap(args)
    if daily_cap is not None:
        with client_for(args) as client:
            estimate = _refuse_over_budget(client, edit, None, _StatusDisplay(), daily_cap)
    daily = daily_budget_for(daily_cap, args.archive)
    with client_for(args) as client:
        try:
            handle = submit_once_blocking(
                job_key,
                MemoryRecordStore(),
                client,
                edit,
                before_submit=reserve_daily(daily, job_key, estimate),
            )
        except BaseException as error:
            from ..pipeline import bill_after

            settle_daily(daily, job_key, bill_after(error))
            raise
    # Not waited for here: its estimate stays in the day's total (the bill is unknown).
    settle_daily(daily, job_key, None)
    payload = handle.model_dump(include={"request_id", "status_url", "result_url", "cancel_url"})
    _emit(args, payload, handle.request_id)
    return EXIT_OK


def status(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        status = client.status(args.request_id)
    position = f" (queue position {status.queue_position})" if status.queue_position else ""
    _emit(args, status.model_dump(), f"{status.request_id}: {status.status}{position}")
    return EXIT_OK


def cancel(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        outcome = client.cancel(args.request_id)
    _emit(args, outcome.model_dump(), f"{outcome.request_id}: {outcome.outcome}")
    return EXIT_OK


def result_lines(result: RequestResult) -> list[str]:
    """The status line, and the error of a failed request."""
    queue_position = (result.model_extra or {}).get("queue_position")
    position = f" (queue position {queue_position})" if queue_position else ""
    lines = [f"{result.request_id}: {result.status}{position}"]
    if result.status == "failed" and result.error:
        lines.append(f"error: {result.error}")
    return lines


def _shown(url: str) -> str:
    """An output URL to print: whole (people download it), but a data URI only by its type."""
    if url.startswith("data:"):
        return f"{url.partition(',')[0]},... ({len(url)} characters; --download DIR saves it)"
    return url


def result(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        result = client.result(args.request_id)
        output_hosts = client.output_hosts
    payload = result.model_dump(mode="json")
    lines = result_lines(result)
    if args.download and result.status == "completed":
        from ..storage import ArchiveMetadata, archive_outputs

        record = archive_outputs(
            result.request_id,
            result.output_urls,
            date=result.created_at.date() if result.created_at else None,
            archive_uri=args.download,
            metadata=ArchiveMetadata(
                cost=result.cost, created_at=result.created_at, finished_at=result.finished_at
            ),
            flat=True,
            allowed_hosts=output_hosts,
        )
        payload["saved"] = record.output_locations
        payload["metadata"] = record.metadata_location
        lines.extend(f"saved {location}" for location in record.output_locations)
        lines.append(f"metadata {record.metadata_location}")
    else:
        lines.extend(f"output {_shown(url)}" for url in result.output_urls)
    if result.status == "completed":
        lines.append(format_cost(result.cost))
    _emit(args, payload, "\n".join(lines))
    # A script branches on the job's end as it would after `edit`.
    return EXIT_JOB_FAILED if result.status in ("failed", "cancelled") else EXIT_OK
