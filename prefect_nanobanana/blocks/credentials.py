"""The RunComfy credentials block: the one place a deployment keeps its API token."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prefect.blocks.abstract import CredentialsBlock
from prefect.blocks.core import Block, schema_extra
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.utilities.asyncutils import run_coro_as_sync
from pydantic import ConfigDict, Field, SecretStr, field_validator

from ..client import AsyncRunComfyClient, RunComfyClient
from ..client.client import check_base_url, output_hosts_for
from ..client.retry import DEFAULT_TOTAL_TIMEOUT
from ..errors import NanoBananaError
from ..redaction import carries_signature, strip_signature
from ..storage.locations import s3_location_of_url
from . import CREDENTIALS_BLOCK_TYPE_SLUG


def run_logger_or_none() -> logging.Logger | logging.LoggerAdapter | None:
    """The current run's logger, or None outside a run so the client keeps its own.

    Handing the run logger to the client sends its retry warnings and status-change
    lines to the Prefect UI next to the task that caused them.
    """
    try:
        return get_run_logger()
    except MissingContextError:
        return None


class CredentialsNotFoundError(NanoBananaError, ValueError):
    """A `credentials` parameter names a block that is not saved (found before any submit)."""


# What a saved block's document always holds and a `{"$ref": ...}` never does.
_DISCRIMINATING_FIELD = "request_timeout"


def _unambiguous_block_schema(schema: dict[str, Any], model: type[Block]) -> None:
    """Prefect's block schema, made so a picked block matches only as a reference.

    Every field may be empty (the environment fills in), so an open schema also
    matches `{"$ref": {"block_document_id": ...}}`, the form in which the UI sends
    a saved block as a deployment parameter, and Prefect finds the value valid both
    as a reference and as inline credentials ("not valid under any of the given
    schemas"). Two validators see the schema: the server's run creation sees the
    deployment's schema, and the UI's "Validate parameters" posts its own copy to
    `/api/ui/schemas/validate`, a copy that keeps only a few keywords (`type`,
    `properties`, `required`, `anyOf`, `format`, ...) and drops
    `additionalProperties`. So the block's shape is closed for the first and has a
    required field for both: `request_timeout`, which has a default, so every
    document Python or the UI saves has it, and a reference never does.

    The token's schema is a plain password string: pydantic's `anyOf` with `null`
    makes the UI's block form show a text area in clear instead of a password field.
    Leaving it out of `required` still lets it be empty.
    """
    schema_extra(schema, model)
    schema["additionalProperties"] = False
    schema["required"] = sorted({*schema.get("required", []), _DISCRIMINATING_FIELD})
    token = schema["properties"]["api_token"]
    schema["properties"]["api_token"] = {
        "title": token.get("title"),
        "description": token.get("description"),
        "type": "string",
        "format": "password",
        "writeOnly": True,
    }


class RunComfyCredentials(CredentialsBlock):
    """
    Block used to manage authentication with the RunComfy Model API.

    Empty fields fall back to the `RUNCOMFY_API_TOKEN` and `RUNCOMFY_BASE_URL`
    environment variables, so the same deployment runs against an emulator, a
    proxy or the real API (https://model-api.runcomfy.net) without code changes.
    The token is stored as a secret: it never appears in the block's repr, in the
    UI or in logs.

    Example:
        Load stored RunComfy credentials and check a request's status:
        ```python
        from prefect_nanobanana import RunComfyCredentials

        credentials = RunComfyCredentials.load("BLOCK_NAME")
        with credentials.get_client() as client:
            print(client.status("REQUEST_ID"))
        ```
    """

    model_config = ConfigDict(json_schema_extra=_unambiguous_block_schema)

    _block_type_name = "RunComfy Credentials"
    _block_type_slug = CREDENTIALS_BLOCK_TYPE_SLUG
    _logo_url = "https://www.runcomfy.com/apple-touch-icon.png"
    _documentation_url = "https://docs.runcomfy.com/model-apis/quickstart"
    _description = (
        "Authentication for the RunComfy Model API, which serves Google's Nano Banana Pro."
    )
    _code_example = """
    ```python
    from prefect_nanobanana import RunComfyCredentials

    runcomfy_credentials_block = RunComfyCredentials.load("BLOCK_NAME")
    ```
    """

    api_token: SecretStr | None = Field(
        default=None,
        title="API Token",
        description=(
            "The RunComfy API token (Authorization: Bearer). When empty, the "
            "RUNCOMFY_API_TOKEN environment variable is used."
        ),
    )
    base_url: str | None = Field(
        default=None,
        title="Base URL",
        description=(
            "The Model API's base URL. When empty, RUNCOMFY_BASE_URL is used, and "
            "without it the real API at https://model-api.runcomfy.net."
        ),
    )
    request_timeout: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Seconds one HTTP call to the API may take in all (connect, send and every "
            "read), however slowly the server answers."
        ),
    )
    total_timeout: float = Field(
        default=DEFAULT_TOTAL_TIMEOUT,
        gt=0,
        title="Total Timeout",
        description=(
            "Seconds one API call (a submit, a status or result poll, a cancel) may take "
            "in all, its retries included, however slowly the server answers; 45 s by "
            "default. Its error then says how long it tried and how many attempts. A "
            "wait's polls also end with the wait."
        ),
    )
    output_hosts: list[str] | None = Field(
        default=None,
        title="Output Hosts",
        description=(
            "The only hosts outputs are downloaded from, redirects included (host, "
            "host:port or *.domain). When empty, *.runcomfy.net and the base URL's host."
        ),
    )
    daily_budget_usd: float | None = Field(
        default=None,
        ge=0,
        title="Daily Budget (USD)",
        description=(
            "A cap in USD per UTC day on what runs using these credentials may submit, "
            "shared by every run, chunk and machine that writes to the same archive (the "
            "running total lives beside its ledger). A flow's daily_budget_usd parameter "
            "overrides it. When empty, no daily cap."
        ),
    )

    @field_validator("base_url")
    @classmethod
    def _base_url_is_a_url(cls, base_url: str | None) -> str | None:
        # The client's own check, so a block saved with a typo fails when it is made.
        return check_base_url(base_url) if base_url and base_url.strip() else None

    def allowed_output_hosts(self) -> list[str]:
        """The hosts outputs may be downloaded from.

        Returns:
            The `output_hosts` field when set; else `*.runcomfy.net` and the base
            URL's own host (the emulator's, a proxy's).
        """
        return list(output_hosts_for(self.base_url, self.output_hosts))

    def _client_options(self) -> dict[str, Any]:
        return {
            "api_token": self.api_token,
            "base_url": self.base_url,
            "timeout": self.request_timeout,
            "total_timeout": self.total_timeout,
            "logger": run_logger_or_none(),
            "output_hosts": self.output_hosts,
        }

    def get_client(self) -> RunComfyClient:
        """A blocking client with this block's token, base URL, timeout and output hosts.

        Returns:
            A `RunComfyClient`; close it, or use it in a `with` block, when done.

        Example:
            ```python
            with RunComfyCredentials.load("default").get_client() as client:
                print(client.model_info().base_price_usd)
            ```
        """
        return RunComfyClient(**self._client_options())

    def get_async_client(self) -> AsyncRunComfyClient:
        """An async client with this block's token, base URL, timeout and output hosts.

        Returns:
            An `AsyncRunComfyClient`; use it in an `async with` block, or
            `await client.aclose()` when done.
        """
        return AsyncRunComfyClient(**self._client_options())


DEFAULT_CREDENTIALS_BLOCK = "default"


def _token_kept_in_parameters(block: RunComfyCredentials) -> bool:
    """Whether this flow run's parameters, as Prefect stored them, hold the block's token.

    A block passed from Python is stored with its token masked; one sent through the
    API as a plain object (`{"api_token": "..."}`) is stored as sent. Only the
    person who sent it can stop that, so the run tells them.
    """
    context = FlowRunContext.get()
    if block.api_token is None or context is None or context.flow_run is None:
        return False
    token = block.api_token.get_secret_value()
    return any(
        isinstance(value, dict) and value.get("api_token") == token
        for value in (context.flow_run.parameters or {}).values()
    )


def _strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings_in(item)


def warn_of_signed_urls_in_parameters() -> None:
    """Warn, once, when this flow run's parameters hold pre-signed URLs.

    Prefect keeps a flow run's parameters in its database as they were sent, so a
    pre-signed URL given as a parameter stays readable there, signature included,
    until it expires; only the person who sent it can stop that. The `s3://` form
    of the same object leaves no signature behind: the flows sign it inside the
    run. The warning names that form when the URL tells it (AWS's hosts, or the
    endpoint in `AWS_ENDPOINT_URL`), and the URLs without their signatures.
    Each flow calls this once, at its start; outside a flow run it does nothing.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    signed = list(
        dict.fromkeys(
            text
            for text in _strings_in(context.flow_run.parameters or {})
            if carries_signature(text)
        )
    )
    if not signed:
        return
    locations = [location for url in signed if (location := s3_location_of_url(url))]
    shown = ", ".join(strip_signature(url) for url in signed[:3]) + (
        ", ..." if len(signed) > 3 else ""
    )
    instead = ", ".join(locations[:3]) + (", ..." if len(locations) > 3 else "")
    (run_logger_or_none() or logging.getLogger(__name__)).warning(
        "%d pre-signed URL%s came in this flow run's parameters (%s), and Prefect keeps "
        "parameters in its database as they were sent, signature included, readable until "
        "the URL expires: pass %s instead (the images of edit_and_archive, the rows of "
        "batch_edit), which the flows sign inside the run, so no signature is stored.",
        len(signed),
        "" if len(signed) == 1 else "s",
        shown,
        instead or "the object's s3://bucket/key",
    )


def _from_parameter_dict(credentials: dict[str, Any]) -> RunComfyCredentials:
    return RunComfyCredentials(
        base_url=credentials.get("base_url"),
        request_timeout=credentials.get("request_timeout") or 30.0,
        total_timeout=credentials.get("total_timeout") or DEFAULT_TOTAL_TIMEOUT,
        output_hosts=credentials.get("output_hosts"),
    )


async def aresolve_credentials(
    credentials: RunComfyCredentials | str | dict[str, Any] | None = DEFAULT_CREDENTIALS_BLOCK,
) -> RunComfyCredentials:
    """Turn what a flow was given for credentials into a block.

    A `str` is the name of a saved block. The name "default" is allowed to be
    missing: then the environment variables are used, so a demo runs with
    nothing configured. A `dict` is the form flow-run parameters take when read
    back from the API (a `$ref` to a saved block, or the fields of an unsaved
    one, whose token the API only shows masked, so the environment's is used).
    """
    if isinstance(credentials, RunComfyCredentials):
        if _token_kept_in_parameters(credentials):
            (run_logger_or_none() or logging.getLogger(__name__)).warning(
                "The API token came inline in this flow run's parameters, and Prefect keeps "
                "parameters in its database as they were sent: save a RunComfyCredentials "
                "block and pass its name instead, and rotate this token."
            )
        return credentials
    if credentials is None:
        return RunComfyCredentials()
    if isinstance(credentials, dict):
        if "$ref" in credentials:
            return await RunComfyCredentials.aload_from_ref(credentials["$ref"])
        return _from_parameter_dict(credentials)
    try:
        return await RunComfyCredentials.aload(credentials)
    except ValueError as error:
        if credentials == DEFAULT_CREDENTIALS_BLOCK:
            return RunComfyCredentials()
        if "Unable to find block document" not in str(error):
            raise
        raise CredentialsNotFoundError(
            f"no RunComfyCredentials block named {credentials!r} is saved on this Prefect "
            "API: save one under that name, or pass 'default' to use the environment "
            "variables RUNCOMFY_API_TOKEN and RUNCOMFY_BASE_URL"
        ) from None


def resolve_credentials(
    credentials: RunComfyCredentials | str | dict[str, Any] | None = DEFAULT_CREDENTIALS_BLOCK,
) -> RunComfyCredentials:
    """The blocking face of `aresolve_credentials` (sync flows, the cancellation hook)."""
    return run_coro_as_sync(aresolve_credentials(credentials))


def daily_budget_of(parameter: float | None, credentials: RunComfyCredentials) -> float | None:
    """The daily cap a run uses: its `daily_budget_usd` parameter, else its credentials'.

    Args:
        parameter: The flow's (or the CLI's `--daily-budget`) value; None: not given.
        credentials: The run's resolved credentials.

    Returns:
        The cap in USD per UTC day, or None for no daily cap.
    """
    return parameter if parameter is not None else credentials.daily_budget_usd
