"""Sync and async clients of the RunComfy Model API, twins with the same method names.

Both share `_ClientCore` for everything that is not I/O (configuration, request
building, answer parsing, the retry decision), so the two loops that do I/O are
the only code written twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import datetime
from typing import Any

import httpx
from pydantic import BaseModel, SecretStr

from .errors import (
    AuthenticationError,
    InvalidRequestError,
    RateLimitedError,
    RunComfyError,
    ServerError,
    SubmitOutcomeUnknownError,
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
)
from .polling import PollingPolicy, RunDurationEstimator
from .retry import CallKind, RetryPolicy, parse_retry_after, submit_server_error, transport_error
from .vocabulary import DEFAULT_BASE_URL, NANO_BANANA_EDIT_MODEL_ID
from .waiting import StatusCallback, WaitTracker

TOKEN_ENV_VAR = "RUNCOMFY_API_TOKEN"
BASE_URL_ENV_VAR = "RUNCOMFY_BASE_URL"
# Offline development: the emulator runs jobs faster than the real model, and the
# polling schedule's expected run times must shrink with it.
POLL_TIME_SCALE_ENV_VAR = "RUNCOMFY_POLL_TIME_SCALE"

logger = logging.getLogger("prefect_nanobanana.client")

Payload = dict[str, Any] | BaseModel
EditInput = NanoBananaEditInput | dict[str, Any]


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
        retry_policy: RetryPolicy | None,
        polling_policy: PollingPolicy | None,
        duration_estimator: RunDurationEstimator | None,
        log: logging.Logger | logging.LoggerAdapter | None,
    ) -> None:
        self._api_token = SecretStr(_plain_secret(api_token))
        self.base_url = (base_url or os.environ.get(BASE_URL_ENV_VAR) or DEFAULT_BASE_URL).rstrip(
            "/"
        )
        self.timeout = timeout
        self.retry_policy = retry_policy or RetryPolicy()
        self.polling_policy = polling_policy or PollingPolicy(
            time_scale=float(os.environ.get(POLL_TIME_SCALE_ENV_VAR) or 1.0)
        )
        self.duration_estimator = duration_estimator or RunDurationEstimator()
        self.logger = log or logger
        # A 429 pauses every call of this client, not just the one that saw it, so
        # a batch sharing one client slows down as a whole instead of hammering.
        self._paused_until = 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, api_token='**********')"

    def _http_options(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "timeout": httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)),
            "headers": {
                "Authorization": f"Bearer {self._api_token.get_secret_value()}",
                "Accept": "application/json",
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
        if not request_id or "/" in request_id:
            raise InvalidRequestError(f"Not a request id: {request_id!r}")
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

    def _redact(self, text: str) -> str:
        return text.replace(self._api_token.get_secret_value(), "**********")

    def _outcome(
        self, kind: CallKind, response: httpx.Response, request_id: str | None
    ) -> dict[str, Any] | RunComfyError:
        """The JSON body of a good answer, or the error it stands for."""
        try:
            body: Any = response.json()
        except ValueError:
            body = {"message": self._redact(response.text[:300])}
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
            return RunComfyError(
                f"Unexpected answer from RunComfy: {type(body).__name__}",
                status_code=response.status_code,
                request_id=request_id,
            )
        return body

    def _next_step(self, kind: CallKind, error: RunComfyError, attempt: int) -> float:
        """Seconds to wait before retrying, or raise `error` (or its submit form)."""
        if kind is CallKind.SUBMIT and isinstance(error, ServerError):
            raise submit_server_error(error)
        if not self.retry_policy.should_retry(kind, error, attempt):
            raise error
        delay = self.retry_policy.delay(attempt, getattr(error, "retry_after", None))
        if isinstance(error, RateLimitedError):
            self._paused_until = max(self._paused_until, time.monotonic() + delay)
        self.logger.warning(
            "%s; retrying in %.2f s (attempt %d of %d)",
            error,
            delay,
            attempt + 1,
            self.retry_policy.max_attempts,
        )
        return delay

    def _pause_remaining(self) -> float:
        return self._paused_until - time.monotonic()

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
    """Blocking client: `with RunComfyClient(api_token=...) as client: client.submit_edit(...)`."""

    def __init__(
        self,
        api_token: str | SecretStr | None = None,
        base_url: str | None = None,
        *,
        timeout: float = 30.0,
        retry_policy: RetryPolicy | None = None,
        polling_policy: PollingPolicy | None = None,
        duration_estimator: RunDurationEstimator | None = None,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
    ) -> None:
        super().__init__(
            api_token, base_url, timeout, retry_policy, polling_policy, duration_estimator, logger
        )
        self._http = httpx.Client(**self._http_options())

    def __enter__(self) -> RunComfyClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(
        self,
        kind: CallKind,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        attempt = 0
        while True:
            attempt += 1
            if (pause := self._pause_remaining()) > 0:
                time.sleep(pause)
            try:
                response = self._http.request(method, path, json=json, params=params)
                outcome = self._outcome(kind, response, request_id)
            except httpx.TransportError as exc:
                # The base URL in the message: a person must see which API could not be reached.
                outcome = transport_error(kind, exc, f"{method} {self.base_url}{path}")
            if not isinstance(outcome, RunComfyError):
                return outcome
            time.sleep(self._next_step(kind, outcome, attempt))

    def submit(self, model_id: str, payload: Payload) -> RequestHandle:
        """Submit a job for any model id. Billed: retried only if provably not received."""
        body = self._call(
            CallKind.SUBMIT, "POST", self._submit_path(model_id), json=self._payload_json(payload)
        )
        return RequestHandle.model_validate(body)

    def submit_edit(self, edit: EditInput) -> RequestHandle:
        return self.submit(NANO_BANANA_EDIT_MODEL_ID, self._edit_input(edit))

    def model_info(self, model_id: str = NANO_BANANA_EDIT_MODEL_ID) -> ModelInfo:
        """The model's listed price, for an estimate before a paid submit. A read: retried."""
        body = self._call(CallKind.READ, "GET", self._submit_path(model_id))
        return ModelInfo.model_validate({"model_id": model_id, **body})

    def status(self, request_id: str) -> RequestStatus:
        body = self._call(
            CallKind.READ, "GET", self._request_path(request_id, "status"), request_id=request_id
        )
        return RequestStatus.model_validate({"request_id": request_id, **body})

    def result(self, request_id: str, *, include_cost: bool = True) -> RequestResult:
        body = self._call(
            CallKind.READ,
            "GET",
            self._request_path(request_id, "result"),
            params={"include_cost": "true"} if include_cost else None,
            request_id=request_id,
        )
        return RequestResult.model_validate({"request_id": request_id, **body})

    def cancel(self, request_id: str) -> CancelResult:
        body = self._call(
            CallKind.READ, "POST", self._request_path(request_id, "cancel"), request_id=request_id
        )
        return CancelResult.model_validate({"request_id": request_id, **body})

    def wait(
        self,
        request_id: str,
        timeout: float | None = None,
        *,
        resolution: str | None = None,
        on_status: StatusCallback | None = None,
        submitted_at: datetime | None = None,
        log: logging.Logger | logging.LoggerAdapter | None = None,
    ) -> RequestResult:
        """Poll until the job ends; the completed result, or JobFailed/JobCancelled/WaitTimeout.

        When the wait resumes a request submitted a while ago (a retry, a rerun), give
        `submitted_at`: the job may have run for some time already, and the schedule
        then does not sleep through a quiet window as if it had just started. `log`
        takes this wait's status lines instead of the client's logger: a client shared
        by many jobs can log each job's lines where that job is watched.
        """
        tracker = self._tracker(request_id, timeout, resolution, on_status, submitted_at, log)
        poll: RequestStatus | RequestResult = self.status(request_id)
        while True:
            delay = tracker.observe(poll)
            if delay is None:
                result = poll if isinstance(poll, RequestResult) else self.result(request_id)
                if result.is_terminal:
                    return tracker.finish(result)
                delay = tracker.result_not_ready()
            time.sleep(delay)
            poll = self.result(request_id) if tracker.polls_result_next else self.status(request_id)


