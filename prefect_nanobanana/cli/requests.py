"""The raw request verbs: `submit`, `status`, `cancel`, `result`, one API call each.

They talk to the client directly (no Prefect unless `--credentials` names a
block), print text for people or `--json` for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from ..client import RequestResult
from .connection import client_for, daily_budget_cap
from .exit_codes import EXIT_JOB_FAILED, EXIT_OK

if TYPE_CHECKING:
    from ..guard.protocol import SubmittedRequest
    from ..pipeline import Budget, Job


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload, default=str) if args.json else text)


def submit(args: argparse.Namespace) -> int:
    """One paid submit: the pipeline's first step alone (`Pipeline.submit`, through the
    submit guard; its record lives in this process only).

    With a daily cap (`--daily-budget`, else the `--credentials` block's
    `daily_budget_usd`) it reserves its estimate in the archive's daily total right
    before the POST; it does not wait for the bill, so the estimate stays counted.
    """
    from uuid import uuid4

    from ..client import NanoBananaEditInput
    from ..pipeline import Job
    from ..stop import signals_deferred
    from ..storage import stage_assets
    from .edit import StatusDisplay, daily_budget_for, refuse_over_budget

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
    estimate = None
    daily_cap = daily_budget_cap(args)
    if daily_cap is not None:
        with client_for(args) as client:
            estimate = refuse_over_budget(client, edit, None, StatusDisplay(), daily_cap)
    job = Job(
        job_key=uuid4().hex,
        prompt=edit.prompt,
        options=edit.model_dump(mode="json", exclude={"prompt", "image_urls"}),
        edit=edit,
        estimated_cost=estimate,
    )
    with signals_deferred():  # a stop takes effect once the request id is recorded
        handle = asyncio.run(_submit(args, job, daily_budget_for(daily_cap, args.archive)))
    payload = handle.model_dump(include={"request_id", "status_url", "result_url", "cancel_url"})
    _emit(args, payload, handle.request_id)
    return EXIT_OK


async def _submit(args: argparse.Namespace, job: Job, budget: Budget) -> SubmittedRequest:
    """`job`'s submit through the pipeline; its reservation in the day's total then keeps
    its estimate (not waited for: the bill is unknown), or is given back when provably
    nothing was billed."""
    from ..guard.records import MemoryRecordStore
    from ..pipeline import Pipeline, bill_after

    bill: float | None = None
    async with client_for(args, asynchronous=True) as client:  # type: ignore[attr-defined]
        pipeline = Pipeline(
            client=client, store=MemoryRecordStore(), budget=budget, log=logging.getLogger(__name__)
        )
        try:
            return await pipeline.submit(job)
        except BaseException as error:
            bill = bill_after(error)
            raise
        finally:
            await budget.end(job.job_key, bill)


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
        from .edit import format_cost

        lines.append(format_cost(result.cost))
    _emit(args, payload, "\n".join(lines))
    # A script branches on the job's end as it would after `edit`.
    return EXIT_JOB_FAILED if result.status in ("failed", "cancelled") else EXIT_OK
