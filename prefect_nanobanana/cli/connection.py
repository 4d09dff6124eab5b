"""Which API a verb talks to, and with which token: `--credentials`, `--base-url`, the environment.

Precedence, the same as the flows': a field set on the named block wins over the
environment variable; `--base-url` wins over both. Without `--credentials` only
the environment is read, so the verbs that talk to the API directly start
without Prefect. The base URL is kept on the parsed arguments, because the error
for an unreachable API must name it.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from .exit_codes import UsageError

if TYPE_CHECKING:  # the client (httpx, pydantic) is imported by the verbs, not by --help
    from ..client import RunComfyClient


def add_connection_options(parser: argparse.ArgumentParser, *, json_output: bool = True) -> None:
    """`--credentials`, `--base-url` (and `--json`) for a verb that calls the API."""
    parser.add_argument(
        "--credentials",
        metavar="BLOCK",
        help="A saved RunComfyCredentials block to use; its fields win over RUNCOMFY_API_TOKEN "
        "and RUNCOMFY_BASE_URL (default: those environment variables).",
    )
    parser.add_argument(
        "--base-url",
        type=_base_url,
        help="API base URL (default: the block's, RUNCOMFY_BASE_URL or the real API).",
    )
    if json_output:
        parser.add_argument("--json", action="store_true", help="Print JSON for scripts.")


def _base_url(text: str) -> str:
    """`--base-url`, checked by argparse: a value that is no URL is a usage error at once."""
    from ..client.client import check_base_url  # the client's one check; only when given

    try:
        return check_base_url(text, source="")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).strip()) from None


def client_for(args: argparse.Namespace) -> RunComfyClient:
    """The client the verb's flags ask for; `args.api_base_url` names where it points."""
    from ..client import RunComfyClient
    from ..client.client import resolve_base_url

    block = load_credentials_block(args.credentials) if args.credentials else None
    block_url = block.base_url if block is not None else None
    args.api_base_url = resolve_base_url(args.base_url or block_url)
    if block is None:
        return RunComfyClient(base_url=args.api_base_url)
    return RunComfyClient(
        api_token=block.api_token, base_url=args.api_base_url, timeout=block.request_timeout
    )


def load_credentials_block(name: str):
    """The saved `RunComfyCredentials` block `name`, from the Prefect API in use.

    A missing block is a usage error naming it; the Prefect import is paid only here.
    """
    from ..blocks import RunComfyCredentials

    try:
        return RunComfyCredentials.load(name, _sync=True)
    except ValueError as error:
        if "Unable to find block document" not in str(error):
            raise
        raise UsageError(
            f"no RunComfyCredentials block named {name!r} is saved on this Prefect API "
            f"(PREFECT_API_URL={os.environ.get('PREFECT_API_URL') or 'unset: the local one'}). "
            # Worded without "api_token=": the redaction would take the rest for a token.
            "Save a RunComfyCredentials block under that name, or leave out --credentials "
            "to use RUNCOMFY_API_TOKEN"
        ) from None
