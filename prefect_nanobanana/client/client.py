"""Sync and async clients of the RunComfy Model API, twins with the same method names.

Both share `_ClientCore` for everything that is not I/O (configuration, request
building, answer parsing, the retry decision), so the two loops that do I/O are
the only code written twice. Both speak through `transport.py`: each HTTP attempt
ends by a wall-clock deadline (`timeout`), each API call with its retries by
another (`total_timeout`), and every answer is read up to a cap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, SecretStr, ValidationError

from .errors import (
    AuthenticationError,
    InvalidBaseURLError,
    InvalidRequestError,
    ProtocolError,
    RateLimitedError,
    RunComfyError,
    ServerError,
    SubmitOutcomeUnknownError,
    SubmitProtocolError,
    body_signals_error,
    error_from_response,
)
from .models import (
    CancelResult,
    ModelInfo,
    NanoBananaEditInput,
    RequestHandle,
    RequestResult,
    RequestStatus,
    check_request_id,
)
from .polling import PollingPolicy, RunDurationEstimator
from .retry import (
    DEFAULT_TOTAL_TIMEOUT,
    CallKind,
    RetryPolicy,
    parse_retry_after,
    submit_server_error,
    transport_error,
)
from .transport import (
    MAX_ANSWER_BYTES,
    MAX_INLINE_RESULT_BYTES,
    AnswerTooLarge,
    aread_answer,
    call_deadline,
    install_deadlines,
    read_answer,
    seconds_left,
)
from .vocabulary import DEFAULT_BASE_URL, DEFAULT_OUTPUT_HOSTS, NANO_BANANA_EDIT_MODEL_ID
from .waiting import DEFAULT_WAIT_TIMEOUT, StatusCallback, WaitTracker

TOKEN_ENV_VAR = "RUNCOMFY_API_TOKEN"
BASE_URL_ENV_VAR = "RUNCOMFY_BASE_URL"
OUTPUT_HOSTS_ENV_VAR = "RUNCOMFY_OUTPUT_HOSTS"
# Offline development: the emulator runs jobs faster than the real model, and the
# polling schedule's expected run times must shrink with it.
POLL_TIME_SCALE_ENV_VAR = "RUNCOMFY_POLL_TIME_SCALE"

logger = logging.getLogger("prefect_nanobanana.client")

Payload = dict[str, Any] | BaseModel
EditInput = NanoBananaEditInput | dict[str, Any]
_ModelT = TypeVar("_ModelT", bound=BaseModel)


def resolve_base_url(base_url: str | None) -> str:
    """The API's base URL: given, else `RUNCOMFY_BASE_URL`, else the real API.

    Raises:
        InvalidBaseURLError: The URL is no http(s) URL with a host (see `check_base_url`).
    """
    if base_url:
        return check_base_url(base_url)
    if from_environment := os.environ.get(BASE_URL_ENV_VAR):
        return check_base_url(from_environment, source=BASE_URL_ENV_VAR)
    return DEFAULT_BASE_URL


def check_base_url(url: str, source: str = "base URL") -> str:
    """`url` without its trailing slash, when it can be an API base URL.

    The one check of a base URL, for the client, the credentials block and the
    command line alike: a value that is no URL would otherwise be tried as one,
    retried as an unreachable server and reported as a network failure.

    Args:
        url: The base URL, e.g. `https://model-api.runcomfy.net`.
        source: Where it was set, for the message (`RUNCOMFY_BASE_URL`, `--base-url`).

    Returns:
        The URL without a trailing slash.

    Raises:
        InvalidBaseURLError: It is not an http:// or https:// URL with a host and a valid
            port, or it carries a query or fragment (paths are joined onto it).
    """
    parts = urlsplit(url.strip())
    problem = None
    if parts.scheme.lower() not in ("http", "https"):
        problem = "is not an http:// or https:// URL"
    elif not parts.hostname:
        problem = "names no host"
    elif parts.query or parts.fragment:
        problem = "has a query or fragment (the API's paths are appended to it)"
    else:
        try:
            parts.port  # noqa: B018 - urlsplit checks the port only when asked for it
        except ValueError:
            problem = "has an invalid port"
    if problem is not None:
        raise InvalidBaseURLError(
            f"{source} {url!r} {problem}; expected e.g. {DEFAULT_BASE_URL} "
            "or an emulator's http://127.0.0.1:PORT"
        )
    return url.strip().rstrip("/")


def output_hosts_for(
    base_url: str | None, output_hosts: Sequence[str] | None = None
) -> tuple[str, ...]:
    """Where outputs may be downloaded from: `output_hosts` when given, else
    `RUNCOMFY_OUTPUT_HOSTS` (comma-separated, for a worker with no credentials block
    behind a proxy), else the defaults.

    The defaults are the provider's output hosts (`*.runcomfy.net`) and the API's
    own host with its port (an emulator serves its outputs itself).
    """
    if output_hosts is None and (listed := os.environ.get(OUTPUT_HOSTS_ENV_VAR)):
        output_hosts = [host.strip() for host in listed.split(",") if host.strip()]
    if output_hosts is not None:
        return tuple(output_hosts)
    base_host = httpx.URL(resolve_base_url(base_url)).netloc.decode()
    return tuple(dict.fromkeys([*DEFAULT_OUTPUT_HOSTS, base_host]))


class _OutOfTime(Exception):
    """A poll of `wait` would retry past the wait's deadline; `wait` raises its timeout."""

    def __init__(self, error: RunComfyError) -> None:
        super().__init__(str(error))
        self.error = error


