"""The bookkeeping of one `wait`, shared by the sync and the async client.

The clients only do the I/O (poll, sleep, fetch the result); this tracker decides
how long to sleep, logs status changes, enforces the deadline and turns a
terminal result into a return value or an error. It also tells the batch's
shared `RunDurationEstimator` when its job started and how long it ran, which
is what lets the other waits of the batch sleep through the queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime

from .errors import JobCancelledError, JobFailedError, WaitTimeoutError
from .models import TERMINAL_STATES, RequestResult, RequestStatus
from .polling import PollingPolicy, PollState, RunDurationEstimator, next_poll_delay

StatusCallback = Callable[[RequestStatus], None]

# How long a wait polls unless told otherwise. The provider's own clients give up
# after 30 minutes; a 4K job takes about a minute (p95 90 s), so 30 minutes leave a
# long queue room and still end a wait on a stuck job. `timeout=None` waits for ever.
DEFAULT_WAIT_TIMEOUT = 30 * 60.0

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
        submitted_at: datetime | None = None,
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
        # The job started after its submit: after the wait began, unless the wait
        # resumes a request submitted earlier (`submitted_at`), which may have run a while.
        self._submitted = self._started
        if submitted_at is not None:
            self._submitted -= max(0.0, time.time() - submitted_at.timestamp())
        self._timeout = timeout
        self._last: RequestStatus | None = None
        self._status_since = self._started
        # The run began after `_start_after` (the last poll that saw it queued, else the
        # submit) and by `_start_seen` (the first poll that saw it run). The quiet
        # window counts from the middle and is shrunk by the half-width (see earliest_run).
        self._start_after: float | None = None
        self._start_seen: float | None = None
        self._queued_at: float | None = None
        self._last_running_at: float | None = None
        self._quiet: float | None = None
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
                queued_at = self._queued_at
                self._start_after = self._submitted if queued_at is None else queued_at
                self._start_seen = now
                self._estimator.job_started(self.request_id, self._resolution, self._start_after)
            if status.status not in _KNOWN_STATES:
                self._logger.warning(
                    "Request %s reported unknown status %r; still polling until the deadline.",
                    self.request_id,
                    status.status,
                )
        self._polls_in_status += 1
        self._last = status
        if status.status == "in_queue":
            self._queued_at = now
        elif status.status == "in_progress":
            self._last_running_at = now
        if changed:
            self._log_change(status, now)
            if self._on_status is not None:
                self._on_status(status)
        if status.status in TERMINAL_STATES:
            return None
        return self._within_deadline(next_poll_delay(self._state(status, now), self._policy), now)

    def _state(self, status: RequestStatus, now: float) -> PollState:
        since, uncertainty = self._status_since, 0.0
        if status.status == "in_progress" and self._start_after is not None:
            seen = now if self._start_seen is None else self._start_seen
            uncertainty = (seen - self._start_after) / 2
            since = self._start_after + uncertainty
        queue = None
        if status.status == "in_queue" and status.queue_position is not None:
            queue = self._estimator.queue_wait(status.queue_position, now, self._policy)
        quiet = self._estimator.earliest_run(self._resolution, self._policy, uncertainty)
        if status.status == "in_progress" and quiet is not None:
            # What the batch learns later may shorten this job's quiet window, never extend it.
            if self._quiet is not None:
                quiet = min(quiet, self._quiet)
            self._quiet = quiet
        return PollState(
            status=status.status,
            polls_in_status=self._polls_in_status,
            seconds_in_status=now - since,
            queue_position=status.queue_position,
            earliest_run_seconds=quiet,
            queue_earliest_start=None if queue is None else queue[0],
            dense_seconds=None
            if status.status != "in_progress" or quiet is None
            else self._estimator.dense_interval(
                self._resolution, self._policy, now - since, quiet, uncertainty
            ),
            queue_expected_start=None if queue is None else queue[1],
        )

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
        self._estimator.job_ended(self.request_id)
        if result.status == "completed":
            run_bounds = self._run_seconds(result, self._clock())
            if run_bounds is not None:
                self._estimator.record_between(self._resolution, *run_bounds)
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

    def _run_seconds(self, result: RequestResult, now: float) -> tuple[float, float] | None:
        """How long the completed job ran, as (low, high) seconds; equal when known well.

        The job started after the last poll that saw it queued and by the first that
        saw it run. The server's own timestamps (observed, not documented) give the
        time from submit to end exactly; without them, the end lies between the last
        poll that saw the job run and now. Within a few dense polls the middle is
        taken as exact; a wider gap (a queued job that slept through its start)
        gives bounds, which the estimator learns as such.
        """
        if self._start_after is None or self._start_seen is None or self._last_running_at is None:
            return None
        scale = self._policy.time_scale
        dense = self._policy.dense_interval * scale
        end_low, end_high = self._last_running_at, now
        if result.created_at is not None and result.finished_at is not None:
            total = (result.finished_at - result.created_at).total_seconds()
            # A wait that began long after the submit cannot tell the queue wait before it.
            if total <= now - self._submitted + self._policy.initial_interval * scale:
                end_low = end_high = self._submitted + total
        low, high = end_low - self._start_seen, end_high - self._start_after
        if high <= 0:
            return None
        start_gap = self._start_seen - self._start_after
        end_gap = end_high - end_low
        if start_gap <= 2 * dense and end_gap <= 1.5 * dense:
            middle = (end_low + end_high) / 2 - (self._start_after + self._start_seen) / 2
            return middle, middle
        return max(low, 0.0), high

    @property
    def elapsed(self) -> float:
        return self._clock() - self._started

    @property
    def deadline(self) -> float | None:
        """The wait's end on the tracker's clock (`time.monotonic`), None for no deadline."""
        return self._deadline

    def timeout_error(self) -> WaitTimeoutError:
        """The error of a wait past its deadline (the job may still finish remotely)."""
        self._estimator.job_ended(self.request_id)
        last = self._last.status if self._last else None
        return WaitTimeoutError(
            f"Request {self.request_id} did not finish within {self._timeout:g} s "
            f"(last status: {last}); it may still run remotely and can be collected later "
            "with its request id",
            request_id=self.request_id,
            last_status=last,
        )

    def _within_deadline(self, delay: float, now: float) -> float:
        if self._deadline is None:
            return delay
        remaining = self._deadline - now
        if remaining <= 0:
            raise self.timeout_error()
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
