"""When to poll next: a pure function of what the API has told us so far.

A fixed interval either floods the API (0.1 s) or notices a finished job late
(5 s). This schedule aims for the lag of a 2 s poll at a fraction of its requests:

* Running: stay quiet while the job is unlikely to be done (the quiet window,
  from the reported run times or learned from the batch's finished jobs), then
  poll densely: about every 1.5 s, calmer where few runs end and denser where
  most do (the run-time law's hazard).
* Queued while jobs of our own batch run: a job at queue position p starts when
  p of them have ended (FIFO). The shared estimator knows when they started and
  how long runs take, so the wait sleeps until about when that happens, never past
  the moment the job could have started and ended.
* Otherwise (a lone job, a queue of strangers): poll quickly at first, then back off.

`python -m bench polling` measures it with a simulated clock and the real emulator.
"""

from __future__ import annotations

import bisect
import math
import statistics
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

# Run times of Nano Banana Pro that third parties report, (mean, p95) seconds: 1K
# 15-20 s (p95 25 s), 2K 30-40 s (p95 50 s), 4K 50-70 s (p95 90 s). The prior of a
# run's length is the lognormal with these two figures (the emulator's too).
REPORTED_RUN_SECONDS: dict[str, tuple[float, float]] = {
    "1K": (17.5, 25.0),
    "2K": (35.0, 50.0),
    "4K": (60.0, 90.0),
}
DEFAULT_OVERSHOOT_BUDGET = 0.15
_PRIOR_POINTS = 40  # the prior distribution as this many evenly spaced quantiles
_Z95 = NormalDist().inv_cdf(0.95)


def _lognormal_law(mean: float, p95: float) -> NormalDist:
    """The law of log run seconds for the lognormal with this mean and 95th percentile.

    Solving mean = exp(mu + sigma²/2) and p95 = exp(mu + z95·sigma) for sigma gives
    the smaller root of a quadratic.
    """
    sigma = _Z95 - math.sqrt(max(0.0, _Z95**2 - 2 * math.log(p95 / mean)))
    return NormalDist(math.log(mean) - sigma**2 / 2, sigma)


def _quantiles(law: NormalDist, points: int = _PRIOR_POINTS) -> list[float]:
    """Evenly spaced quantiles, in seconds, of the run length whose log follows `law`."""
    return [math.exp(law.inv_cdf((i + 0.5) / points)) for i in range(points)]


def _lognormal_quantiles(mean: float, p95: float, points: int = _PRIOR_POINTS) -> list[float]:
    """Evenly spaced quantiles of the lognormal with this mean and 95th percentile."""
    return _quantiles(_lognormal_law(mean, p95), points)


_STANDARD = NormalDist()


def _hazard(law: NormalDist, seconds: float) -> float:
    """How likely a run that has lasted `seconds` is to end in the next one: f / S."""
    z = (math.log(max(seconds, 1e-9)) - law.mean) / law.stdev
    survival = max(1.0 - _STANDARD.cdf(z), 1e-12)
    return max(_STANDARD.pdf(z) / (law.stdev * max(seconds, 1e-9) * survival), 1e-12)


def _quiet_window(runs: Sequence[float], budget: float, uncertainty: float = 0.0) -> float:
    """The longest wait w whose mean overshoot E[(w - run - u)+] stays within `budget`.

    The mean is over `runs`; u, the error of the start the wait counts from, is
    uniform on ±`uncertainty`. A wait past a run's end is lag the user pays.
    """

    def overshoot(wait: float) -> float:
        total = 0.0
        for run in runs:
            late = wait - run
            if late >= uncertainty:
                total += late
            elif late > -uncertainty:
                total += (late + uncertainty) ** 2 / (4 * uncertainty)
        return total / len(runs)

    low, high = 0.0, max(runs) + uncertainty + budget
    for _ in range(40):
        middle = (low + high) / 2
        if overshoot(middle) <= budget:
            low = middle
        else:
            high = middle
    return low


# The quiet window by resolution (13, 23.5 and 35 s): waiting this long before the
# first poll of a running job adds DEFAULT_OVERSHOOT_BUDGET seconds of lag on average;
# about one run in seven ends sooner and is noticed a little late.
EARLIEST_RUN_SECONDS: dict[str, float] = {
    resolution: round(_quiet_window(_lognormal_quantiles(*reported), DEFAULT_OVERSHOOT_BUDGET), 1)
    for resolution, reported in REPORTED_RUN_SECONDS.items()
}


