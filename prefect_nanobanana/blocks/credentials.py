"""The RunComfy credentials block: the one place a deployment keeps its API token."""

from __future__ import annotations

import logging
from typing import Any

from prefect.blocks.abstract import CredentialsBlock
from prefect.blocks.core import Block, schema_extra
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.utilities.asyncutils import run_coro_as_sync
from pydantic import ConfigDict, Field, SecretStr

from ..client import AsyncRunComfyClient, RunComfyClient
from ..client.client import output_hosts_for
from ..errors import NanoBananaError


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
    output_hosts: list[str] | None = Field(
        default=None,
        title="Output Hosts",
        description=(
            "The only hosts outputs are downloaded from, redirects included (host, "
            "host:port or *.domain). When empty, *.runcomfy.net and the base URL's host."
        ),
    )

    def allowed_output_hosts(self) -> list[str]:
        """The hosts outputs may be downloaded from (the field, else the defaults)."""
        return list(output_hosts_for(self.base_url, self.output_hosts))

    def _client_options(self) -> dict[str, Any]:
        return {
            "api_token": self.api_token,
            "base_url": self.base_url,
            "timeout": self.request_timeout,
            "logger": run_logger_or_none(),
            "output_hosts": self.output_hosts,
        }

    def get_client(self) -> RunComfyClient:
        """A blocking client; close it (or use it in a `with` block) when done."""
        return RunComfyClient(**self._client_options())

    def get_async_client(self) -> AsyncRunComfyClient:
        """An async client; use it in an `async with` block or `await client.aclose()`."""
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


def _from_parameter_dict(credentials: dict[str, Any]) -> RunComfyCredentials:
    return RunComfyCredentials(
        base_url=credentials.get("base_url"),
        request_timeout=credentials.get("request_timeout") or 30.0,
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
