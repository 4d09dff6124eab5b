"""`nanobanana`: the command line for people and scripts.

Only argparse and the light client layer are imported at start, so `--help` is
instant; Prefect, storage and the emulator are imported by the verbs that need
them. Exit codes are distinct per failure kind so scripts can branch on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, get_args

from .client import errors
from .client.vocabulary import AspectRatio, OutputFormat, Resolution

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_AUTH = 3
EXIT_BALANCE = 4
EXIT_TIMEOUT = 5
EXIT_JOB_FAILED = 6
EXIT_OUTCOME_UNKNOWN = 7
EXIT_INTERRUPTED = 130


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Input errors raised before anything is paid; imported only once something failed."""
    from pydantic import ValidationError

    from .storage import LocationError, ManifestError, StagingError

    return (
        errors.InvalidRequestError,
        errors.NotFoundError,
        ValidationError,
        LocationError,
        StagingError,
        ManifestError,
        FileNotFoundError,
    )


# Most specific first: the first matching class decides the exit code and the hint.
_FAILURES: list[tuple[tuple[type[BaseException], ...], int, str]] = [
    (
        (errors.AuthenticationError, errors.PermissionDeniedError),
        EXIT_AUTH,
        "Set RUNCOMFY_API_TOKEN (or pass --credentials BLOCK) to a valid token.",
    ),
    ((errors.InsufficientBalanceError,), EXIT_BALANCE, "Top up the RunComfy account."),
    (
        (errors.WaitTimeoutError,),
        EXIT_TIMEOUT,
        "The job may still finish: `nanobanana result REQUEST_ID` collects it later.",
    ),
    (
        (errors.JobFailedError, errors.JobCancelledError),
        EXIT_JOB_FAILED,
        "Check the prompt and that every input URL is publicly fetchable.",
    ),
    (
        (errors.SubmitOutcomeUnknownError,),
        EXIT_OUTCOME_UNKNOWN,
        "Look at your RunComfy request history before submitting again.",
    ),
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
    _add_connection_options(edit)
    edit.set_defaults(handler=_edit)

    batch = verbs.add_parser("batch", help="Run every row of a JSONL/CSV manifest.")
    batch.add_argument("manifest", help="Manifest location: local path or s3://.")
    batch.add_argument("--archive", required=True, metavar="URI")
    batch.add_argument("--staging", metavar="URI")
    batch.add_argument("--max-concurrency", type=int, default=8)
    batch.add_argument("--allow-partial", action="store_true")
    batch.add_argument("--credentials", default="default", help="RunComfyCredentials block.")
    batch.set_defaults(handler=_batch)

    submit = verbs.add_parser("submit", help="Submit one edit and print its request id.")
    _add_edit_options(submit)
    submit.add_argument("--sync-mode", action="store_true")
    _add_connection_options(submit)
    submit.set_defaults(handler=_submit)

    for name, handler, summary in (
        ("status", _status, "Print a request's status."),
        ("cancel", _cancel, "Cancel a queued request."),
    ):
        verb = verbs.add_parser(name, help=summary)
        verb.add_argument("request_id")
        _add_connection_options(verb)
        verb.set_defaults(handler=handler)

    result = verbs.add_parser("result", help="Print a request's result; optionally download it.")
    result.add_argument("request_id")
    result.add_argument("--download", metavar="DIR", help="Save the outputs in this folder.")
    _add_connection_options(result)
    result.set_defaults(handler=_result)

    # Listed for --help only: `main` hands everything after "emulator" to its own parser.
    verbs.add_parser(
        "emulator",
        help="Run the offline RunComfy emulator (see `nanobanana emulator --help`).",
        add_help=False,
    )

    demo = verbs.add_parser("demo", help="Run the offline demo pipeline end to end.")
    demo.add_argument("--out", default="nanobanana-demo", metavar="DIR")
    demo.set_defaults(handler=_demo)
    return parser


def _version() -> str:
    from . import __version__

    return f"nanobanana {__version__}"


def _client(args: argparse.Namespace):
    from .client import RunComfyClient

    return RunComfyClient(base_url=args.base_url)


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload, default=str) if args.json else text)


def _submit(args: argparse.Namespace) -> int:
    from .client import NanoBananaEditInput

    edit = NanoBananaEditInput(
        prompt=args.prompt,
        image_urls=args.images,
        aspect_ratio=args.aspect_ratio,
        resolution=args.resolution,
        output_format=args.output_format,
        num_images=args.num_images,
        sync_mode=args.sync_mode,
    )
    with _client(args) as client:
        handle = client.submit_edit(edit)
    _emit(args, handle.model_dump(), handle.request_id)
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status(args.request_id)
    position = f" (queue position {status.queue_position})" if status.queue_position else ""
    _emit(args, status.model_dump(), f"{status.request_id}: {status.status}{position}")
    return EXIT_OK


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        outcome = client.cancel(args.request_id)
    _emit(args, outcome.model_dump(), f"{outcome.request_id}: {outcome.outcome}")
    return EXIT_OK


def _result(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.result(args.request_id)
    payload = result.model_dump(mode="json")
    lines = [f"{result.request_id}: {result.status}"]
    if args.download and result.status == "completed":
        from .storage import archive_outputs

        record = archive_outputs(
            result.request_id,
            result.output_urls,
            date=result.created_at.date() if result.created_at else None,
            archive_uri=args.download,
            metadata={"cost": result.cost, "created_at": result.created_at},
        )
        payload["saved"] = record.output_locations
        lines.extend(f"saved {location}" for location in record.output_locations)
    else:
        lines.extend(result.output_urls)
    _emit(args, payload, "\n".join(lines))
    return EXIT_OK


def _edit(args: argparse.Namespace) -> int:
    from .commands import run_edit_command

    return run_edit_command(args)


def _batch(args: argparse.Namespace) -> int:
    from .commands import run_batch_command

    return run_batch_command(args)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["emulator"]:
        from .emulator.__main__ import main as emulator_main

        return emulator_main(argv[1:])
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        failures = [
            *_FAILURES,
            (
                _bad_input_errors(),
                EXIT_BAD_INPUT,
                "Fix the input named above; nothing was paid for.",
            ),
        ]
        for classes, code, hint in failures:
            if isinstance(error, classes):
                print(f"error: {error}\n{hint}", file=sys.stderr)
                return code
        raise


if __name__ == "__main__":
    sys.exit(main())
