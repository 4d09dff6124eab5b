"""The bookkeeping of one `wait`, shared by the sync and the async client.

The clients only do the I/O (poll, sleep, fetch the result); this tracker decides
how long to sleep, logs status changes, enforces the deadline and turns a
terminal result into a return value or an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .errors import JobCancelledError, JobFailedError, WaitTimeoutError
from .models import TERMINAL_STATES, RequestResult, RequestStatus
from .polling import PollingPolicy, PollState, RunDurationEstimator, next_poll_delay

StatusCallback = Callable[[RequestStatus], None]

_KNOWN_STATES = {"in_queue", "in_progress", *TERMINAL_STATES}


class WaitTracker:
    def __init__(
        self,
        request_id: str,
        *,
        timeout: float | None,
        policy: PollingPolicy,
        estimator: RunDurationEstimator,
        resolution: str | None,
        logger: logging.Logger | logging.LoggerAdapter,
        on_status: StatusCallback | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.request_id = request_id
        self._policy = policy
        self._estimator = estimator
        self._resolution = resolution
        self._logger = logger
        self._on_status = on_status
        self._clock = clock
        self._started = clock()
        self._deadline = None if timeout is None else self._started + timeout
        self._timeout = timeout
        self._last: RequestStatus | None = None
        self._status_since = self._started
        self._progress_since: float | None = None
        self._polls_in_status = 0
        self.statuses_seen: list[str] = []

    def observe(self, poll: RequestStatus | RequestResult) -> float | None:
        """Record a poll; the seconds to sleep before the next one, or None when terminal."""
        now = self._clock()
        status = (
            poll
            if isinstance(poll, RequestStatus)
            else RequestStatus(
                request_id=poll.request_id,
                status=poll.status,
                queue_position=(poll.model_extra or {}).get("queue_position"),
            )
        )
        changed = (
            self._last is None
            or status.status != self._last.status
            or status.queue_position != self._last.queue_position
        )
        if self._last is None or status.status != self._last.status:
            self._status_since = now
            self._polls_in_status = 0
            self.statuses_seen.append(status.status)
            if status.status == "in_progress":
                self._progress_since = now
            if status.status not in _KNOWN_STATES:
                self._logger.warning(
                    "Request %s reported unknown status %r; still polling until the deadline.",
                    self.request_id,
                    status.status,
                )
        self._polls_in_status += 1
        self._last = status
        if changed:
            self._log_change(status, now)
            if self._on_status is not None:
                self._on_status(status)
        if status.status in TERMINAL_STATES:
            return None
        delay = next_poll_delay(
            PollState(
                status=status.status,
                polls_in_status=self._polls_in_status,
                seconds_in_status=now - self._status_since,
                queue_position=status.queue_position,
                earliest_run_seconds=self._estimator.earliest_run(self._resolution, self._policy),
            ),
            self._policy,
        )
        return self._within_deadline(delay, now)

    @property
    def polls_result_next(self) -> bool:
        """A running job is polled through `result`: its last poll then carries the output."""
        return self._last is not None and self._last.status == "in_progress"

    def result_not_ready(self) -> float:
        """The status said terminal but the result did not yet: poll again shortly."""
        return self._within_deadline(
            self._policy.initial_interval * self._policy.time_scale, self._clock()
        )

    def finish(self, result: RequestResult) -> RequestResult:
        if result.status == "completed":
            if self._progress_since is not None:
                self._estimator.record(self._resolution, self._clock() - self._progress_since)
            return result
        if result.status == "cancelled":
            raise JobCancelledError(
                f"Request {self.request_id} was cancelled", request_id=self.request_id
            )
        message = _error_text(result.error) or "no error message from the server"
        raise JobFailedError(
            f"Request {self.request_id} failed: {message}",
            request_id=self.request_id,
            detail=result.error,
        )

    @property
    def elapsed(self) -> float:
        return self._clock() - self._started

    def _within_deadline(self, delay: float, now: float) -> float:
        if self._deadline is None:
            return delay
        remaining = self._deadline - now
        if remaining <= 0:
            last = self._last.status if self._last else None
            raise WaitTimeoutError(
                f"Request {self.request_id} did not finish within {self._timeout:g} s "
                f"(last status: {last}); it may still run remotely and can be collected later "
                "with its request id",
                request_id=self.request_id,
                last_status=last,
            )
        return min(delay, remaining)

    def _log_change(self, status: RequestStatus, now: float) -> None:
        position = (
            f", queue position {status.queue_position}" if status.queue_position is not None else ""
        )
        self._logger.info(
            "Request %s is %s%s (%.1f s elapsed)",
            self.request_id,
            status.status,
            position,
            now - self._started,
        )


def _error_text(error: object) -> str | None:
    if error is None:
        return None
    if isinstance(error, str):
        return error
    if isinstance(error, dict):
        for key in ("error_message", "message", "error", "detail"):
            if error.get(key):
                return str(error[key])
    return str(error)
