"""The CLI's `edit` verb: one edit with a live status line.

`edit` works without a Prefect server (stage → submit → wait → save, straight
through the client and storage rooms), so one image does not wait for one. Local
images go inline (as `data:` URIs) unless `--staging` names where to upload them.
It ends by saying where each file went and what the request cost; `--out DIR`
puts the files, named by the request, directly in `DIR`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from ..client import NanoBananaEditInput, RequestStatus, RunComfyClient, RunComfyError
from ..client.pricing import BudgetExceededError, estimate_edit, format_usd
from ..client.vocabulary import NANO_BANANA_EDIT_MODEL_ID
from .connection import client_for
from .exit_codes import EXIT_OK, UsageError
from .requests import format_cost

if TYPE_CHECKING:  # the guard imports Prefect: only `edit` itself pays for it
    from ..guard.protocol import SubmittedRequest

DEFAULT_OUT = "nanobanana-output"


class _StatusDisplay:
    """One live line on a terminal; one plain line per change otherwise (logs, CI)."""

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream or sys.stderr
        self._live = self._stream.isatty()
        self._started = time.monotonic()
        self.request_id: str | None = None

    def __call__(self, status: RequestStatus) -> None:
        position = f", queue position {status.queue_position}" if status.queue_position else ""
        text = (
            f"{status.request_id}: {status.status}{position} "
            f"({time.monotonic() - self._started:.1f} s)"
        )
        if self._live:
            self._stream.write("\r\033[K" + text)
            if status.is_terminal:
                self._stream.write("\n")
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def say(self, text: str) -> None:
        if self._live:
            self._stream.write("\r\033[K")
        self._stream.write(text + "\n")
        self._stream.flush()


def _withdraw(client: RunComfyClient, request_id: str, display: _StatusDisplay) -> None:
    """Ctrl-C: withdraw the request if still queued (the guard's one way), and say so."""
    from ..guard.protocol import cancel_if_queued

    outcome = cancel_if_queued(client, request_id, log=logging.getLogger(__name__))
    if outcome == "cancelled":
        display.say(f"Interrupted: request {request_id} was still queued; cancel: {outcome}.")
    elif outcome is not None:
        display.say(
            f"Interrupted: request {request_id} is already running and cannot be cancelled; "
            f"collect it later with `nanobanana result {request_id} --download DIR`."
        )


def _refuse_over_budget(
    client: RunComfyClient,
    edit: NanoBananaEditInput,
    max_cost_usd: float | None,
    display: _StatusDisplay,
    daily_budget_usd: float | None = None,
) -> float | None:
    """`--max-cost`, `--daily-budget`: the listed price, and `BudgetExceededError` before
    anything is paid when over `--max-cost` or unknown; the estimate."""
    info, failure = None, None
    try:
        info = client.model_info()
    except RunComfyError as error:
        failure = f"the price lookup failed: {error}"
    estimate = estimate_edit(info, edit, max_cost_usd, lookup_failure=failure)
    if estimate is None:
        # Without an estimate the daily total could not count this edit.
        from ..storage.budget import DAILY_BUDGET_NAME

        raise BudgetExceededError(
            None, daily_budget_usd or 0.0, 1, reason=failure, cap_name=DAILY_BUDGET_NAME
        )
    budget = format_usd(max_cost_usd) if max_cost_usd is not None else "none"
    display.say(
        f"Estimated cost {format_usd(estimate.estimate_usd)} (an estimate from the listed "
        f"price; budget {budget})"
    )
    return estimate.estimate_usd


def daily_budget_for(daily_budget_usd: float | None, archive: str | None) -> Any:
    """`--daily-budget`: a `Budget` drawing on the archive's daily total, as the flows keep
    it (`--archive`, else the flows' default archive: never a plain `--out` folder of
    images); None without a cap."""
    if daily_budget_usd is None:
        return None
    from ..pipeline import Budget
    from ..storage import DEFAULT_ARCHIVE_URI
    from ..storage.budget import DailyBudget

    return Budget(shared=[DailyBudget(archive or DEFAULT_ARCHIVE_URI, daily_budget_usd)])


def reserve_daily(budget: Any, job_key: str, estimate: float | None) -> Any:
    """The guard's `before_submit` for `--daily-budget`: reserve right before the paid POST."""
    if budget is None:
        return None

    async def reserve() -> None:
        await budget.reserve(job_key, estimate, label="nanobanana CLI")

    return reserve


def settle_daily(budget: Any, job_key: str, bill: float | None) -> None:
    """The edit ended: its reservation in the daily total settles to `bill` (0: released)."""
    if budget is not None:
        asyncio.run(budget.end(job_key, bill))


def _refuse_another_edits_request(handle: SubmittedRequest, facts: dict[str, Any]) -> None:
    """A `--job-key` reused for a different edit: refuse before its outputs are saved.

    The key names the job, so the guard adopts whatever request it holds; a person who
    reused a key with a new prompt got the old picture, saved as if it were the new one.
    """
    recorded = handle.record.entry.facts if handle.record is not None else {}
    differs = [
        label
        for name, label in (
            ("prompt_sha256", "a different prompt"),
            ("parameters", "other options"),
        )
        if name in recorded and recorded[name] != facts[name]
    ]
    if (handle.adopted or handle.resumed) and differs:
        raise UsageError(
            f"job key {handle.job_key!r} already names request {handle.request_id}, an edit "
            f"with {' and '.join(differs)}: pass a new --job-key for this one"
        )


def run_edit_command(args: argparse.Namespace) -> int:
    """Stage, submit through the guard, wait with a live line, archive with metadata.json.

    With `--archive` or `--job-key` the job's record goes to the archive's ledger,
    like a batch row's: with `--job-key`, running the same command again (after a
    crash, Ctrl-C or on another machine sharing an S3 archive) adopts the request
    instead of paying again. A plain `--out DIR` is a person's folder of images:
    every run is a new edit, its request id printed at once and kept in its
    metadata file, and no `_ledger/` is left beside the images.
    """
    from ..guard.records import MemoryRecordStore
    from ..storage import (
        Ledger,
        check_urls,
        job_key_for,
        stage_assets,
    )
    from ..storage.backends import open_backend

    options = {
        "aspect_ratio": args.aspect_ratio,
        "resolution": args.resolution,
        "output_format": args.output_format,
        "num_images": args.num_images,
    }
    checked = NanoBananaEditInput(prompt=args.prompt, image_urls=args.images, **options)
    display = _StatusDisplay()
    estimate = None
    with RunComfyClient(base_url=args.base_url) as client:
        if args.max_cost is not None or args.daily_budget is not None:
            estimate = _refuse_over_budget(
                client, checked, args.max_cost, display, args.daily_budget
            )
    staged = stage_assets(args.images, args.staging)
    check_urls(staged)  # a URL that is no image would fail only after the submit is billed
    edit = NanoBananaEditInput(
        prompt=args.prompt, image_urls=[asset.url for asset in staged], **options
    )
    archive_uri = args.archive or args.out or DEFAULT_OUT
    records: Ledger | MemoryRecordStore = MemoryRecordStore()
    if args.archive or args.job_key:
        records = Ledger(archive_uri)
    # Where the files go must be writable before the edit is paid for (an --out that
    # names a file failed only once the job had run).
    open_backend(archive_uri).check()
    job_key = args.job_key or job_key_for(args.prompt, args.images, options, scope=uuid4().hex)
    facts = {
        "model_id": NANO_BANANA_EDIT_MODEL_ID,
        "parameters": options,
        "prompt_sha256": hashlib.sha256(args.prompt.encode()).hexdigest(),
    }
    daily = daily_budget_for(args.daily_budget, args.archive)
    try:
        record, result, handle = _paid_part(
            args, job_key, records, edit, facts, staged, daily, estimate, display
        )
    except BaseException as error:
        from ..pipeline import bill_after

        settle_daily(daily, job_key, bill_after(error))
        raise
    settle_daily(daily, job_key, result.cost)
    payload = {
        "request_id": handle.request_id,
        "outputs": record.output_locations,
        "metadata": record.metadata_location,
        "cost": result.cost,
    }
    if args.json:
        print(json.dumps(payload))
    else:
        for output in record.outputs:
            kind = output.content_type.removeprefix("image/")
            size = f"{output.width}x{output.height} " if output.width and output.height else ""
            print(f"saved {output.location} ({size}{kind})")
        print(f"metadata {record.metadata_location}")
        print(format_cost(result.cost))
    return EXIT_OK


def _paid_part(
    args: argparse.Namespace,
    job_key: str,
    records: Any,
    edit: NanoBananaEditInput,
    facts: dict[str, Any],
    staged: Any,
    daily: Any,
    estimate: float | None,
    display: _StatusDisplay,
) -> tuple[Any, Any, SubmittedRequest]:
    """Submit through the guard (reserving in the daily total right before the POST), wait
    with the live line, archive and mark archived: the record, the result, the request."""
    from ..guard.protocol import mark_archived, submit_once_blocking
    from ..storage import ArchiveMetadata, archive_outputs

    options = edit.model_dump(include={"aspect_ratio", "resolution", "output_format", "num_images"})
    archive_uri = args.archive or args.out or DEFAULT_OUT
    with client_for(args) as client:
        handle = submit_once_blocking(
            job_key,
            records,
            client,
            edit,
            facts=facts,
            before_submit=reserve_daily(daily, job_key, estimate),
        )
        _refuse_another_edits_request(handle, facts)
        # From here on the request exists: no failure may say nothing was paid for.
        args.submitted_request_id = handle.request_id
        verb = "Adopted" if handle.adopted or handle.resumed else "Submitted"
        count = f"{args.num_images} image{'s' if args.num_images > 1 else ''}"
        display.say(f"{verb} request {handle.request_id} ({args.resolution}, {count})")
        try:
            result = client.wait(
                handle.request_id,
                args.timeout,
                resolution=args.resolution,
                on_status=display,
                submitted_at=handle.submitted_at,
            )
        except KeyboardInterrupt:
            _withdraw(client, handle.request_id, display)
            raise
    record = archive_outputs(
        handle.request_id,
        result.output_urls,
        date=result.created_at.date() if result.created_at else None,
        archive_uri=archive_uri,
        metadata=ArchiveMetadata(
            prompt=args.prompt,
            parameters=options,
            model_id=NANO_BANANA_EDIT_MODEL_ID,
            sources=[asset.provenance for asset in staged],
            created_at=result.created_at,
            finished_at=result.finished_at,
            cost=result.cost,
        ),
        flat=args.archive is None,  # --out (or the default): the files right there
        allowed_hosts=client.output_hosts,
    )
    # Done, with its bill: what `nanobanana spend --archive` adds up.
    asyncio.run(
        mark_archived(
            records,
            job_key,
            metadata_location=record.metadata_location,
            output_locations=record.output_locations,
            cost=result.cost,
            known=handle.record,
        )
    )
    return record, result, handle
