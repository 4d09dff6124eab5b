"""Errors of the RunComfy client, and the one mapping from an HTTP answer to them.

Every error carries what a user needs to follow up at the provider: the HTTP
status, the provider's `error_code`, its message and the request id when known.
`is_transient` tells retry layers (ours and Prefect's) what is worth retrying.

The server's words are not ours to trust: a 422 echoes its input, a failed job
quotes the URL it could not fetch. So an error's message and detail go through the
one redaction when the error is built, and no signature or token can ride an
exception into a log, a state message or a traceback.
"""

from __future__ import annotations

from typing import Any

from ..errors import NanoBananaError
from ..redaction import redact, redact_text


class RunComfyError(NanoBananaError):
    """Base class of every error this package raises for the Model API."""

    is_transient: bool = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_code: int | None = None,
        request_id: str | None = None,
        detail: Any = None,
    ) -> None:
        message = redact_text(message)
        self.message = message
        self.status_code = status_code
        self.error_code = error_code
        self.request_id = request_id
        self.detail = None if detail is None else redact(detail)
        super().__init__(message)

    def __str__(self) -> str:
        facts = [
            f"{name}={value}"
            for name, value in (
                ("http_status", self.status_code),
                ("error_code", self.error_code),
                ("request_id", self.request_id),
            )
            if value is not None
        ]
        return f"{self.message} ({', '.join(facts)})" if facts else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive the default pickling, and Prefect
        # pickles exceptions into task and flow run states.
        return (_rebuild_error, (type(self), self.message, self.__dict__.copy()))


def _rebuild_error(cls: type[RunComfyError], message: str, state: dict[str, Any]) -> RunComfyError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class AuthenticationError(RunComfyError):
    """The token is missing, expired or revoked (400004 or HTTP 401)."""


class PermissionDeniedError(RunComfyError):
    """The request id belongs to another account (403001)."""


class InsufficientBalanceError(RunComfyError):
    """The account cannot pay for the request (400002)."""


class InvalidRequestError(RunComfyError):
    """The server refused the request body or model id (422001, 400001); see `detail`."""


class InvalidBaseURLError(InvalidRequestError, ValueError):
    """The API base URL is no http(s) URL with a host; found before any call is made.

    Also a `ValueError`, so a credentials block with such a `base_url` fails its
    validation with this message.
    """


class NotFoundError(RunComfyError):
    """The request id is unknown, deleted or expired (404001)."""


class RateLimitedError(RunComfyError):
    """HTTP 429; `retry_after` holds the server's hint in seconds when it sent one."""

    is_transient = True

    def __init__(self, message: str, *, retry_after: float | None = None, **facts: Any) -> None:
        super().__init__(message, **facts)
        self.retry_after = retry_after


class ServerError(RunComfyError):
    """HTTP 5xx or 500001 on a read; the provider asks for a retry with backoff."""

    is_transient = True


class APIConnectionError(RunComfyError):
    """The server could not be reached or did not answer in time on a read."""

    is_transient = True


class SubmitOutcomeUnknownError(RunComfyError):
    """A submit may or may not have been accepted (5xx or timeout after sending).

    Never retried: the API has no idempotency key and a submit is billed.
    """


class ProtocolError(RunComfyError):
    """The server's answer breaks the API's contract: too large, not JSON, a malformed id.

    Not transient: a server that answered so once will likely answer so again, and
    retrying a hostile answer only costs time.
    """


class SubmitProtocolError(ProtocolError, SubmitOutcomeUnknownError):
    """A submit's answer breaks the contract; the job may still have been accepted.

    Also a `SubmitOutcomeUnknownError`, so the submit guards keep their marker and a
    rerun does not pay twice for a job the server may have queued.
    """


class JobFailedError(RunComfyError):
    """The job ended as `failed`; `message` holds the server's error."""


class JobCancelledError(RunComfyError):
    """The job ended as `cancelled`."""


class WaitTimeoutError(RunComfyError):
    """The job did not finish before the deadline; it may still be running remotely."""

    def __init__(self, message: str, *, last_status: str | None = None, **facts: Any) -> None:
        super().__init__(message, **facts)
        self.last_status = last_status


def _server_message(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    for key in ("error_message", "message", "error"):
        value = body.get(key)
        if isinstance(value, str) and value:
            return value
    detail = body.get("detail")
    if isinstance(detail, str) and detail:
        return detail
    return None


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def body_signals_error(status_code: int, body: Any) -> bool:
    """True for an HTTP error, or a 200 whose body carries a top-level `error_code`."""
    if status_code >= 400:
        return True
    return isinstance(body, dict) and body.get("error_code") not in (None, 0)


def error_from_response(
    status_code: int,
    body: Any,
    *,
    request_id: str | None = None,
    retry_after: float | None = None,
) -> RunComfyError:
    """The one mapping from an HTTP status and provider `error_code` to an error class."""
    error_code = _as_int(body.get("error_code")) if isinstance(body, dict) else None
    detail = body.get("detail") if isinstance(body, dict) else None
    server_message = _server_message(body)
    facts: dict[str, Any] = {
        "status_code": status_code,
        "error_code": error_code,
        "request_id": request_id,
        "detail": detail,
    }

    def say(default: str) -> str:
        return f"{default}: {server_message}" if server_message else default

    if error_code == 400004 or status_code == 401:
        return AuthenticationError(
            "The RunComfy API token was refused (missing, expired or revoked); "
            "check RUNCOMFY_API_TOKEN or the credentials block",
            **facts,
        )
    if error_code == 400002 or status_code == 402:
        return InsufficientBalanceError(
            say("The RunComfy account balance is too low for this request; top it up"), **facts
        )
    if error_code == 403001 or status_code == 403:
        return PermissionDeniedError(say("Permission denied for this request"), **facts)
    if error_code == 404001 or status_code == 404:
        return NotFoundError(say("Request not found, deleted or expired"), **facts)
    if status_code == 429:
        return RateLimitedError(say("Rate limited by RunComfy"), retry_after=retry_after, **facts)
    if error_code == 500001 or status_code >= 500:
        return ServerError(say("RunComfy internal error"), **facts)
    if error_code in (400001, 422001) or status_code in (400, 422):
        message = say("RunComfy rejected the request")
        if detail and not isinstance(detail, str):
            message = f"{message}; detail: {detail}"
        return InvalidRequestError(message, **facts)
    return RunComfyError(say("Unexpected answer from RunComfy"), **facts)