class _Call:
    """The attempts of one API call, retries included, and the time they may take.

    The call ends by `total` seconds from its start and, when it polls for a
    `wait`, by `until` (that wait's end, a `time.monotonic()` instant): its
    attempts and its sleeps get only what is left of both.
    """

    def __init__(self, total: float, until: float | None) -> None:
        self.started = time.monotonic()
        self.total = total
        self.until = until
        self.ends = self.started + total if until is None else min(self.started + total, until)
        self.attempts = 0

    def total_spent(self, delay: float = 0.0) -> bool:
        """Whether `delay` more seconds would reach the end of the call's own total."""
        return time.monotonic() + delay >= self.started + self.total

    def gave_up(self, error: RunComfyError, *, spent: bool = False) -> RunComfyError:
        """`error`, its message saying how long the call tried and how many attempts.

        Said when the call could have been retried or was: a permanent error on its
        first attempt (a 404, a refused submit) is the server's answer, not a give-up.
        """
        if spent or error.is_transient or self.attempts > 1:
            plural = "" if self.attempts == 1 else "s"
            tried = (
                f"gave up after {self.attempts} attempt{plural} in "
                f"{time.monotonic() - self.started:.1f} s"
            )
            if spent:
                tried += f" (this call's total_timeout is {self.total:g} s)"
            # Only numbers are added to a message already redacted when the error was built.
            error.message = f"{error.message}; {tried}"
            error.args = (error.message,)
        return error


def _plain_secret(api_token: str | SecretStr | None) -> str:
    if isinstance(api_token, SecretStr):
        api_token = api_token.get_secret_value()
    token = api_token or os.environ.get(TOKEN_ENV_VAR, "")
    if not token.strip():
        raise AuthenticationError(
            f"No RunComfy API token: pass api_token=... or set {TOKEN_ENV_VAR}"
        )
    return token.strip()


