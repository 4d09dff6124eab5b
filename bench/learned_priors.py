"""Learned run times: a single job's lag and requests when the reported run times are off.

The wait schedule's quiet window comes from run times. From the reported ones
alone, a single job whose real run times are 0.6x the reported ones is noticed
about 4 s late (the window outlasts the run), and one at 1.5x is polled early
and often. A batch learns from its own finished jobs; a single job cannot, so
earlier runs' observations are saved with the archive (`RunTimeHistory`) and a
new run's estimator starts from them (`RunDurationEstimator.seed`).

On the simulated clock of `bench.polling` (FIFO server, the client's real
`WaitTracker`): per resolution and factor, one earlier batch of `BATCH_SIZE` jobs
is run and its estimator's observations saved to a `RunTimeHistory` in a temp
folder, as the batch flow does; then `SINGLE_JOBS` single jobs, each a new run
whose estimator is seeded from that file, against fixed 2 s polls on the same jobs
and against the same jobs started from the reported times (the guess).

One earlier batch is one draw: its few dozen runs may happen to be short or
spread. So the same is repeated over `SPREAD_BATCHES` other earlier batches
(`SPREAD_SINGLE_JOBS` single jobs each), and the spread of the figures is printed
beside the verdict, which stays that of the first batch.
"""

from __future__ import annotations

import random
import statistics
import tempfile
from dataclasses import asdict
from typing import Any

from prefect_nanobanana.client import NANO_BANANA_EDIT_MODEL_ID
from prefect_nanobanana.client.polling import PollingPolicy, RunDurationEstimator
from prefect_nanobanana.storage import RunTimeHistory

from ._common import Verdict, print_header, table, write_results
from .polling import (
    BATCH_SIZE,
    RESOLUTIONS,
    SEED,
    Figures,
    draw_jobs,
    simulate_fixed,
    simulate_policy,
)

FACTORS = (0.6, 1.5)  # real run times / reported run times
SINGLE_JOBS = 600  # per resolution and factor
LAG_GOAL = 1.2  # seconds, a single job's mean lag
RATIO_GOAL = 0.6  # requests per job against fixed 2 s
SPREAD_BATCHES = 10  # other earlier batches, for the spread
SPREAD_SINGLE_JOBS = 200  # per earlier batch


def _earlier_history(
    rng: random.Random, resolution: str, factor: float, policy: PollingPolicy
) -> dict[str, list[Any]]:
    """One earlier batch, its observations saved and read back as the batch flow does."""
    earlier = RunDurationEstimator()
    simulate_policy(
        draw_jobs(rng, resolution, BATCH_SIZE, factor), resolution, policy, estimator=earlier
    )
    with tempfile.TemporaryDirectory() as archive:
        RunTimeHistory(archive).save(NANO_BANANA_EDIT_MODEL_ID, earlier.recorded(policy.time_scale))
        return RunTimeHistory(archive).load(NANO_BANANA_EDIT_MODEL_ID)


def _seeded(history: dict[str, list[Any]], policy: PollingPolicy) -> RunDurationEstimator:
    estimator = RunDurationEstimator()
    estimator.seed(history, policy.time_scale)
    return estimator


def _scenario(resolution: str, factor: float, policy: PollingPolicy) -> dict[str, Figures]:
    rng = random.Random(f"{SEED}-learned-{resolution}-{factor}")
    history = _earlier_history(rng, resolution, factor, policy)
    singles = [draw_jobs(rng, resolution, 1, factor) for _ in range(SINGLE_JOBS)]
    learned, guessed, fixed = [], [], []
    for jobs in singles:
        learned += simulate_policy(jobs, resolution, policy, estimator=_seeded(history, policy))
        guessed += simulate_policy(jobs, resolution, policy)
        fixed += simulate_fixed(jobs, 2.0)
    return {
        "learned": Figures.of(learned),
        "reported only": Figures.of(guessed),
        "fixed 2 s": Figures.of(fixed),
    }


