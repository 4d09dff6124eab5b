"""What every benchmark shares: the machine line, tables, percentiles, verdicts, JSON results.

Numbers only mean something next to the machine that produced them and a
baseline measured in the same process, so each benchmark prints both and
writes the same figures to `bench/results/<name>.json` for the top README.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """The facts that explain a timing: cores, interpreter and OS."""
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def print_header(title: str) -> None:
    info = machine()
    print(f"\n=== {title} ===")
    print(
        f"machine: {info['cpu_count']} CPUs, {info['implementation']} {info['python']}, "
        f"{info['platform']}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, numbers right-aligned, readable in a terminal and a README."""
    cells = [
        [str(header) for header in headers],
        *([_cell(value) for value in row] for row in rows),
    ]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(
            value.ljust(width) if column == 0 else value.rjust(width)
            for column, (value, width) in enumerate(zip(row, widths, strict=True))
        )

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile by linear interpolation (numpy's default), no numpy needed."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Verdict:
    """One benchmark's one-line answer to its goal."""

    name: str
    met: bool
    detail: str

    def line(self) -> str:
        return f"[{self.name}] goal {'met' if self.met else 'MISSED'}: {self.detail}"


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write `bench/results/<name>.json` with the machine it was measured on."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {"benchmark": name, "machine": machine(), "argv": sys.argv, **data}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path
