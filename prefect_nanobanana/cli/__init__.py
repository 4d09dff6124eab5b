"""`nanobanana`: the command line for people and scripts.

Only argparse and the light client layer are imported at start, so `--help` is
instant; Prefect, storage and the emulator are imported by the verbs that need
them. Exit codes are distinct per failure kind so scripts can branch on them
(`exit_codes.py`, the one table).

- `__init__.py`: the parser and `main` (the `nanobanana` script);
- `requests.py`: `submit`, `status`, `cancel`, `result`;
- `edit.py`: `edit`; `batch.py`: `batch`; `spend.py`: `spend`; `demo.py`: `demo`; `emulator` is the
  offline room's own command line (`prefect_nanobanana.emulator.__main__`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import get_args

from ..client.vocabulary import AspectRatio, OutputFormat, Resolution
from .connection import add_connection_options
from .exit_codes import (
    EXIT_AUTH,
    EXIT_BAD_INPUT,
    EXIT_BALANCE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_NOT_SAVED,
    EXIT_OK,
    EXIT_OUTCOME_UNKNOWN,
    EXIT_OVER_BUDGET,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    FailureContext,
    failure_of,
)

__all__ = [
    "EXIT_AUTH",
    "EXIT_BAD_INPUT",
    "EXIT_BALANCE",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_JOB_FAILED",
    "EXIT_NOT_SAVED",
    "EXIT_OK",
    "EXIT_OUTCOME_UNKNOWN",
    "EXIT_OVER_BUDGET",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "build_parser",
    "main",
]


def _add_edit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, type=_prompt, help="The edit instruction.")
    parser.add_argument(
        "--image",
        dest="images",
        action="append",
        required=True,
        metavar="PATH|URL",
        help="An input image: local file, folder, glob, s3:// or https:// URL. Repeatable.",
    )
    parser.add_argument("--aspect-ratio", default="auto", choices=get_args(AspectRatio))
    parser.add_argument("--resolution", default="1K", choices=get_args(Resolution))
    parser.add_argument("--output-format", default="png", choices=get_args(OutputFormat))
    parser.add_argument("--num-images", type=int, default=1, choices=range(1, 5))


def _add_max_cost_option(parser: argparse.ArgumentParser, rows: bool = False) -> None:
    parser.add_argument(
        "--max-cost",
        type=_non_negative_float,
        metavar="USD",
        help="Budget: refuse before paying when the estimate is over it (or the price is "
        f"unknown){', and submit no row past it' if rows else ''}.",
    )


def _add_daily_budget_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--daily-budget",
        type=_non_negative_float,
        metavar="USD",
        help="A cap per UTC day shared by every run using the same archive (kept beside its "
        "ledger); a submit that would pass it is held back unpaid. Overrides the credentials "
        "block's daily_budget_usd.",
    )


# Checked by argparse, so a value that cannot work is refused before anything is paid.
def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def _number(text: str, kind: type[float] | type[int]) -> float | int:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanobanana",
        description="Nano Banana Pro image edits on the RunComfy Model API, with Prefect.",
        epilog="The API token is read from RUNCOMFY_API_TOKEN (or a block named with "
        "--credentials); it is never printed. Offline: nanobanana emulator --help.",
    )
    parser.add_argument("--version", action="version", version=_version())
    # Every verb takes --debug (after the verb, where people type it).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="Show the traceback of a failure too.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    edit = verbs.add_parser(
        "edit", parents=[common], help="Edit images and save the outputs, with the cost."
    )
    _add_edit_options(edit)
    destination = edit.add_mutually_exclusive_group()
    destination.add_argument(
        "--out",
        metavar="DIR",
        help="Save the outputs, named by the request, and REQUEST_ID.metadata.json directly "
        "in DIR (default: nanobanana-output).",
    )
    destination.add_argument(
        "--archive",
        metavar="URI",
        help="Archive to a folder or s3:// as the flows do: DATE/REQUEST_ID/N.EXT.",
    )
    edit.add_argument(
        "--staging",
        metavar="URI",
        help="Where local inputs are uploaded (s3://bucket/prefix or a loopback store URL); "
        "without it they are sent inline, up to 6 MiB each as data: URIs.",
    )
    edit.add_argument(
        "--timeout",
        type=_positive_float,
        default=600.0,
        help="Seconds to wait for the edit (default: 600).",
    )
    edit.add_argument(
        "--job-key",
        help="Name the job: the same key again adopts its request instead of paying twice.",
    )
    _add_max_cost_option(edit)
    _add_daily_budget_option(edit)
    add_connection_options(edit)
    edit.set_defaults(handler="edit:run_edit_command")

    batch = verbs.add_parser(
        "batch",
        parents=[common],
        help="Run every row of a JSONL/CSV manifest, or edit every image of a folder or prefix.",
    )
    batch.add_argument(
        "manifest", nargs="?", help="Manifest location: local path or s3:// (or use --images)."
    )
    batch.add_argument(
        "--images",
        metavar="DIR_OR_URI",
        help="A location as the batch: a folder, a glob or s3://bucket/prefix; every image "
        "gets --prompt, and a rerun pays only for images new or changed since.",
    )
    batch.add_argument("--prompt", type=_prompt, help="With --images: the edit every image gets.")
    batch.add_argument(
        "--include",
        action="append",
        metavar="PAT",
        help="With --images: a glob an image must match (default: image extensions). Repeatable.",
    )
    batch.add_argument(
        "--exclude",
        action="append",
        metavar="PAT",
        help="With --images: a glob that leaves images out (e.g. 'thumbs/**'). Repeatable.",
    )
    batch.add_argument(
        "--archive",
        required=True,
        metavar="URI",
        help="Folder or s3:// for the outputs, their metadata and the ledger.",
    )
    batch.add_argument(
        "--staging",
        metavar="URI",
        help="Where local inputs are uploaded; without it they are sent inline (≤ 6 MiB).",
    )
    batch.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=8,
        help="Rows in flight at once (default: 8).",
    )
    batch.add_argument(
        "--allow-partial",
        action="store_true",
        help="Run the good rows even when the pre-flight finds bad ones (those fail unpaid).",
    )
    batch.add_argument(
        "--credentials",
        default="default",
        metavar="BLOCK",
        help="A saved RunComfyCredentials block (default: 'default' if saved, else "
        "RUNCOMFY_API_TOKEN and RUNCOMFY_BASE_URL).",
    )
    _add_max_cost_option(batch, rows=True)
    _add_daily_budget_option(batch)
    batch.add_argument(
        "--dry-run",
        action="store_true",
        help="Validate every row and print the rows to pay and the estimate; submit nothing.",
    )
    batch.set_defaults(handler="batch:run_batch_command")

    spend = verbs.add_parser(
        "spend",
        parents=[common],
        help="Sum the billed cost by day from an archive's ledger (the bill check).",
    )
    spend.add_argument(
        "--archive", required=True, metavar="URI", help="The archive whose ledger to read."
    )
    spend.add_argument(
        "--since", type=_date, metavar="YYYY-MM-DD", help="Only days from this one on (UTC)."
    )
    spend.add_argument("--json", action="store_true", help="Print JSON for scripts.")
    spend.set_defaults(handler="spend:run_spend_command")

    submit = verbs.add_parser(
        "submit", parents=[common], help="Submit one edit and print its request id."
    )
    _add_edit_options(submit)
    submit.add_argument("--sync-mode", action="store_true")
    submit.add_argument(
        "--archive",
        metavar="URI",
        help="With --daily-budget: the archive whose daily total the submit counts in "
        "(default: nanobanana-archive, as the flows').",
    )
    _add_daily_budget_option(submit)
    add_connection_options(submit)
    submit.set_defaults(handler="requests:submit")

    for name, handler, summary in (
        ("status", "requests:status", "Print a request's status."),
        ("cancel", "requests:cancel", "Cancel a queued request."),
    ):
        verb = verbs.add_parser(name, parents=[common], help=summary)
        verb.add_argument("request_id")
        add_connection_options(verb)
        verb.set_defaults(handler=handler)

    result = verbs.add_parser(
        "result", parents=[common], help="Print a request's status, outputs and cost."
    )
    result.add_argument("request_id")
    result.add_argument(
        "--download", metavar="DIR", help="Save the outputs, named by the request, in DIR."
    )
    add_connection_options(result)
    result.set_defaults(handler="requests:result")

    # Listed for --help only: `main` hands everything after "emulator" to its own parser.
    verbs.add_parser(
        "emulator",
        help="Run the offline RunComfy emulator (see `nanobanana emulator --help`).",
        add_help=False,
    )

    demo = verbs.add_parser(
        "demo",
        parents=[common],
        help="Run the offline demo pipeline end to end (never touches a real account).",
    )
    demo.add_argument("--out", default="nanobanana-demo", metavar="DIR")
    demo.set_defaults(handler="demo:run_demo_command")
    return parser


def _version() -> str:
    from .. import __version__

    return f"nanobanana {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["emulator"]:
        from ..emulator.__main__ import main as emulator_main

        return emulator_main(argv[1:])
    args = build_parser().parse_args(argv)
    module_name, _, function_name = args.handler.partition(":")
    try:
        # The verb's module is imported only now: `--help` never pays for Prefect.
        handler: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module(f".{module_name}", __name__), function_name
        )
        return handler(args)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        return _report(error, args)


def _report(error: Exception, args: argparse.Namespace) -> int:
    """Say what failed and what to do, with the exit code of its kind; no traceback
    unless `--debug` (an unexpected failure says how to get one)."""
    from ..storage import redact_text

    if args.debug:
        traceback.print_exception(error)
    context = FailureContext(
        base_url=getattr(args, "api_base_url", None),
        has_credentials_flag=hasattr(args, "credentials"),
        # Set by a verb once its submit answered (`edit`).
        submitted_request_id=getattr(args, "submitted_request_id", None),
    )
    failure = failure_of(error, context)
    if failure is None:
        print(
            f"error: unexpected {type(error).__name__}: {redact_text(str(error))}", file=sys.stderr
        )
        if context.submitted_request_id:
            print(
                f"Request {context.submitted_request_id} was submitted: `nanobanana result "
                f"{context.submitted_request_id} --download DIR` saves its outputs.",
                file=sys.stderr,
            )
        if not args.debug:
            print("Run it again with --debug to see the traceback.", file=sys.stderr)
        return EXIT_ERROR
    code, hint = failure
    print(f"error: {redact_text(str(error))}\n{hint}", file=sys.stderr)
    return code