def _spread(resolution: str, factor: float, policy: PollingPolicy) -> list[tuple[float, float]]:
    """(requests x fixed 2 s, mean lag) of single jobs after each of other earlier batches."""
    figures = []
    for batch in range(SPREAD_BATCHES):
        rng = random.Random(f"{SEED}-spread-{batch}-{resolution}-{factor}")
        history = _earlier_history(rng, resolution, factor, policy)
        learned, fixed = [], []
        for _ in range(SPREAD_SINGLE_JOBS):
            jobs = draw_jobs(rng, resolution, 1, factor)
            learned += simulate_policy(jobs, resolution, policy, estimator=_seeded(history, policy))
            fixed += simulate_fixed(jobs, 2.0)
        seen, base = Figures.of(learned), Figures.of(fixed)
        figures.append((seen.requests / base.requests, seen.lag_mean))
    return figures


def run(*, policy: PollingPolicy | None = None) -> Verdict:
    """Simulate every resolution at both factors; print the table, write the JSON."""
    policy = policy or PollingPolicy()
    print_header("learned_priors: a single job after one earlier batch, run times off the reports")
    print(
        f"one earlier batch of {BATCH_SIZE} jobs saved to a RunTimeHistory, then {SINGLE_JOBS} "
        "single jobs per row, each a new run seeded from it; lag = job end -> noticed (s)"
    )
    rows: list[list[object]] = []
    records: list[dict[str, Any]] = []
    spread_rows: list[list[object]] = []
    spread_records: list[dict[str, Any]] = []
    misses: list[str] = []
    worst_lag = worst_ratio = 0.0
    for resolution in RESOLUTIONS:
        for factor in FACTORS:
            figures = _scenario(resolution, factor, policy)
            base = figures["fixed 2 s"]
            for name, value in figures.items():
                ratio = value.requests / base.requests
                rows.append(
                    [
                        f"{resolution} x{factor:g}",
                        name,
                        value.requests,
                        ratio,
                        value.lag_mean,
                        value.lag_p95,
                    ]
                )
                records.append(
                    {"resolution": resolution, "factor": factor, "policy": name, **asdict(value)}
                )
            learned = figures["learned"]
            ratio = learned.requests / base.requests
            worst_lag, worst_ratio = max(worst_lag, learned.lag_mean), max(worst_ratio, ratio)
            if learned.lag_mean > LAG_GOAL or ratio > RATIO_GOAL:
                misses.append(
                    f"{resolution} x{factor:g}: lag {learned.lag_mean:.2f} s, {ratio:.2f}x requests"
                )
            spread = _spread(resolution, factor, policy)
            ratios, lags = [ratio for ratio, _ in spread], [lag for _, lag in spread]
            met = sum(ratio <= RATIO_GOAL and lag <= LAG_GOAL for ratio, lag in spread)
            spread_rows.append(
                [
                    f"{resolution} x{factor:g}",
                    statistics.median(ratios),
                    max(ratios),
                    statistics.median(lags),
                    max(lags),
                    f"{met} of {len(spread)}",
                ]
            )
            spread_records.append(
                {"resolution": resolution, "factor": factor, "ratios": ratios, "lags": lags}
            )
    print(table(["scenario", "policy", "req/job", "x fixed 2s", "lag mean", "lag p95"], rows))
    print(
        f"\nspread over {SPREAD_BATCHES} other earlier batches "
        f"({SPREAD_SINGLE_JOBS} single jobs after each):"
    )
    print(
        table(
            ["scenario", "x fixed 2s median", "worst", "lag median", "worst", "goal met"],
            spread_rows,
        )
    )
    detail = "; ".join(misses) or (
        f"after one earlier batch a single job's mean lag is at most {worst_lag:.2f} s "
        f"(goal <= {LAG_GOAL}) at {worst_ratio:.2f}x fixed 2 s's requests (goal <= {RATIO_GOAL})"
    )
    verdict = Verdict("learned_priors", not misses, detail)
    write_results(
        "learned_priors",
        {
            "batch_size": BATCH_SIZE,
            "single_jobs": SINGLE_JOBS,
            "factors": FACTORS,
            "policy": asdict(policy),
            "simulated": records,
            "spread": {
                "batches": SPREAD_BATCHES,
                "single_jobs": SPREAD_SINGLE_JOBS,
                "scenarios": spread_records,
            },
            "verdict": asdict(verdict),
        },
    )
    print(verdict.line())
    return verdict