class _ClientCore:
    """Configuration and the pure parts of a call, shared by both clients."""

    def __init__(
        self,
        api_token: str | SecretStr | None,
        base_url: str | None,
        timeout: float,
        total_timeout: float,
        retry_policy: RetryPolicy | None,
        polling_policy: PollingPolicy | None,
        duration_estimator: RunDurationEstimator | None,
        log: logging.Logger | logging.LoggerAdapter | None,
        max_answer_bytes: int,
        output_hosts: Sequence[str] | None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be a positive number of seconds")
        if total_timeout <= 0:
            raise ValueError("total_timeout must be a positive number of seconds")
        self.max_answer_bytes = max_answer_bytes
        self._api_token = SecretStr(_plain_secret(api_token))
        self.base_url = resolve_base_url(base_url)
        self.output_hosts = output_hosts_for(self.base_url, output_hosts)
        self.timeout = timeout
        self.total_timeout = total_timeout
        self.retry_policy = retry_policy or RetryPolicy()
        self.polling_policy = polling_policy or PollingPolicy(
            time_scale=float(os.environ.get(POLL_TIME_SCALE_ENV_VAR) or 1.0)
        )
        self.duration_estimator = duration_estimator or RunDurationEstimator()
        self.logger = log or logger
        # A 429 pauses every call of this client, not just the one that saw it, so
        # a batch sharing one client slows down as a whole instead of hammering.
        self._paused_until = 0.0
        # Requests this client submitted with sync_mode: their result carries the
        # outputs inline, so it may be far larger than any other answer.
        self._inline_requests: set[str] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, api_token='**********')"

    def _http_options(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "timeout": httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)),
            "headers": {
                "Authorization": f"Bearer {self._api_token.get_secret_value()}",
                "Accept": "application/json",
                # Answers are small JSON; a compressed one could inflate far past its cap
                # inside a single chunk before the cap is checked.
                "Accept-Encoding": "identity",
                "User-Agent": "prefect-nanobanana",
            },
        }

    @staticmethod
    def _submit_path(model_id: str) -> str:
        model_id = model_id.strip().strip("/")
        if not model_id:
            raise InvalidRequestError("model_id must not be empty")
        return f"/v1/models/{model_id}"

    @staticmethod
    def _request_path(request_id: str, action: str) -> str:
        try:
            check_request_id(request_id)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        return f"/v1/requests/{request_id}/{action}"

    @staticmethod
    def _payload_json(payload: Payload) -> dict[str, Any]:
        if isinstance(payload, BaseModel):
            return payload.model_dump(mode="json", exclude_none=True)
        if not isinstance(payload, dict):
            raise InvalidRequestError("payload must be a dict or a pydantic model")
        return payload

    @staticmethod
    def _edit_input(edit: EditInput) -> NanoBananaEditInput:
        if isinstance(edit, NanoBananaEditInput):
            return edit
        return NanoBananaEditInput.model_validate(edit)

    def _attempt_timeout(self, deadline: float | None) -> httpx.Timeout:
        """httpx's timeouts for one attempt; its wait for a pooled connection included.

        The deadline bounds every network operation (see `deadline.py`); waiting for
        a free connection of the pool is not one, so it gets what is left here.
        """
        left = seconds_left(deadline)
        pool = self.timeout if left is None else max(min(self.timeout, left), 0.001)
        return httpx.Timeout(self.timeout, connect=min(10.0, self.timeout), pool=pool)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_token.get_secret_value(), "**********")

    def _answer_limit(self, action: str, request_id: str | None) -> int:
        if action == "result" and request_id in self._inline_requests:
            return max(self.max_answer_bytes, MAX_INLINE_RESULT_BYTES)
        return self.max_answer_bytes

    @staticmethod
    def _protocol_error(
        kind: CallKind, message: str, *, status_code: int | None, request_id: str | None
    ) -> ProtocolError:
        """A broken answer; on a submit, the job may have been accepted all the same."""
        if kind is CallKind.SUBMIT:
            return SubmitProtocolError(
                f"{message}; the job may have been accepted and billed. It was NOT "
                "resubmitted. Check your RunComfy request history before submitting again",
                status_code=status_code,
            )
        return ProtocolError(message, status_code=status_code, request_id=request_id)

    def _too_large(
        self, kind: CallKind, error: AnswerTooLarge, status_code: int, request_id: str | None
    ) -> ProtocolError:
        return self._protocol_error(
            kind,
            f"RunComfy's answer was cut off: {error}",
            status_code=status_code,
            request_id=request_id,
        )

    def _outcome(
        self,
        kind: CallKind,
        response: httpx.Response,
        content: bytes,
        request_id: str | None,
    ) -> dict[str, Any] | RunComfyError:
        """The JSON body of a good answer, or the error it stands for."""
        try:
            body: Any = json.loads(content)
        except ValueError:
            text = content[:300].decode("utf-8", "replace")
            body = {"message": self._redact(text)}
            if response.is_success:
                message = f"RunComfy answered HTTP {response.status_code} with a non-JSON body"
                if kind is CallKind.SUBMIT:
                    return SubmitOutcomeUnknownError(
                        f"{message}; the job may have been accepted. It was NOT resubmitted",
                        status_code=response.status_code,
                    )
                return ServerError(message, status_code=response.status_code)
        if body_signals_error(response.status_code, body):
            if isinstance(body, dict):
                body = {
                    key: self._redact(value) if isinstance(value, str) else value
                    for key, value in body.items()
                }
            return error_from_response(
                response.status_code,
                body,
                request_id=request_id,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if not isinstance(body, dict):
            return self._protocol_error(
                kind,
                f"Unexpected answer from RunComfy: {type(body).__name__}",
                status_code=response.status_code,
                request_id=request_id,
            )
        return body

    def _parse(
        self, model: type[_ModelT], body: dict[str, Any], kind: CallKind, request_id: str | None
    ) -> _ModelT:
        """The answer as its model, or a protocol error that quotes none of its values."""
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            first = exc.errors(include_input=False, include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "answer"
            raise self._protocol_error(
                kind,
                f"RunComfy's answer is not a valid {model.__name__}: {where}: {first['msg']}",
                status_code=None,
                request_id=request_id,
            ) from None

    def _handle(self, body: dict[str, Any], edit: BaseModel | dict[str, Any]) -> RequestHandle:
        """A submit's answer, its request id checked before anyone uses or stores it."""
        try:
            check_request_id(body.get("request_id"))
        except ValueError as exc:
            raise self._protocol_error(
                CallKind.SUBMIT, f"The submit answer's {exc}", status_code=None, request_id=None
            ) from None
        handle = self._parse(RequestHandle, body, CallKind.SUBMIT, None)
        sync_mode = (
            edit.get("sync_mode") if isinstance(edit, dict) else getattr(edit, "sync_mode", False)
        )
        if sync_mode:
            self._inline_requests.add(handle.request_id)
        return handle

    def _status(self, body: dict[str, Any], request_id: str) -> RequestStatus:
        # Our request id wins over whatever the server says it was.
        return self._parse(
            RequestStatus, {**body, "request_id": request_id}, CallKind.READ, request_id
        )

    def _result(self, body: dict[str, Any], request_id: str) -> RequestResult:
        result = self._parse(
            RequestResult, {**body, "request_id": request_id}, CallKind.READ, request_id
        )
        if result.is_terminal:
            self._inline_requests.discard(request_id)
        return result

    def _cancel_result(self, body: dict[str, Any], request_id: str) -> CancelResult:
        return self._parse(
            CancelResult, {**body, "request_id": request_id}, CallKind.READ, request_id
        )

    def _out_of_time(self, until: float | None, delay: float = 0.0) -> bool:
        return until is not None and time.monotonic() + delay >= until

    def _next_step(self, kind: CallKind, error: RunComfyError, call: _Call) -> float:
        """Seconds to wait before retrying, or raise `error` (or its submit form).

        No retry starts past the call's end: a `wait` ends by its own deadline
        (its poll in flight gets only what is left of it), and any call ends by its
        `total_timeout`, the error then saying how long it tried and how often.
        """
        if kind is CallKind.SUBMIT and isinstance(error, ServerError):
            raise call.gave_up(submit_server_error(error), spent=call.total_spent())
        if not self.retry_policy.should_retry(kind, error, call.attempts):
            raise call.gave_up(error, spent=call.total_spent())
        delay = self.retry_policy.delay(call.attempts, getattr(error, "retry_after", None))
        if self._out_of_time(call.until, delay):
            raise _OutOfTime(error)
        if call.total_spent(delay):
            raise call.gave_up(error, spent=True)
        if isinstance(error, RateLimitedError):
            self._paused_until = max(self._paused_until, time.monotonic() + delay)
        self.logger.warning(
            "%s; retrying in %.2f s (attempt %d of %d)",
            error,
            delay,
            call.attempts + 1,
            self.retry_policy.max_attempts,
        )
        return delay

    def _pause_remaining(self, call: _Call) -> float:
        """How long a 429 still pauses this client, never past the call's end."""
        return min(self._paused_until, call.ends) - time.monotonic()

    def _tracker(
        self,
        request_id: str,
        timeout: float | None,
        resolution: str | None,
        on_status: StatusCallback | None,
        submitted_at: datetime | None,
        log: logging.Logger | logging.LoggerAdapter | None = None,
    ) -> WaitTracker:
        return WaitTracker(
            request_id,
            timeout=timeout,
            policy=self.polling_policy,
            estimator=self.duration_estimator,
            resolution=resolution,
            logger=log or self.logger,
            on_status=on_status,
            submitted_at=submitted_at,
        )


class RunComfyClient(_ClientCore):
    """The blocking client of the RunComfy Model API (no Prefect needed).

    Reads are retried on connection errors, timeouts, 429 and 5xx; a billed submit
    only when it provably never arrived. A 429 pauses every call of the client. One
    API call, its retries and their sleeps included, ends by `total_timeout` however
    slowly the server answers; past it the call raises its last error, whose message
    says how long it tried and how many attempts.

    Args:
        api_token: The API token; None reads `RUNCOMFY_API_TOKEN`.
        base_url: The API's base URL; None reads `RUNCOMFY_BASE_URL`, else the real API.
        timeout: The wall-clock deadline of each HTTP attempt, in seconds (connect,
            send and every read together).
        total_timeout: The deadline of one API call, retries included, in seconds
            (`DEFAULT_TOTAL_TIMEOUT`, 45 s).
        retry_policy: How calls are retried (`RetryPolicy()` by default).
        polling_policy: How `wait` polls; by default scaled by `RUNCOMFY_POLL_TIME_SCALE`.
        duration_estimator: What `wait` knows of run times (shared by a batch's waits).
        logger: Where status lines go.
        max_answer_bytes: The cap on every JSON answer (`MAX_ANSWER_BYTES`).
        output_hosts: The only hosts outputs are downloaded from (`host`,
            `host:port`, `*.domain`); by default `*.runcomfy.net` and the base URL's
            own host. Add a proxy's or CDN's host if your outputs come from one.

    Raises:
        AuthenticationError: No token was given or found in the environment.
        ValueError: `timeout` or `total_timeout` is not a positive number.

    Example:
        ```python
        from prefect_nanobanana import RunComfyClient

        with RunComfyClient() as client:  # RUNCOMFY_API_TOKEN, RUNCOMFY_BASE_URL
            handle = client.submit_edit({"prompt": "Add snow", "image_urls": [url]})
            result = client.wait(handle.request_id)
            print(result.output_urls, result.cost)
        ```
    """

    def __init__(
        self,
        api_token: str | SecretStr | None = None,
        base_url: str | None = None,
        *,
        timeout: float = 30.0,
        total_timeout: float = DEFAULT_TOTAL_TIMEOUT,
        retry_policy: RetryPolicy | None = None,
        polling_policy: PollingPolicy | None = None,
        duration_estimator: RunDurationEstimator | None = None,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        output_hosts: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            api_token,
            base_url,
            timeout,
            total_timeout,
            retry_policy,
            polling_policy,
            duration_estimator,
            logger,
            max_answer_bytes,
            output_hosts,
        )
        self._http = httpx.Client(**self._http_options())
        install_deadlines(self._http)

    def __enter__(self) -> RunComfyClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the client's connections (what leaving a `with` block does)."""
        self._http.close()

    def _attempt(
        self,
        kind: CallKind,
        method: str,
        path: str,
        limit: int,
        request_id: str | None,
        call: _Call,
        **send: Any,
    ) -> dict[str, Any] | RunComfyError:
        with (
            call_deadline(self.timeout, until=call.ends) as deadline,
            self._http.stream(
                method, path, timeout=self._attempt_timeout(deadline), **send
            ) as response,
        ):
            try:
                content = read_answer(response, limit)
            except AnswerTooLarge as exc:
                return self._too_large(kind, exc, response.status_code, request_id)
        return self._outcome(kind, response, content, request_id)

    def _call(
        self,
        kind: CallKind,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        request_id: str | None = None,
        limit: int | None = None,
        until: float | None = None,
    ) -> dict[str, Any]:
        call = _Call(self.total_timeout, until)
        while True:
            call.attempts += 1
            if (pause := self._pause_remaining(call)) > 0:
                time.sleep(pause)
            try:
                outcome = self._attempt(
                    kind,
                    method,
                    path,
                    limit or self.max_answer_bytes,
                    request_id,
                    call,
                    json=json,
                    params=params,
                )
            except httpx.TransportError as exc:
                # The base URL in the message: a person must see which API could not be reached.
                outcome = transport_error(kind, exc, f"{method} {self.base_url}{path}")
            if not isinstance(outcome, RunComfyError):
                return outcome
            time.sleep(self._next_step(kind, outcome, call))

    def submit(self, model_id: str, payload: Payload) -> RequestHandle:
        """Submit a job for any model id. Billed: retried only when it provably never arrived.

        Args:
            model_id: The model, e.g. `google/nano-banana/pro/edit`.
            payload: The request body: a pydantic model or a dict.

        Returns:
            The `RequestHandle`: request id and the URLs of its status and result.

        Raises:
            SubmitOutcomeUnknownError: The submit may have been billed (a 5xx or a
                timeout after sending); it is never resent.
            AuthenticationError: The API token was refused.
            InsufficientBalanceError: The account balance is too low.
            InvalidRequestError: The API refused the body (nothing was billed).
            APIConnectionError: The API could not be reached (nothing was sent).
        """
        body = self._payload_json(payload)
        answer = self._call(CallKind.SUBMIT, "POST", self._submit_path(model_id), json=body)
        return self._handle(answer, body)

    def submit_edit(self, edit: EditInput) -> RequestHandle:
        """Submit a Nano Banana Pro edit, validated before anything is sent.

        Args:
            edit: A `NanoBananaEditInput` or a dict of its fields (`prompt`,
                `image_urls`, and optionally `aspect_ratio`, `resolution`,
                `output_format`, `num_images`, `sync_mode`).

        Returns:
            The `RequestHandle` of the submitted request.

        Raises:
            pydantic.ValidationError: The edit is not valid (nothing was sent).
            SubmitOutcomeUnknownError: The submit may have been billed; never resent.
            AuthenticationError: The API token was refused.
            InsufficientBalanceError: The account balance is too low.

        Example:
            ```python
            with RunComfyClient() as client:
                handle = client.submit_edit({"prompt": "Add snow", "image_urls": [url]})
                print(client.wait(handle.request_id).output_urls)
            ```
        """
        return self.submit(NANO_BANANA_EDIT_MODEL_ID, self._edit_input(edit))

    def model_info(self, model_id: str = NANO_BANANA_EDIT_MODEL_ID) -> ModelInfo:
        """The model's listed price, for an estimate before a paid submit. A read: retried.

        Args:
            model_id: The model; Nano Banana Pro's edit by default.

        Returns:
            The `ModelInfo` (`base_price_usd`, `price_unit`, `pricing_note`; unknown
            fields kept). The listed price is no guaranteed minimum.

        Raises:
            RunComfyError: The API refused or could not be reached (after retries).
        """
        body = self._call(CallKind.READ, "GET", self._submit_path(model_id))
        return ModelInfo.model_validate({"model_id": model_id, **body})

    def status(self, request_id: str) -> RequestStatus:
        """A request's current status. A read: retried on transient errors.

        Args:
            request_id: The request.

        Returns:
            The `RequestStatus` (`status`, and `queue_position` while queued).

        Raises:
            NotFoundError: RunComfy knows no such request.
            RunComfyError: The API refused or could not be reached (after retries).
        """
        return self._poll_status(request_id, None)

    def result(self, request_id: str, *, include_cost: bool = True) -> RequestResult:
        """A request's result: its outputs and cost once completed, else its status.

        Args:
            request_id: The request.
            include_cost: Ask for the billed cost too.

        Returns:
            The `RequestResult` (`status`, `output_urls`, `cost`, times).

        Raises:
            NotFoundError: RunComfy knows no such request.
            RunComfyError: The API refused or could not be reached (after retries).
        """
        return self._poll_result(request_id, include_cost, None)

    def _poll_status(self, request_id: str, until: float | None) -> RequestStatus:
        """The request's status; `until` (monotonic), a wait's end, bounds the poll too."""
        body = self._call(
            CallKind.READ,
            "GET",
            self._request_path(request_id, "status"),
            request_id=request_id,
            until=until,
        )
        return self._status(body, request_id)

    def _poll_result(
        self, request_id: str, include_cost: bool, until: float | None
    ) -> RequestResult:
        body = self._call(
            CallKind.READ,
            "GET",
            self._request_path(request_id, "result"),
            params={"include_cost": "true"} if include_cost else None,
            request_id=request_id,
            limit=self._answer_limit("result", request_id),
            until=until,
        )
        return self._result(body, request_id)

    def cancel(self, request_id: str) -> CancelResult:
        """Cancel a request while it is queued.

        Args:
            request_id: The request.

        Returns:
            The `CancelResult`: `outcome` is `cancelled`, or `not_cancellable` for a
            request already running (it runs on, and is billed).

        Raises:
            RunComfyError: The API refused or could not be reached (after retries).
        """
        body = self._call(
            CallKind.READ, "POST", self._request_path(request_id, "cancel"), request_id=request_id
        )
        return self._cancel_result(body, request_id)

    def wait(
        self,
        request_id: str,
        timeout: float | None = DEFAULT_WAIT_TIMEOUT,
        *,
        resolution: str | None = None,
        on_status: StatusCallback | None = None,
        submitted_at: datetime | None = None,
        log: logging.Logger | logging.LoggerAdapter | None = None,
    ) -> RequestResult:
        """Poll until the job ends, and return its completed result.

        Polls adaptively: quick at first, backing off while queued, quiet while a
        running job cannot be done yet, then dense near its expected end. Returns or
        raises by `timeout` seconds whatever the server's pace: the poll in flight
        gets no more than what is left of the wait.

        Args:
            request_id: The request.
            timeout: Seconds to wait (30 minutes by default, as the provider's own
                clients); None waits for ever.
            resolution: The edit's resolution, so polling can expect its run time.
            on_status: Called with each `RequestStatus` seen.
            submitted_at: When the request was submitted. Give it when the wait
                resumes an older request (a retry, a rerun): the job may have run for
                a while, and the schedule then does not sleep as if it had just started.
            log: Takes this wait's status lines instead of the client's logger, so a
                client shared by many jobs logs each job's lines where it is watched.

        Returns:
            The completed `RequestResult`.

        Raises:
            JobFailedError: The job failed at RunComfy.
            JobCancelledError: The job was cancelled.
            WaitTimeoutError: `timeout` passed first; the job may still finish.
            RunComfyError: The API refused or could not be reached (after retries).
        """
        tracker = self._tracker(request_id, timeout, resolution, on_status, submitted_at, log)
        until = tracker.deadline
        try:
            poll: RequestStatus | RequestResult = self._poll_status(request_id, until)
            while True:
                delay = tracker.observe(poll)
                if delay is None:
                    result = (
                        poll
                        if isinstance(poll, RequestResult)
                        else self._poll_result(request_id, True, until)
                    )
                    if result.is_terminal:
                        return tracker.finish(result)
                    delay = tracker.result_not_ready()
                time.sleep(delay)
                poll = (
                    self._poll_result(request_id, True, until)
                    if tracker.polls_result_next
                    else self._poll_status(request_id, until)
                )
        except _OutOfTime as stop:
            raise tracker.timeout_error() from stop.error


class AsyncRunComfyClient(_ClientCore):
    """The async twin of `RunComfyClient`: the same methods, awaited, the same time bounds.

    Takes the same arguments, and `max_connections` (the connection pool's size, for
    a batch that shares one client across many lanes); a call waiting for a free
    connection waits within its own deadlines.

    Example:
        ```python
        async with AsyncRunComfyClient() as client:  # RUNCOMFY_API_TOKEN, RUNCOMFY_BASE_URL
            status = await client.status("REQUEST_ID")
        ```
    """

    def __init__(
        self,
        api_token: str | SecretStr | None = None,
        base_url: str | None = None,
        *,
        timeout: float = 30.0,
        total_timeout: float = DEFAULT_TOTAL_TIMEOUT,
        retry_policy: RetryPolicy | None = None,
        polling_policy: PollingPolicy | None = None,
        duration_estimator: RunDurationEstimator | None = None,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        max_connections: int = 100,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        output_hosts: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            api_token,
            base_url,
            timeout,
            total_timeout,
            retry_policy,
            polling_policy,
            duration_estimator,
            logger,
            max_answer_bytes,
            output_hosts,
        )
        self._http = httpx.AsyncClient(
            **self._http_options(),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        install_deadlines(self._http)

    async def __aenter__(self) -> AsyncRunComfyClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client's connections (what leaving an `async with` block does)."""
        await self._http.aclose()

    async def _attempt(
        self,
        kind: CallKind,
        method: str,
        path: str,
        limit: int,
        request_id: str | None,
        call: _Call,
        **send: Any,
    ) -> dict[str, Any] | RunComfyError:
        with call_deadline(self.timeout, until=call.ends) as deadline:
            async with self._http.stream(
                method, path, timeout=self._attempt_timeout(deadline), **send
            ) as response:
                try:
                    content = await aread_answer(response, limit)
                except AnswerTooLarge as exc:
                    return self._too_large(kind, exc, response.status_code, request_id)
        return self._outcome(kind, response, content, request_id)

    async def _call(
        self,
        kind: CallKind,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        request_id: str | None = None,
        limit: int | None = None,
        until: float | None = None,
    ) -> dict[str, Any]:
        call = _Call(self.total_timeout, until)
        while True:
            call.attempts += 1
            if (pause := self._pause_remaining(call)) > 0:
                await asyncio.sleep(pause)
            try:
                outcome = await self._attempt(
                    kind,
                    method,
                    path,
                    limit or self.max_answer_bytes,
                    request_id,
                    call,
                    json=json,
                    params=params,
                )
            except httpx.TransportError as exc:
                # The base URL in the message: a person must see which API could not be reached.
                outcome = transport_error(kind, exc, f"{method} {self.base_url}{path}")
            if not isinstance(outcome, RunComfyError):
                return outcome
            await asyncio.sleep(self._next_step(kind, outcome, call))

    async def submit(self, model_id: str, payload: Payload) -> RequestHandle:
        """Submit a job for any model id. Billed: retried only when it provably never arrived.

        Args:
            model_id: The model, e.g. `google/nano-banana/pro/edit`.
            payload: The request body: a pydantic model or a dict.

        Returns:
            The `RequestHandle`: request id and the URLs of its status and result.

        Raises:
            SubmitOutcomeUnknownError: The submit may have been billed (a 5xx or a
                timeout after sending); it is never resent.
            AuthenticationError: The API token was refused.
            InsufficientBalanceError: The account balance is too low.
            InvalidRequestError: The API refused the body (nothing was billed).
            APIConnectionError: The API could not be reached (nothing was sent).
        """
        body = self._payload_json(payload)
        answer = await self._call(CallKind.SUBMIT, "POST", self._submit_path(model_id), json=body)
        return self._handle(answer, body)

    async def submit_edit(self, edit: EditInput) -> RequestHandle:
        """Submit a Nano Banana Pro edit, validated before anything is sent.

        Args:
            edit: A `NanoBananaEditInput` or a dict of its fields (`prompt`,
                `image_urls`, and optionally `aspect_ratio`, `resolution`,
                `output_format`, `num_images`, `sync_mode`).

        Returns:
            The `RequestHandle` of the submitted request.

        Raises:
            pydantic.ValidationError: The edit is not valid (nothing was sent).
            SubmitOutcomeUnknownError: The submit may have been billed; never resent.
            AuthenticationError: The API token was refused.
            InsufficientBalanceError: The account balance is too low.

        Example:
            ```python
            async with AsyncRunComfyClient() as client:
                handle = await client.submit_edit({"prompt": "Add snow", "image_urls": [url]})
                print((await client.wait(handle.request_id)).output_urls)
            ```
        """
        return await self.submit(NANO_BANANA_EDIT_MODEL_ID, self._edit_input(edit))

    async def model_info(self, model_id: str = NANO_BANANA_EDIT_MODEL_ID) -> ModelInfo:
        """The model's listed price, for an estimate before a paid submit. A read: retried.

        Args:
            model_id: The model; Nano Banana Pro's edit by default.

        Returns:
            The `ModelInfo` (`base_price_usd`, `price_unit`, `pricing_note`; unknown
            fields kept). The listed price is no guaranteed minimum.

        Raises:
            RunComfyError: The API refused or could not be reached (after retries).
        """
        body = await self._call(CallKind.READ, "GET", self._submit_path(model_id))
        return ModelInfo.model_validate({"model_id": model_id, **body})

    async def status(self, request_id: str) -> RequestStatus:
        """A request's current status. A read: retried on transient errors.

        Args:
            request_id: The request.

        Returns:
            The `RequestStatus` (`status`, and `queue_position` while queued).

        Raises:
            NotFoundError: RunComfy knows no such request.
            RunComfyError: The API refused or could not be reached (after retries).
        """
        return await self._poll_status(request_id, None)

    async def result(self, request_id: str, *, include_cost: bool = True) -> RequestResult:
        """A request's result: its outputs and cost once completed, else its status.

        Args:
            request_id: The request.
            include_cost: Ask for the billed cost too.

        Returns:
            The `RequestResult` (`status`, `output_urls`, `cost`, times).

        Raises:
            NotFoundError: RunComfy knows no such request.
            RunComfyError: The API refused or could not be reached (after retries).
        """
        return await self._poll_result(request_id, include_cost, None)

    async def _poll_status(self, request_id: str, until: float | None) -> RequestStatus:
        body = await self._call(
            CallKind.READ,
            "GET",
            self._request_path(request_id, "status"),
            request_id=request_id,
            until=until,
        )
        return self._status(body, request_id)

    async def _poll_result(
        self, request_id: str, include_cost: bool, until: float | None
    ) -> RequestResult:
        body = await self._call(
            CallKind.READ,
            "GET",
            self._request_path(request_id, "result"),
            params={"include_cost": "true"} if include_cost else None,
            request_id=request_id,
            limit=self._answer_limit("result", request_id),
            until=until,
        )
        return self._result(body, request_id)

    async def cancel(self, request_id: str) -> CancelResult:
        """Cancel a request while it is queued.

        Args:
            request_id: The request.

        Returns:
            The `CancelResult`: `outcome` is `cancelled`, or `not_cancellable` for a
            request already running (it runs on, and is billed).

        Raises:
            RunComfyError: The API refused or could not be reached (after retries).
        """
        body = await self._call(
            CallKind.READ, "POST", self._request_path(request_id, "cancel"), request_id=request_id
        )
        return self._cancel_result(body, request_id)

    async def wait(
        self,
        request_id: str,
        timeout: float | None = DEFAULT_WAIT_TIMEOUT,
        *,
        resolution: str | None = None,
        on_status: StatusCallback | None = None,
        submitted_at: datetime | None = None,
        log: logging.Logger | logging.LoggerAdapter | None = None,
    ) -> RequestResult:
        """Poll until the job ends, and return its completed result.

        Polls adaptively: quick at first, backing off while queued, quiet while a
        running job cannot be done yet, then dense near its expected end. Returns or
        raises by `timeout` seconds whatever the server's pace: the poll in flight
        gets no more than what is left of the wait.

        Args:
            request_id: The request.
            timeout: Seconds to wait (30 minutes by default, as the provider's own
                clients); None waits for ever.
            resolution: The edit's resolution, so polling can expect its run time.
            on_status: Called with each `RequestStatus` seen.
            submitted_at: When the request was submitted. Give it when the wait
                resumes an older request (a retry, a rerun): the job may have run for
                a while, and the schedule then does not sleep as if it had just started.
            log: Takes this wait's status lines instead of the client's logger, so a
                client shared by many jobs logs each job's lines where it is watched.

        Returns:
            The completed `RequestResult`.

        Raises:
            JobFailedError: The job failed at RunComfy.
            JobCancelledError: The job was cancelled.
            WaitTimeoutError: `timeout` passed first; the job may still finish.
            RunComfyError: The API refused or could not be reached (after retries).
        """
        tracker = self._tracker(request_id, timeout, resolution, on_status, submitted_at, log)
        until = tracker.deadline
        try:
            poll: RequestStatus | RequestResult = await self._poll_status(request_id, until)
            while True:
                delay = tracker.observe(poll)
                if delay is None:
                    result = (
                        poll
                        if isinstance(poll, RequestResult)
                        else await self._poll_result(request_id, True, until)
                    )
                    if result.is_terminal:
                        return tracker.finish(result)
                    delay = tracker.result_not_ready()
                await asyncio.sleep(delay)
                poll = await (
                    self._poll_result(request_id, True, until)
                    if tracker.polls_result_next
                    else self._poll_status(request_id, until)
                )
        except _OutOfTime as stop:
            raise tracker.timeout_error() from stop.error