@dataclass(frozen=True)
class PollingPolicy:
    """Knobs of the adaptive schedule, in seconds of the model's own clock.

    `time_scale` shrinks every duration for an emulator that runs jobs faster than
    the real model (the client reads it from RUNCOMFY_POLL_TIME_SCALE).
    `overshoot_budget` is the mean lag a learned quiet window may add.
    A queued job sleeps `queue_sleep_fraction` of its predicted queue wait, and
    never less than `max_interval`. After the quiet window a running job is polled
    about every `dense_interval`, and within `dense_range` (never calmer than a
    fixed 2 s poll; see `RunDurationEstimator.dense_interval`).
    """

    initial_interval: float = 0.25
    max_interval: float = 5.0
    growth: float = 1.6
    dense_interval: float = 1.5
    earliest_run_seconds: dict[str, float] = field(
        default_factory=lambda: dict(EARLIEST_RUN_SECONDS)
    )
    time_scale: float = 1.0
    reported_run_seconds: dict[str, tuple[float, float]] = field(
        default_factory=lambda: dict(REPORTED_RUN_SECONDS)
    )
    overshoot_budget: float = DEFAULT_OVERSHOOT_BUDGET
    queue_sleep_fraction: float = 0.9
    dense_range: tuple[float, float] = (1.2, 2.0)

    def prior_earliest_run(self, resolution: str | None) -> float | None:
        """The quiet window from the reported run times, before any run was seen.

        Args:
            resolution: The edit's resolution (`1K`, `2K`, `4K`).

        Returns:
            Seconds (on this policy's clock), or None for an unknown resolution.
        """
        if resolution not in self.earliest_run_seconds:
            return None
        return self.earliest_run_seconds[resolution] * self.time_scale

    def prior_law(self, resolution: str | None) -> NormalDist | None:
        """The prior law of a run's log seconds (on this policy's clock).

        Args:
            resolution: The edit's resolution.

        Returns:
            A lognormal law as a `NormalDist` of log seconds, or None when unknown.
        """
        if resolution not in self.reported_run_seconds:
            return None
        law = _lognormal_law(*self.reported_run_seconds[resolution])
        return NormalDist(law.mean + math.log(self.time_scale), law.stdev)

    def prior_runs(self, resolution: str | None) -> list[float] | None:
        """The prior distribution of a run's length.

        Args:
            resolution: The edit's resolution.

        Returns:
            Sorted quantiles of the run's seconds, or None when unknown.
        """
        law = self.prior_law(resolution)
        return None if law is None else _quantiles(law)


@dataclass(frozen=True)
class PollState:
    """What one wait knows at the moment it must decide how long to sleep.

    For a running job, `seconds_in_status` counts from our best estimate of its
    start and `earliest_run_seconds` is its quiet window. For a queued job,
    `queue_earliest_start` (rarely sooner) and `queue_expected_start` are the
    batch's prediction of its start, in seconds from now, while the batch has
    jobs running.
    """

    status: str
    polls_in_status: int
    seconds_in_status: float
    queue_position: int | None = None
    earliest_run_seconds: float | None = None
    queue_earliest_start: float | None = None
    queue_expected_start: float | None = None
    dense_seconds: float | None = None


def next_poll_delay(state: PollState, policy: PollingPolicy) -> float:
    """Seconds to sleep before the next poll."""
    scale = policy.time_scale
    longest = policy.max_interval * scale
    if state.status == "in_progress" and state.earliest_run_seconds is not None:
        quiet_left = state.earliest_run_seconds - state.seconds_in_status
        return max(quiet_left, state.dense_seconds or policy.dense_interval * scale)
    if state.status == "in_queue" and state.queue_expected_start is not None:
        earliest = state.queue_earliest_start or 0.0
        delay = max(longest, earliest, policy.queue_sleep_fraction * state.queue_expected_start)
        # Never past the moment it could have started and be at the end of its quiet window.
        return min(delay, max(longest, earliest + (state.earliest_run_seconds or 0.0)))
    backoff = policy.initial_interval * scale * policy.growth ** max(0, state.polls_in_status - 1)
    return min(longest, backoff)


# A run's length as one wait saw it: (low, high) seconds, equal when known exactly.
RunBounds = tuple[float, float]


