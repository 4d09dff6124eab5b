"""The CLI's `edit` verb: one edit with a live status line.

`edit` works without Prefect (stage, then the pipeline's submit → wait → save),
so one image does not wait for a server. Local
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
from typing import Any
from uuid import uuid4

from ..client import NanoBananaEditInput, RequestStatus, RunComfyClient, RunComfyError
from ..client.pricing import BudgetExceededError, estimate_edit, format_usd
from ..guard.protocol import SubmittedRequest
from ..guard.records import RecordStore
from ..pipeline import Budget, Job, JobOutcome, Observer, Pipeline
from ..stop import Stop, stop_on_signals
from .connection import client_for, daily_budget_cap
from .exit_codes import EXIT_OK, UsageError

DEFAULT_OUT = "nanobanana-output"


class StatusDisplay:
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


def refuse_over_budget(
    client: RunComfyClient,
    edit: NanoBananaEditInput,
    max_cost_usd: float | None,
    display: StatusDisplay,
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
        from ..storage.budget import DAILY_BUDGET_NAME

        # Without an estimate the daily total could not count this edit.
        raise BudgetExceededError(
            None, daily_budget_usd or 0.0, 1, reason=failure, cap_name=DAILY_BUDGET_NAME
        )
    caps = [
        f"{name} {format_usd(cap)}"
        for name, cap in (("max cost", max_cost_usd), ("daily cap", daily_budget_usd))
        if cap is not None
    ]
    display.say(
        f"Estimated cost {format_usd(estimate.estimate_usd)} (an estimate from the listed "
        f"price; budget {', '.join(caps) or 'none'})"
    )
    return estimate.estimate_usd


def daily_budget_for(daily_budget_usd: float | None, archive: str | None) -> Budget:
    """`--daily-budget`: a `Budget` drawing on the archive's daily total, as the flows keep
    it (`--archive`, else the flows' default archive: never a plain `--out` folder of
    images); one that counts without refusing when no cap is given."""
    if daily_budget_usd is None:
        return Budget()
    from ..storage import DEFAULT_ARCHIVE_URI
    from ..storage.budget import DailyBudget

    return Budget(shared=[DailyBudget(archive or DEFAULT_ARCHIVE_URI, daily_budget_usd)])


def format_cost(cost: float | None) -> str:
    """The billed cost as people read it; the API reports it once a request completed."""
    return "cost: not reported (yet)" if cost is None else f"cost ${cost:.2f}"


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


class _EditObserver(Observer):
    """The CLI's view of its one job: the request named at once, then its status line."""

    def __init__(
        self, args: argparse.Namespace, display: StatusDisplay, facts: dict[str, Any]
    ) -> None:
        self._args = args
        self._display = display
        self._facts = facts

    def holding(self, job: Job, request: SubmittedRequest) -> None:
        _refuse_another_edits_request(request, self._facts)
        # From here on the request exists: no failure may say nothing was paid for.
        self._args.submitted_request_id = request.request_id
        verb = "Adopted" if request.adopted or request.resumed else "Submitted"
        count = f"{self._args.num_images} image{'s' if self._args.num_images > 1 else ''}"
        self._display.say(f"{verb} request {request.request_id} ({self._args.resolution}, {count})")

    def status(self, job: Job, status: RequestStatus) -> None:
        self._display(status)


