"""Startup: `nanobanana --help` against a bare interpreter (`python -c pass`).

People type `--help` and scripts call the CLI in loops; importing Prefect, httpx
or pydantic at start would cost seconds. The CLI imports only argparse and the
light client layer at start, so `--help` should cost little more than starting
Python itself. Runs alternate between the two commands so drift (CPU frequency,
page cache) hits both alike.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ._common import Verdict, print_header, table, write_results

RUNS = 15
WARMUP = 2  # runs of each command first, unmeasured (page cache, .pyc files)
GOAL_EXTRA_SECONDS = 0.3


def _cli() -> list[str]:
    """The installed console script next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).with_name("nanobanana")
    found = str(beside) if beside.exists() else shutil.which("nanobanana")
    if found is None:
        raise SystemExit("the `nanobanana` command is not installed (pip install -e .)")
    return [found, "--help"]


def _time(command: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def run() -> Verdict:
    """Median wall time of each command over alternating runs; print, verdict, JSON."""
    print_header("startup: `nanobanana --help` vs `python -c pass` (wall time, subprocess)")
    commands = {"python -c pass": [sys.executable, "-c", "pass"], "nanobanana --help": _cli()}
    for _ in range(WARMUP):
        for command in commands.values():
            _time(command)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(RUNS):
        for name, command in commands.items():
            samples[name].append(_time(command))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    base = medians["python -c pass"]
    rows = [
        [name, medians[name], min(values), max(values), medians[name] - base, medians[name] / base]
        for name, values in samples.items()
    ]
    print(f"median of {RUNS} runs each, after {WARMUP} warm-up runs")
    print(table(["command", "median s", "min s", "max s", "+ s", "x python"], rows))
    extra = medians["nanobanana --help"] - base
    verdict = Verdict(
        "startup",
        extra < GOAL_EXTRA_SECONDS,
        f"`nanobanana --help` takes {extra:.3f} s more than `python -c pass` "
        f"(goal < {GOAL_EXTRA_SECONDS} s)",
    )
    write_results(
        "startup",
        {
            "runs": RUNS,
            "warmup": WARMUP,
            "median_seconds": medians,
            "extra_seconds": extra,
            "samples": samples,
            "verdict": asdict(verdict),
        },
    )
    print(verdict.line())
    return verdict