class AsyncRunComfyClient(_ClientCore):
    """The async twin of `RunComfyClient`: same methods, awaited."""

    def __init__(
        self,
        api_token: str | SecretStr | None = None,
        base_url: str | None = None,
        *,
        timeout: float = 30.0,
        retry_policy: RetryPolicy | None = None,
        polling_policy: PollingPolicy | None = None,
        duration_estimator: RunDurationEstimator | None = None,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        max_connections: int = 100,
    ) -> None:
        super().__init__(
            api_token, base_url, timeout, retry_policy, polling_policy, duration_estimator, logger
        )
        self._http = httpx.AsyncClient(
            **self._http_options(),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    async def __aenter__(self) -> AsyncRunComfyClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(
        self,
        kind: CallKind,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        attempt = 0
        while True:
            attempt += 1
            if (pause := self._pause_remaining()) > 0:
                await asyncio.sleep(pause)
            try:
                response = await self._http.request(method, path, json=json, params=params)
                outcome = self._outcome(kind, response, request_id)
            except httpx.TransportError as exc:
                # The base URL in the message: a person must see which API could not be reached.
                outcome = transport_error(kind, exc, f"{method} {self.base_url}{path}")
            if not isinstance(outcome, RunComfyError):
                return outcome
            await asyncio.sleep(self._next_step(kind, outcome, attempt))

    async def submit(self, model_id: str, payload: Payload) -> RequestHandle:
        body = await self._call(
            CallKind.SUBMIT, "POST", self._submit_path(model_id), json=self._payload_json(payload)
        )
        return RequestHandle.model_validate(body)

    async def submit_edit(self, edit: EditInput) -> RequestHandle:
        return await self.submit(NANO_BANANA_EDIT_MODEL_ID, self._edit_input(edit))

    async def model_info(self, model_id: str = NANO_BANANA_EDIT_MODEL_ID) -> ModelInfo:
        body = await self._call(CallKind.READ, "GET", self._submit_path(model_id))
        return ModelInfo.model_validate({"model_id": model_id, **body})

    async def status(self, request_id: str) -> RequestStatus:
        body = await self._call(
            CallKind.READ, "GET", self._request_path(request_id, "status"), request_id=request_id
        )
        return RequestStatus.model_validate({"request_id": request_id, **body})

    async def result(self, request_id: str, *, include_cost: bool = True) -> RequestResult:
        body = await self._call(
            CallKind.READ,
            "GET",
            self._request_path(request_id, "result"),
            params={"include_cost": "true"} if include_cost else None,
            request_id=request_id,
        )
        return RequestResult.model_validate({"request_id": request_id, **body})

    async def cancel(self, request_id: str) -> CancelResult:
        body = await self._call(
            CallKind.READ, "POST", self._request_path(request_id, "cancel"), request_id=request_id
        )
        return CancelResult.model_validate({"request_id": request_id, **body})

    async def wait(
        self,
        request_id: str,
        timeout: float | None = None,
        *,
        resolution: str | None = None,
        on_status: StatusCallback | None = None,
        submitted_at: datetime | None = None,
        log: logging.Logger | logging.LoggerAdapter | None = None,
    ) -> RequestResult:
        tracker = self._tracker(request_id, timeout, resolution, on_status, submitted_at, log)
        poll: RequestStatus | RequestResult = await self.status(request_id)
        while True:
            delay = tracker.observe(poll)
            if delay is None:
                result = poll if isinstance(poll, RequestResult) else await self.result(request_id)
                if result.is_terminal:
                    return tracker.finish(result)
                delay = tracker.result_not_ready()
            await asyncio.sleep(delay)
            poll = await (
                self.result(request_id) if tracker.polls_result_next else self.status(request_id)
            )