def run_edit_command(args: argparse.Namespace) -> int:
    """Stage, submit through the guard, wait with a live line, archive with metadata.json.

    The steps are the pipeline's, as for a batch row, without Prefect. With
    `--archive` or `--job-key` the job's record goes to the archive's ledger, like a
    batch row's: with `--job-key`, running the same command again (after a crash,
    Ctrl-C or on another machine sharing an S3 archive) adopts the request instead
    of paying again. A plain `--out DIR` is a person's folder of images: every run
    is a new edit, its request id printed at once and kept in its metadata file, and
    no `_ledger/` is left beside the images. Ctrl-C (or SIGTERM) is the run's stop:
    a request still queued is withdrawn, a running one is named for `result`.
    """
    from ..guard.records import MemoryRecordStore
    from ..storage import Ledger, check_urls, job_key_for, stage_assets
    from ..storage.backends import open_backend

    options = {
        "aspect_ratio": args.aspect_ratio,
        "resolution": args.resolution,
        "output_format": args.output_format,
        "num_images": args.num_images,
    }
    checked = NanoBananaEditInput(prompt=args.prompt, image_urls=args.images, **options)
    display = StatusDisplay()
    estimate = None
    daily_cap = daily_budget_cap(args)
    if args.max_cost is not None or daily_cap is not None:
        with client_for(args) as client:
            estimate = refuse_over_budget(client, checked, args.max_cost, display, daily_cap)
    staged = stage_assets(args.images, args.staging)
    check_urls(staged)  # a URL that is no image would fail only after the submit is billed
    archive_uri = args.archive or args.out or DEFAULT_OUT
    records: Ledger | MemoryRecordStore = MemoryRecordStore()
    if args.archive or args.job_key:
        records = Ledger(archive_uri)
    # Where the files go must be writable before the edit is paid for (an --out that
    # names a file failed only once the job had run).
    open_backend(archive_uri).check()
    facts = {"prompt_sha256": hashlib.sha256(args.prompt.encode()).hexdigest()}
    job = Job(
        job_key=args.job_key or job_key_for(args.prompt, args.images, options, scope=uuid4().hex),
        prompt=args.prompt,
        options=options,
        sources=[asset.provenance for asset in staged],
        edit=NanoBananaEditInput(
            prompt=args.prompt, image_urls=[asset.url for asset in staged], **options
        ),
        facts=facts,
        estimated_cost=estimate,
    )
    observer = _EditObserver(args, display, {**facts, "parameters": options})
    budget = daily_budget_for(daily_cap, args.archive)
    outcome = asyncio.run(_run(args, job, records, archive_uri, observer, budget))
    if outcome.status == "over_budget" and outcome.refusal is not None:
        raise outcome.refusal  # held back before its submit: nothing paid
    if outcome.status == "stopped":
        request_id = outcome.request_id
        if outcome.withdrawn:
            display.say(f"Interrupted: request {request_id} was still queued; cancel: cancelled.")
        else:
            display.say(
                f"Interrupted: request {request_id} is already running and cannot be "
                f"cancelled; collect it later with `nanobanana result {request_id} --download DIR`."
            )
        raise KeyboardInterrupt
    if outcome.status == "not_started":
        raise KeyboardInterrupt
    _print_outcome(args, outcome)
    return EXIT_OK


async def _run(
    args: argparse.Namespace,
    job: Job,
    records: RecordStore,
    archive_uri: str,
    observer: _EditObserver,
    budget: Budget,
) -> JobOutcome:
    """The job through the pipeline, Ctrl-C and SIGTERM being its stop."""
    stop = Stop()
    async with client_for(args, asynchronous=True) as client:  # type: ignore[attr-defined]
        pipeline = Pipeline(
            client=client,
            store=records,
            archive_uri=archive_uri,
            stop=stop,
            budget=budget,
            observer=observer,
            timeout_seconds=args.timeout,
            flat=args.archive is None,  # --out (or the default): the files right there
            log=logging.getLogger(__name__),
        )
        with stop_on_signals(stop, asyncio.get_running_loop()):
            return await pipeline.run(job)


def _print_outcome(args: argparse.Namespace, outcome: JobOutcome) -> None:
    """Where each file went and what the request cost (or the same as JSON)."""
    record, elsewhere = outcome.record, outcome.archived_elsewhere
    outputs = record.output_locations if record else elsewhere.output_locations  # type: ignore[union-attr]
    metadata = record.metadata_location if record else elsewhere.metadata_location  # type: ignore[union-attr]
    if args.json:
        payload = {
            "request_id": outcome.request_id,
            "outputs": outputs,
            "metadata": metadata,
            "cost": outcome.cost,
        }
        print(json.dumps(payload))
        return
    if record is not None:
        for output in record.outputs:
            kind = output.content_type.removeprefix("image/")
            size = f"{output.width}x{output.height} " if output.width and output.height else ""
            print(f"saved {output.location} ({size}{kind})")
    else:
        for location in outputs:
            print(f"archived earlier: {location}")
    print(f"metadata {metadata}")
    print(format_cost(outcome.cost))
