"""Which API a verb talks to, and with which token: `--credentials`, `--base-url`, the environment.

Precedence, the same as the flows': a field set on the named block wins over the
environment variable; `--base-url` wins over both. Without `--credentials` only
the environment is read, so the verbs that talk to the API directly start
without Prefect; with it, and `PREFECT_API_URL` in the environment, the block is one
HTTP read of that API, still without Prefect. The base URL is kept on the parsed
arguments, because the error for an unreachable API must name it.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
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


def client_for(args: argparse.Namespace, *, asynchronous: bool = False) -> RunComfyClient:
    """The client the verb's flags ask for (its async twin with `asynchronous`);
    `args.api_base_url` names where it points."""
    from ..client import AsyncRunComfyClient, RunComfyClient
    from ..client.client import resolve_base_url

    client_class = AsyncRunComfyClient if asynchronous else RunComfyClient
    block = saved_credentials(args)
    block_url = block.base_url if block is not None else None
    args.api_base_url = resolve_base_url(args.base_url or block_url)
    if block is None:
        return client_class(base_url=args.api_base_url)  # type: ignore[return-value]
    return client_class(  # type: ignore[return-value]
        api_token=block.api_token,
        base_url=args.api_base_url,
        timeout=block.request_timeout,
        total_timeout=block.total_timeout,
        output_hosts=block.output_hosts,
    )


@dataclass(frozen=True)
class SavedCredentials:
    """The fields of a saved `RunComfyCredentials` block that the CLI's client uses."""

    api_token: str | None = field(repr=False)
    base_url: str | None
    request_timeout: float
    total_timeout: float
    output_hosts: list[str] | None
    daily_budget_usd: float | None = None


def saved_credentials(args: argparse.Namespace) -> SavedCredentials | None:
    """The block `--credentials` names, read once per command (None without the flag)."""
    name = getattr(args, "credentials", None)
    if not name:
        return None
    if getattr(args, "saved_credentials", None) is None:
        args.saved_credentials = load_credentials_block(name)
    return args.saved_credentials  # type: ignore[no-any-return]


def daily_budget_cap(args: argparse.Namespace) -> float | None:
    """The daily cap a paying verb uses: `--daily-budget`, else the `--credentials`
    block's `daily_budget_usd` (as a flow's parameter overrides its block's); None for
    no daily cap."""
    if args.daily_budget is not None:
        return float(args.daily_budget)
    block = saved_credentials(args)
    return block.daily_budget_usd if block is not None else None


def load_credentials_block(name: str) -> SavedCredentials:
    """The saved `RunComfyCredentials` block `name`, from the Prefect API in use.

    With `PREFECT_API_URL` in the environment the block is one HTTP read of that API
    (with `PREFECT_API_KEY` or `PREFECT_API_AUTH_STRING`), and Prefect is not even
    imported. Otherwise Prefect's settings decide: a profile's API, or, when none
    is configured, Prefect's temporary server on this machine's database, which
    takes seconds to start (the command says so).

    Args:
        name: The block's name.

    Returns:
        Its fields.

    Raises:
        UsageError: No such block is saved, or the Prefect API cannot be read.
    """
    api_url = os.environ.get("PREFECT_API_URL", "").strip()
    if api_url:
        saved = _read_over_http(api_url, name)
        if saved is not None:
            return saved
    return _load_through_prefect(name)


def _not_saved(name: str) -> UsageError:
    return UsageError(
        f"no RunComfyCredentials block named {name!r} is saved on this Prefect API "
        f"(PREFECT_API_URL={os.environ.get('PREFECT_API_URL') or 'unset: the local one'}). "
        # Worded without "api_token=": the redaction would take the rest for a token.
        "Save a RunComfyCredentials block under that name, or leave out --credentials "
        "to use RUNCOMFY_API_TOKEN"
    )


# Client settings of Prefect's that the one HTTP read does not follow: Prefect's own
# client reads the block when they are set.
_PREFECT_CLIENT_SETTINGS = ("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "PREFECT_CLIENT_CUSTOM_HEADERS")


def _read_over_http(api_url: str, name: str) -> SavedCredentials | None:
    """The block read from Prefect's REST API; None to let Prefect's client read it (the
    API refused the credentials from the environment, or a setting asks for its client)."""
    import base64
    from urllib.parse import quote

    import httpx

    from ..blocks import CREDENTIALS_BLOCK_TYPE_SLUG
    from ..client.retry import DEFAULT_TOTAL_TIMEOUT

    if any(os.environ.get(setting) for setting in _PREFECT_CLIENT_SETTINGS):
        return None
    headers = {}
    if auth_string := os.environ.get("PREFECT_API_AUTH_STRING"):
        headers["Authorization"] = f"Basic {base64.b64encode(auth_string.encode()).decode()}"
    elif api_key := os.environ.get("PREFECT_API_KEY"):
        headers["Authorization"] = f"Bearer {api_key}"
    url = (
        f"{api_url.rstrip('/')}/block_types/slug/{CREDENTIALS_BLOCK_TYPE_SLUG}"
        f"/block_documents/name/{quote(name, safe='')}"
    )
    verify: str | bool = os.environ.get("PREFECT_API_SSL_CERT_FILE") or True
    try:
        response = httpx.get(
            url, params={"include_secrets": "true"}, headers=headers, timeout=30, verify=verify
        )
    except httpx.HTTPError as error:
        raise UsageError(
            f"cannot read the block {name!r} from the Prefect API at {api_url} "
            f"(PREFECT_API_URL): {type(error).__name__}: {error}"
        ) from None
    if response.status_code in (401, 403):
        return None
    if response.status_code == 404:
        raise _not_saved(name)
    if not response.is_success:
        raise UsageError(
            f"cannot read the block {name!r} from the Prefect API at {api_url} "
            f"(PREFECT_API_URL): HTTP {response.status_code}"
        )
    data = response.json().get("data") or {}
    return SavedCredentials(
        api_token=data.get("api_token") or None,
        base_url=data.get("base_url") or None,
        request_timeout=float(data.get("request_timeout") or 30.0),
        total_timeout=float(data.get("total_timeout") or DEFAULT_TOTAL_TIMEOUT),
        output_hosts=data.get("output_hosts"),
        daily_budget_usd=data.get("daily_budget_usd"),
    )


def _load_through_prefect(name: str) -> SavedCredentials:
    from prefect.settings import PREFECT_API_URL

    from ..blocks import RunComfyCredentials

    if not PREFECT_API_URL.value():
        print(
            f"Reading the block {name!r} from Prefect's temporary server, as no Prefect API "
            "is configured (PREFECT_API_URL): it takes a few seconds to start.",
            file=sys.stderr,
        )
    try:
        block = RunComfyCredentials.load(name, _sync=True)
    except ValueError as error:
        if "Unable to find block document" not in str(error):
            raise
        raise _not_saved(name) from None
    return SavedCredentials(
        api_token=block.api_token.get_secret_value() if block.api_token else None,
        base_url=block.base_url,
        request_timeout=block.request_timeout,
        total_timeout=block.total_timeout,
        output_hosts=block.output_hosts,
        daily_budget_usd=block.daily_budget_usd,
    )
