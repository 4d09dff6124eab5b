"""The retry policy: which calls may be retried, after what, and how long to wait.

This is the only place that decides. Reads (status, result, cancel) are retried
on anything transient. A submit is billed and the API has no idempotency key, so
it is retried only when the request provably never reached the server (the
connection was never made, or HTTP 429); anything after the bytes left is
`SubmitOutcomeUnknownError`.
Whatever the policy allows, one call ends by its total (`DEFAULT_TOTAL_TIMEOUT`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

import httpx

from .errors import (
    APIConnectionError,
    RateLimitedError,
    RunComfyError,
    ServerError,
    SubmitOutcomeUnknownError,
)


class CallKind(str, Enum):
    READ = "read"
    SUBMIT = "submit"


# How long one API call may take in all, its retries included (the client's
# `total_timeout`). 45 s: more than one whole attempt (30 s by default), so a slow
# answer that arrives within its own deadline is never cut on a fresh call; room
# for the default policy's whole backoff (at most 0.5 + 1 + 2 + 4 + 8 = 15.5 s of
# sleeps over 6 attempts), so quick failures (a refused connection, a run of 503s)
# still get every attempt; and a caller hears within 45 s, not after 6 slow
# attempts of 30 s each (over 3 minutes), however slowly the server answers.
DEFAULT_TOTAL_TIMEOUT = 45.0

# The request never left this machine: safe to repeat even a billed call.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, honouring `Retry-After` when sent."""

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """How long to sleep before the next attempt.

        Args:
            attempt: The attempt that just failed (attempts count from 1).
            retry_after: The server's `Retry-After`, in seconds, when it sent one.

        Returns:
            Seconds: `retry_after` (capped at `max_delay`), else a full-jitter draw
            from an exponentially growing ceiling.
        """
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_delay)
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)

    def should_retry(self, kind: CallKind, error: RunComfyError, attempt: int) -> bool:
        """Whether a failed call is tried again.

        A read is retried on any transient error. A billed submit only when it
        provably never arrived (a refused connection, a 429): its outcome is
        otherwise unknown, and a resend could pay twice.

        Args:
            kind: A read or a submit.
            error: What the attempt raised.
            attempt: The attempt that failed (from 1).

        Returns:
            True to try again.
        """
        if attempt >= self.max_attempts:
            return False
        if kind is CallKind.SUBMIT:
            return isinstance(error, RateLimitedError) or (
                isinstance(error, APIConnectionError) and _was_not_sent(error)
            )
        return error.is_transient


def _was_not_sent(error: RunComfyError) -> bool:
    return isinstance(error.__cause__, _NOT_SENT)


def transport_error(kind: CallKind, exc: httpx.TransportError, what: str) -> RunComfyError:
    """Turn an httpx transport failure into our error, deciding if a submit's fate is unknown."""
    if kind is CallKind.SUBMIT and not isinstance(exc, _NOT_SENT):
        error: RunComfyError = SubmitOutcomeUnknownError(
            f"{what}: the connection failed after the request was sent ({type(exc).__name__}); "
            "the job may have been accepted and billed. It was NOT resubmitted. Check your "
            "RunComfy request history before submitting again",
        )
    else:
        error = APIConnectionError(f"{what}: could not reach RunComfy ({type(exc).__name__})")
    error.__cause__ = exc
    return error


def submit_server_error(error: ServerError) -> SubmitOutcomeUnknownError:
    """A 5xx on submit: the server may have queued the job before failing."""
    unknown = SubmitOutcomeUnknownError(
        f"Submit answered HTTP {error.status_code}: the job may have been accepted and billed. "
        "It was NOT resubmitted. Check your RunComfy request history before submitting again",
        status_code=error.status_code,
        error_code=error.error_code,
        request_id=error.request_id,
        detail=error.detail,
    )
    unknown.__cause__ = error
    return unknown


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