class RunDurationEstimator:
    """Learns how long jobs run and which are running; shared by a batch's waits.

    A new estimator knows only the reported run times, which may be far off (a
    quiet window from runs 1.5x too long makes a single job's lag seconds long).
    `seed` gives it the run times earlier runs saw instead, so a new run starts
    from what was observed; `recorded` is what this one saw, for the next run.
    A run known only within bounds (a queued job that started somewhere in a long
    gap between polls) is learned as such (`record_between`), not dropped: the
    jobs whose start is seen exactly are only the first of a batch, too few to
    learn a spread from. Thread-safe: the waits of a batch run in threads or tasks
    of one client.
    """

    def __init__(self, window: int = 50, min_samples: int = 3) -> None:
        self._observed: dict[str, deque[RunBounds]] = {}
        self._recorded: dict[str, list[RunBounds]] = {}
        self._window = window
        self._min_samples = min_samples
        self._lock = threading.Lock()
        self._fitted: dict[str, tuple[NormalDist, list[float]]] = {}
        # request id -> (resolution, the moment it started at the earliest)
        self._running: dict[str, tuple[str | None, float]] = {}

    def record(self, resolution: str | None, seconds: float) -> None:
        """Learn a run whose length was seen exactly.

        Args:
            resolution: The edit's resolution.
            seconds: How long it ran.
        """
        self.record_between(resolution, seconds, seconds)

    def record_between(self, resolution: str | None, low: float, high: float) -> None:
        """Learn a run known only within bounds (its start fell in a gap between polls).

        Args:
            resolution: The edit's resolution.
            low: The fewest seconds it can have run.
            high: The most seconds it can have run.
        """
        key = resolution or "?"
        bounds = (max(min(low, high), 1e-3), max(low, high, 1e-3))
        with self._lock:
            self._observed.setdefault(key, deque(maxlen=self._window)).append(bounds)
            self._recorded.setdefault(key, []).append(bounds)
            self._fitted.pop(key, None)

    def seed(
        self, run_seconds: Mapping[str, Sequence[float | Sequence[float]]], time_scale: float = 1.0
    ) -> None:
        """Learn from run times earlier runs observed, per resolution, oldest first.

        A run is its seconds, or its [low, high] bounds. They are in the model's
        seconds (`time_scale` shrinks them for an emulator, as
        `PollingPolicy.time_scale` does). They count as this estimator's own
        observations (the newest `window` of them), and this run's runs push them
        out as they come; `recorded` leaves them out, so saving it never stores a
        sample twice.

        Args:
            run_seconds: Per resolution, runs as seconds or `[low, high]` bounds
                (what `recorded` returned, as `RunTimeHistory` keeps it).
            time_scale: The emulator's time scale; 1.0 for the real API.
        """
        with self._lock:
            for resolution, samples in run_seconds.items():
                older = [
                    (low * time_scale, high * time_scale)
                    for low, high in map(_as_bounds, samples)
                    if 0 < low <= high
                ]
                newer = list(self._observed.get(resolution, ()))
                self._observed[resolution] = deque([*older, *newer], maxlen=self._window)
                self._fitted.pop(resolution, None)

    def recorded(self, time_scale: float = 1.0) -> dict[str, list[float | list[float]]]:
        """The run times this estimator observed itself (not seeded), for the next run.

        Args:
            time_scale: The emulator's time scale, divided out; 1.0 for the real API.

        Returns:
            Per resolution, in the model's seconds: a run known exactly as its
            seconds, one known within bounds as `[low, high]`.
        """
        scale = time_scale or 1.0
        with self._lock:
            return {
                resolution: [
                    low / scale if low == high else [low / scale, high / scale]
                    for low, high in runs
                ]
                for resolution, runs in self._recorded.items()
            }

    def _law(self, resolution: str | None) -> tuple[NormalDist, list[float]] | None:
        """The batch's run-time law (of log seconds) and its quantiles, once it has
        enough samples.

        A lognormal fitted to the samples, not the samples themselves: a few dozen
        runs rarely show the short tail that decides how late a quiet window is.
        """
        key = resolution or "?"
        with self._lock:
            fitted = self._fitted.get(key)
            observed = list(self._observed.get(key, ()))
        if fitted is not None or len(observed) < self._min_samples:
            return fitted
        law = _fit_log_normal(observed)
        fitted = (law, _quantiles(law))
        with self._lock:
            self._fitted[key] = fitted
        return fitted

    def _learned(self, resolution: str | None) -> list[float] | None:
        """The batch's run-time distribution as sorted quantiles, once it has enough samples."""
        fitted = self._law(resolution)
        return None if fitted is None else fitted[1]

    def dense_interval(
        self,
        resolution: str | None,
        policy: PollingPolicy,
        running_for: float,
        quiet: float,
        uncertainty: float = 0.0,
    ) -> float:
        """The poll interval after the quiet window, for a job running `running_for` s.

        Polls are spent where runs end: the interval goes as 1/sqrt(hazard) (the
        fewest polls for a given mean lag), scaled so that the runs that end after
        the quiet window are noticed as late as with `dense_interval` on average,
        and kept within `dense_range`. A job whose start is known only
        within ±`uncertainty` > `dense_interval` (it slept through it in the queue)
        is polled at `dense_interval`: where it is in its law is not known well
        enough to follow the hazard.

        Args:
            resolution: The edit's resolution.
            policy: The polling policy.
            running_for: Seconds the job has run so far.
            quiet: The quiet window it was given, in seconds.
            uncertainty: How far (±, seconds) its start may lie from where it is counted.

        Returns:
            Seconds until the next poll.
        """
        dense = policy.dense_interval * policy.time_scale
        fitted = self._law(resolution)
        if fitted is None and (prior := policy.prior_law(resolution)) is not None:
            fitted = prior, _quantiles(prior)
        if fitted is None or uncertainty > dense:
            return dense
        law, runs = fitted
        ends = [run for run in runs if run > quiet] or runs
        mean_spacing = statistics.fmean(1 / math.sqrt(_hazard(law, run)) for run in ends)
        spacing = dense / math.sqrt(_hazard(law, running_for)) / mean_spacing
        shortest, longest = (bound * policy.time_scale for bound in policy.dense_range)
        return min(max(spacing, shortest), longest)

    def earliest_run(
        self, resolution: str | None, policy: PollingPolicy, uncertainty: float = 0.0
    ) -> float | None:
        """The quiet window: learned from this batch's runs, else the prior.

        `uncertainty` is how far (±, seconds) the run's start may lie from the
        moment the window counts from; the window shrinks so the expected lag
        stays within the budget all the same.

        Args:
            resolution: The edit's resolution.
            policy: The polling policy.
            uncertainty: Seconds (±) the run's start may lie off.

        Returns:
            Seconds a running job is left alone, or None when nothing is known.
        """
        observed = self._learned(resolution)
        if observed is not None:
            return _quiet_window(observed, policy.overshoot_budget * policy.time_scale, uncertainty)
        prior = policy.prior_earliest_run(resolution)
        return None if prior is None else max(0.0, prior - uncertainty)

    def job_started(self, request_id: str, resolution: str | None, after: float) -> None:
        """Note that a wait saw its job running, for the queue's predictions.

        Args:
            request_id: The request.
            resolution: The edit's resolution.
            after: The moment (monotonic) it started, at the earliest.
        """
        with self._lock:
            self._running[request_id] = (resolution, after)

    def job_ended(self, request_id: str) -> None:
        """Note that a job is no longer running.

        Args:
            request_id: The request.
        """
        with self._lock:
            self._running.pop(request_id, None)

    def queue_wait(
        self, position: int, now: float, policy: PollingPolicy
    ) -> tuple[float, float] | None:
        """(earliest, expected) seconds until a job at `position` starts, or None.

        Known only while the batch has jobs running: a FIFO worker frees up when one
        of them ends, so the job starts once `position` of them have ended (past all
        of them, each further position takes a mean run divided by their number).

        Args:
            position: The job's queue position.
            now: The current moment (monotonic).
            policy: The polling policy.

        Returns:
            `(earliest, expected)` seconds until it starts, or None while no job of
            the batch is known to run.
        """
        with self._lock:
            running = list(self._running.items())
        models: dict[str | None, list[float] | None] = {}
        jobs: list[tuple[float, list[float]]] = []
        for request_id, (resolution, after) in running:
            if resolution not in models:
                models[resolution] = self._learned(resolution) or policy.prior_runs(resolution)
            runs = models[resolution]
            if runs is None:
                return None  # a job of unknown length ahead: no prediction
            if now - after > 4 * runs[-1]:
                self.job_ended(request_id)  # its wait died without saying so
                continue
            jobs.append((after, runs))
        if not jobs:
            return None
        count = len(jobs)
        needed = min(position, count)
        earliest = _when_ended(jobs, needed, now, _Z95)
        expected = _when_ended(jobs, needed, now, 0.0)
        if position > count:
            mean_run = sum(sum(runs) / len(runs) for _, runs in jobs) / count
            expected += (position - count) * mean_run / count
        return earliest - now, expected - now


