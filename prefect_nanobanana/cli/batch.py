"""The CLI's `batch` verb: the `batch_edit` flow over a manifest or a location, with a
progress bar.

`--images DIR_OR_URI --prompt ...` makes every image under a folder, glob or S3
prefix a row (its relative path as id); a rerun pays only for images not archived
yet. For a manifest, first the pre-flight (`preflight.py`): every row is checked before Prefect's
server starts, all problems are listed with their lines, and nothing is
submitted when any row is bad unless `--allow-partial` (then the flow fails the
bad rows without paying for them and runs the rest). Then it runs the flow (its
ledger, its concurrency limit) on Prefect, draws a bar over rows as they finish,
and prints a row table and the totals.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING

from ..client.pricing import format_usd
from .connection import load_credentials_block
from .exit_codes import EXIT_BAD_INPUT, EXIT_JOB_FAILED, EXIT_OK, EXIT_OVER_BUDGET, UsageError
from .preflight import preflight_batch

if TYPE_CHECKING:
    from ..flows.batch import BatchDryRun


def print_dry_run(plan: BatchDryRun) -> int:
    """The rows to pay, the rows already done and the estimate; EXIT_BAD_INPUT if rows are
    invalid (a real run would fail them)."""
    for row in plan.rows:
        if row.action == "invalid":
            print(f"row {row.row}: invalid: {row.error}")
    print(
        f"Dry run, nothing submitted: {plan.rows_to_pay} rows to pay, {plan.rows_done} already "
        f"done (archived), {plan.rows_adopted} submitted earlier (adopted, nothing to pay), "
        f"{plan.rows_invalid} invalid"
    )
    if plan.estimated_cost is None:
        print("Estimated cost: unknown (the price lookup failed)")
    else:
        by_resolution = ", ".join(
            f"{resolution} {format_usd(usd)}"
            for resolution, usd in plan.estimated_by_resolution.items()
        )
        print(
            f"Estimated cost: {format_usd(plan.estimated_cost)} (an estimate from the listed "
            f"{format_usd(plan.base_price_usd or 0.0)} per image"
            + (f"; {by_resolution}" if by_resolution else "")
            + "; the bill may differ)"
        )
    return EXIT_BAD_INPUT if plan.rows_invalid else EXIT_OK


class _OneLineErrors(logging.Formatter):
    """Prefect's console format, less the tracebacks: a failed row or flow run is its one
    log line here, and the CLI's `error:` line and hint follow. The run's logs in Prefect
    (its API handler) keep the whole traceback, as `--debug` does here."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        # The record is shared with the other handlers: lend it without its traceback.
        kept = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self._inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = kept


def _console_without_tracebacks() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setFormatter(_OneLineErrors(handler.formatter or logging.Formatter()))


def _check_sources(args: argparse.Namespace) -> None:
    """A manifest or --images (with --prompt), not both: refused before anything starts."""
    if (args.manifest is None) == (args.images is None):
        raise UsageError("give a manifest or --images DIR_OR_URI (exactly one of them)")
    if args.images is not None and args.prompt is None:
        raise UsageError("--images needs --prompt: the edit every image gets")
    if args.images is None and (args.prompt or args.include or args.exclude):
        raise UsageError(
            "--prompt, --include and --exclude go with --images; a manifest's rows carry "
            "their own prompts"
        )


def run_batch_command(args: argparse.Namespace) -> int:
    _check_sources(args)
    if args.manifest is not None:
        code = _preflight(args)
        if code is not None:
            return code
    return _run(args)


def _preflight(args: argparse.Namespace) -> int | None:
    """The manifest's rows checked before Prefect starts; an exit code to stop with."""
    checked = preflight_batch(args.manifest, args.staging)
    if checked.problems:
        bad = len(checked.problems)
        print(f"{bad} of {checked.rows} rows of {args.manifest} cannot run:", file=sys.stderr)
        for problem in checked.problems:
            print(f"  {problem}", file=sys.stderr)
        if args.allow_partial and checked.unreadable:
            print(
                "Nothing was submitted: rows with wrong options cannot be skipped, because "
                "the flow cannot read the manifest at all. Fix them first.",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        if not args.allow_partial:
            print(
                "Nothing was submitted. Fix these rows, or pass --allow-partial to run the "
                "others (the bad rows then fail without being paid for).",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        print(f"--allow-partial: running the other {checked.rows - bad} rows.", file=sys.stderr)
    return None


def _run(args: argparse.Namespace) -> int:
    """The flow on Prefect, its rows drawn as a bar; the row table and the totals."""
    # Prefect gives its temporary server 20 s to start; a busy machine can need more.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from ..blocks.credentials import DEFAULT_CREDENTIALS_BLOCK

    if args.credentials != DEFAULT_CREDENTIALS_BLOCK:
        # A mistyped block fails here in one line, not as the flow run's traceback.
        load_credentials_block(args.credentials)
    from ..flows.batch import ROW_PROGRESS, BatchDryRun, BatchFailedError, batch_edit
    from ..observe import short_error

    if not args.debug:
        _console_without_tracebacks()

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // total
        line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} rows"
        if sys.stderr.isatty():
            sys.stderr.write("\r" + line + ("\n" if done == total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    token = ROW_PROGRESS.set(show)
    try:
        result = asyncio.run(
            batch_edit(
                manifest_uri=args.manifest,
                images_uri=args.images,
                prompt=args.prompt,
                include=args.include,
                exclude=args.exclude,
                daily_budget_usd=args.daily_budget,
                archive_uri=args.archive,
                staging_uri=args.staging,
                max_concurrency=args.max_concurrency,
                allow_partial=args.allow_partial,
                credentials=args.credentials,
                max_cost_usd=args.max_cost,
                dry_run=args.dry_run,
            )
        )
        code = EXIT_OK
    except BatchFailedError as error:
        if error.result is None:
            raise
        result = error.result
        code = EXIT_JOB_FAILED if result.failed else EXIT_OVER_BUDGET
    finally:
        ROW_PROGRESS.reset(token)
    if isinstance(result, BatchDryRun):
        return print_dry_run(result)
    print(
        f"{'row':>4}  {'id':<16}  {'status':<11}  {'request_id':<36}  {'cost':>6}  outputs / error"
    )
    for row in result.rows:
        # Every output of the row; an error on one line (the full text is in the manifest).
        detail = ", ".join(row.output_locations) or (short_error(row.error) or "")
        cost = f"{row.cost:.2f}" if row.cost is not None else "-"
        print(
            f"{row.row:>4}  {row.id or '-':<16}  {row.status:<11}  {row.request_id or '-':<36}  "
            f"{cost:>6}  {detail}"
        )
    estimated = (
        "" if result.estimated_cost is None else f" (estimated {format_usd(result.estimated_cost)})"
    )
    print(
        f"{result.new} new; "
        f"{result.archived} archived, {result.skipped} skipped, {result.adopted} adopted "
        f"(another run's request), {result.failed} failed, {result.over_budget} over budget; "
        f"total billed {format_usd(result.total_cost)} ({format_usd(result.paid_cost)} paid by "
        f"this run){estimated}; results manifest {result.results_manifest}"
    )
    return code
