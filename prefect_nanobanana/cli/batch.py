"""The CLI's `batch` verb: the `batch_edit` flow over a manifest, with a progress bar.

It runs the flow (its ledger, its concurrency limit) on Prefect, draws a bar over
rows as they finish, and prints a row table and the totals.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from .exit_codes import EXIT_JOB_FAILED, EXIT_OK


def run_batch_command(args: argparse.Namespace) -> int:
    from ..flows.batch import ROW_PROGRESS, BatchFailedError, batch_edit

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
                archive_uri=args.archive,
                staging_uri=args.staging,
                max_concurrency=args.max_concurrency,
                allow_partial=args.allow_partial,
                credentials=args.credentials,
            )
        )
        code = EXIT_OK
    except BatchFailedError as error:
        if error.result is None:
            raise
        result, code = error.result, EXIT_JOB_FAILED
    finally:
        ROW_PROGRESS.reset(token)
    print(f"{'row':>4}  {'status':<8}  {'request_id':<36}  {'cost':>6}  output / error")
    for row in result.rows:
        detail = row.output_locations[0] if row.output_locations else (row.error or "")
        cost = f"{row.cost:.2f}" if row.cost is not None else "-"
        print(f"{row.row:>4}  {row.status:<8}  {row.request_id or '-':<36}  {cost:>6}  {detail}")
    print(
        f"{result.archived} archived, {result.skipped} skipped, {result.adopted} adopted "
        f"(another run's request), {result.failed} failed; total cost "
        f"${result.total_cost:.2f} (${result.paid_cost:.2f} paid by this run); "
        f"results manifest {result.results_manifest}"
    )
    return code