def _as_bounds(sample: float | Sequence[float]) -> RunBounds:
    if isinstance(sample, (int, float)):
        return float(sample), float(sample)
    low, high = sample
    return float(low), float(high)


_EM_ROUNDS = 30
# A fit moves less than this (in log seconds) once converged, a few rounds in: the rounds
# left would change nothing, and each costs a pass over every run on the event loop.
_EM_TOLERANCE = 1e-9
_EM_MIN_EXACT = 3


def _fit_log_normal(runs: Sequence[RunBounds]) -> NormalDist:
    """The normal law of log run seconds that best explains runs known exactly or
    within bounds: expectation-maximisation over the bounded ones (each stands for
    its expected log, and spread, under the current fit).

    Bounded runs alone cannot anchor the spread (bounds that share a moment are
    best explained by no spread at all), so with fewer than `_EM_MIN_EXACT` exact
    runs each bounded one counts as spread evenly over its bounds instead.
    """
    bounds = [(math.log(low), math.log(high)) for low, high in runs]
    middles = [(low + high) / 2 for low, high in bounds]
    correction = math.sqrt(len(bounds) / max(len(bounds) - 1, 1))  # the sample's n-1
    exact = sum(low == high for low, high in bounds)
    if exact == len(bounds):
        return NormalDist(statistics.fmean(middles), max(statistics.stdev(middles), 1e-6))
    mu = statistics.fmean(middles)
    spread = statistics.pvariance(middles)
    spread += statistics.fmean((high - low) ** 2 / 12 for low, high in bounds)
    sigma = max(math.sqrt(spread), 1e-6)
    if exact < _EM_MIN_EXACT:
        return NormalDist(mu, sigma * correction)
    standard = NormalDist()
    for _ in range(_EM_ROUNDS):
        first = second = 0.0
        for low, high in bounds:
            if high - low < 1e-9:
                first, second = first + low, second + low * low
                continue
            a, b = (low - mu) / sigma, (high - mu) / sigma
            mass = standard.cdf(b) - standard.cdf(a)
            if mass < 1e-12:  # bounds far out in the fit's tail: take them at their middle
                middle = (low + high) / 2
                first, second = first + middle, second + middle * middle
                continue
            pdf_a, pdf_b = standard.pdf(a), standard.pdf(b)
            shift = (pdf_a - pdf_b) / mass
            mean = mu + sigma * shift
            variance = sigma**2 * (1 + (a * pdf_a - b * pdf_b) / mass - shift**2)
            first, second = first + mean, second + variance + mean * mean
        previous = mu, sigma
        mu = first / len(bounds)
        sigma = max(math.sqrt(max(second / len(bounds) - mu * mu, 0.0)), 1e-6)
        if max(abs(mu - previous[0]), abs(sigma - previous[1])) < _EM_TOLERANCE:
            break
    return NormalDist(mu, sigma * correction)


def _when_ended(
    jobs: Sequence[tuple[float, list[float]]], needed: int, now: float, z: float
) -> float:
    """The moment `needed` of the running `jobs` have ended: on average (z=0), or
    with about a 5 % chance (z=1.645).

    Each job ends as its run distribution says, given that it still runs now;
    the number of ended jobs is taken as normal with the summed mean and variance.
    """

    def ended_by(moment: float) -> float:
        mean = variance = 0.0
        for after, runs in jobs:
            running_from = bisect.bisect_right(runs, now - after)
            left = len(runs) - running_from
            share = (
                1.0
                if left == 0
                else (bisect.bisect_right(runs, moment - after) - running_from) / left
            )
            mean += share
            variance += share * (1 - share)
        return mean + z * math.sqrt(variance)

    target = needed - 0.5
    low, high = now, now + max(runs[-1] for _, runs in jobs)
    if ended_by(low) >= target:
        return low
    for _ in range(30):
        middle = (low + high) / 2
        if ended_by(middle) >= target:
            high = middle
        else:
            low = middle
    return high
