"""When to poll next: a pure function of what the API has told us so far.

A fixed interval either floods the API (0.1 s) or notices a finished job late
(5 s). This schedule polls quickly at first (short jobs, early errors) and backs
off while a job is queued. Once the job runs, it stays quiet while the job cannot
be finished yet (the run time's low quantile: a prior per resolution, or learned
from jobs of the same batch that already finished) and then polls at a short,
fixed interval, so a finished job is noticed about as soon as with a 2 s poll at
a fraction of the requests. Benchmarks drive `next_poll_delay` with a simulated
clock.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass, field

# A run of Nano Banana Pro rarely ends sooner than this (seconds), from the
# latencies third parties report (1K 15-20 s, 2K 30-40 s, 4K 50-70 s).
EARLIEST_RUN_SECONDS: dict[str, float] = {"1K": 12.0, "2K": 25.0, "4K": 42.0}


@dataclass(frozen=True)
class PollingPolicy:
    """Knobs of the adaptive schedule, in seconds of the model's own clock.

    `time_scale` shrinks every duration for an emulator that runs jobs faster than
    the real model (the client reads it from RUNCOMFY_POLL_TIME_SCALE).
    """

    initial_interval: float = 0.25
    max_interval: float = 5.0
    growth: float = 1.6
    dense_interval: float = 1.8
    earliest_run_seconds: dict[str, float] = field(
        default_factory=lambda: dict(EARLIEST_RUN_SECONDS)
    )
    time_scale: float = 1.0

    def prior_earliest_run(self, resolution: str | None) -> float | None:
        if resolution not in self.earliest_run_seconds:
            return None
        return self.earliest_run_seconds[resolution] * self.time_scale


@dataclass(frozen=True)
class PollState:
    """What one wait knows at the moment it must decide how long to sleep."""

    status: str
    polls_in_status: int
    seconds_in_status: float
    queue_position: int | None = None
    earliest_run_seconds: float | None = None


def next_poll_delay(state: PollState, policy: PollingPolicy) -> float:
    """Seconds to sleep before the next poll."""
    initial = policy.initial_interval * policy.time_scale
    if state.status == "in_progress" and state.earliest_run_seconds is not None:
        quiet_left = state.earliest_run_seconds - state.seconds_in_status
        if quiet_left > initial:
            return quiet_left
        return policy.dense_interval * policy.time_scale
    backoff = initial * policy.growth ** max(0, state.polls_in_status - 1)
    return min(policy.max_interval * policy.time_scale, backoff)


class RunDurationEstimator:
    """Learns how long jobs run from the ones that finished; shared by a batch's waits."""

    def __init__(self, window: int = 50, min_samples: int = 3) -> None:
        self._observed: dict[str, deque[float]] = {}
        self._window = window
        self._min_samples = min_samples
        self._lock = threading.Lock()

    def record(self, resolution: str | None, seconds: float) -> None:
        with self._lock:
            self._observed.setdefault(resolution or "?", deque(maxlen=self._window)).append(seconds)

    def earliest_run(self, resolution: str | None, policy: PollingPolicy) -> float | None:
        """A run time few jobs beat: the learned 10th percentile, else the prior."""
        with self._lock:
            observed = list(self._observed.get(resolution or "?", ()))
        if len(observed) >= self._min_samples:
            return statistics.quantiles(observed, n=10, method="inclusive")[0]
        return policy.prior_earliest_run(resolution)
