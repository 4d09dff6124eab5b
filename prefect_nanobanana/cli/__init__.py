"""`nanobanana`: the command line for people and scripts.

Only argparse and the light client layer are imported at start, so `--help` is
instant; Prefect, storage and the emulator are imported by the verbs that need
them. Exit codes are distinct per failure kind so scripts can branch on them
(`exit_codes.py`, the one table).

- `__init__.py`: the parser and `main` (the `nanobanana` script);
- `requests.py`: `submit`, `status`, `cancel`, `result`;
- `edit.py`: `edit`; `batch.py`: `batch`; `demo.py`: `demo`; `emulator` is the
  offline room's own command line (`prefect_nanobanana.emulator.__main__`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import get_args

from ..client.vocabulary import AspectRatio, OutputFormat, Resolution
from .exit_codes import (
    EXIT_AUTH,
    EXIT_BAD_INPUT,
    EXIT_BALANCE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_OUTCOME_UNKNOWN,
    EXIT_TIMEOUT,
    failure_of,
)

__all__ = [
    "EXIT_AUTH",
    "EXIT_BAD_INPUT",
    "EXIT_BALANCE",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_JOB_FAILED",
    "EXIT_OK",
    "EXIT_OUTCOME_UNKNOWN",
    "EXIT_TIMEOUT",
    "build_parser",
    "main",
]


def _add_edit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="The edit instruction.")
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


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-url", help="API base URL (default: RUNCOMFY_BASE_URL or the real API)."
    )
    parser.add_argument("--json", action="store_true", help="Print JSON for scripts.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanobanana",
        description="Nano Banana Pro image edits on the RunComfy Model API, with Prefect.",
        epilog="The API token is read from RUNCOMFY_API_TOKEN; it is never printed.",
    )
    parser.add_argument("--version", action="version", version=_version())
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    edit = verbs.add_parser("edit", help="Stage images, edit them and save the outputs.")
    _add_edit_options(edit)
    destination = edit.add_mutually_exclusive_group()
    destination.add_argument("--out", metavar="DIR", help="Save outputs in this folder.")
    destination.add_argument("--archive", metavar="URI", help="Archive to a folder or s3://.")
    edit.add_argument("--staging", metavar="URI", help="Where local inputs are uploaded.")
    edit.add_argument("--timeout", type=float, default=600.0, help="Seconds to wait.")
    edit.add_argument(
        "--job-key",
        help="Name the job: the same key again adopts its request instead of paying twice.",
    )
    _add_connection_options(edit)
    edit.set_defaults(handler="edit:run_edit_command")

    batch = verbs.add_parser("batch", help="Run every row of a JSONL/CSV manifest.")
    batch.add_argument("manifest", help="Manifest location: local path or s3://.")
    batch.add_argument("--archive", required=True, metavar="URI")
    batch.add_argument("--staging", metavar="URI")
    batch.add_argument("--max-concurrency", type=int, default=8)
    batch.add_argument("--allow-partial", action="store_true")
    batch.add_argument("--credentials", default="default", help="RunComfyCredentials block.")
    batch.set_defaults(handler="batch:run_batch_command")

    submit = verbs.add_parser("submit", help="Submit one edit and print its request id.")
    _add_edit_options(submit)
    submit.add_argument("--sync-mode", action="store_true")
    _add_connection_options(submit)
    submit.set_defaults(handler="requests:submit")

    for name, handler, summary in (
        ("status", "requests:status", "Print a request's status."),
        ("cancel", "requests:cancel", "Cancel a queued request."),
    ):
        verb = verbs.add_parser(name, help=summary)
        verb.add_argument("request_id")
        _add_connection_options(verb)
        verb.set_defaults(handler=handler)

    result = verbs.add_parser("result", help="Print a request's result; optionally download it.")
    result.add_argument("request_id")
    result.add_argument("--download", metavar="DIR", help="Save the outputs in this folder.")
    _add_connection_options(result)
    result.set_defaults(handler="requests:result")

    # Listed for --help only: `main` hands everything after "emulator" to its own parser.
    verbs.add_parser(
        "emulator",
        help="Run the offline RunComfy emulator (see `nanobanana emulator --help`).",
        add_help=False,
    )

    demo = verbs.add_parser("demo", help="Run the offline demo pipeline end to end.")
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
        failure = failure_of(error)
        if failure is None:
            raise
        code, hint = failure
        print(f"error: {error}\n{hint}", file=sys.stderr)
        return code
