"""When to poll next: a pure function of what the API has told us so far.

A fixed interval either floods the API (0.1 s) or notices a finished job late
(5 s). The schedule here polls quickly at first (short jobs, errors), then backs
off, and once a job is running it uses the expected run time (from the
resolution, or learned from jobs that already finished) to stay quiet while the
job cannot be done yet and to poll densely around when it should finish.
Benchmarks drive `next_poll_delay` directly with a simulated clock.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass, field

# Third-party reported latencies of Nano Banana Pro (typical run time, seconds).
EXPECTED_RUN_SECONDS: dict[str, float] = {"1K": 17.5, "2K": 35.0, "4K": 60.0}


@dataclass(frozen=True)
class PollingPolicy:
    """Knobs of the adaptive schedule; `time_scale` shrinks priors for emulated clocks."""

    initial_interval: float = 0.25
    max_interval: float = 5.0
    growth: float = 1.6
    quiet_fraction: float = 0.7
    dense_fraction: float = 0.06
    expected_run_seconds: dict[str, float] = field(
        default_factory=lambda: dict(EXPECTED_RUN_SECONDS)
    )
    time_scale: float = 1.0

    def prior_run_seconds(self, resolution: str | None) -> float | None:
        if resolution is None or resolution not in self.expected_run_seconds:
            return None
        return self.expected_run_seconds[resolution] * self.time_scale


@dataclass(frozen=True)
class PollState:
    """What one wait knows at the moment it must decide how long to sleep."""

    status: str
    polls_in_status: int
    seconds_in_status: float
    queue_position: int | None = None
    expected_run_seconds: float | None = None


def next_poll_delay(state: PollState, policy: PollingPolicy) -> float:
    """Seconds to sleep before the next poll."""
    backoff = min(
        policy.max_interval,
        policy.initial_interval * policy.growth ** max(0, state.polls_in_status - 1),
    )
    expected = state.expected_run_seconds
    if state.status == "in_progress" and expected:
        quiet_until = expected * policy.quiet_fraction
        if state.seconds_in_status < quiet_until:
            # The job cannot be done yet: sleep until it might be.
            return max(policy.initial_interval, quiet_until - state.seconds_in_status)
        dense = max(policy.initial_interval, expected * policy.dense_fraction)
        return min(policy.max_interval, dense)
    return backoff


class RunDurationEstimator:
    """Learns how long jobs run from the ones that finished, shared across waits."""

    def __init__(self, window: int = 50) -> None:
        self._observed: dict[str, deque[float]] = {}
        self._window = window
        self._lock = threading.Lock()

    def record(self, resolution: str | None, seconds: float) -> None:
        key = resolution or "?"
        with self._lock:
            self._observed.setdefault(key, deque(maxlen=self._window)).append(seconds)

    def estimate(self, resolution: str | None, policy: PollingPolicy) -> float | None:
        key = resolution or "?"
        with self._lock:
            observed = list(self._observed.get(key, ()))
        if len(observed) >= 3:
            # A low quantile: better to look a little early than to notice late.
            return statistics.quantiles(observed, n=10)[0]
        return policy.prior_run_seconds(resolution)
