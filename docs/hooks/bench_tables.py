"""MkDocs hook: fill `<!-- bench: NAME -->` markers with tables read from bench/results/NAME.json.

The benchmark pages then show what the last `make bench` wrote, never numbers copied by
hand. A marker whose file is missing (or a name with no table here) fails the build.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
TIMES = "\N{MULTIPLICATION SIGN}"
MARKER = re.compile(r"^<!-- bench: (\w+) -->$", re.M)


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _polling(data: dict[str, Any]) -> str:
    runs = {(r["resolution"], r["mode"], r["policy"]): r for r in data["simulated"]}
    rows = []
    for resolution, mode, _ in sorted({key for key in runs if key[2] == "adaptive"}):
        ours = runs[(resolution, mode, "adaptive")]
        fixed = runs[(resolution, mode, "fixed 2 s")]
        rows.append(
            [
                f"{resolution} {mode}",
                _num(ours["requests"]),
                f"**{ours['requests'] / fixed['requests']:.2f}**",
                f"{_num(ours['lag_mean'])} / {_num(ours['lag_p95'])}",
                f"{_num(fixed['requests'], 1)} / {_num(fixed['lag_mean'])}",
            ]
        )
    header = ["scenario", "ours: requests/job", f"{TIMES} fixed 2 s", "ours: lag mean / p95 (s)"]
    return _table([*header, "fixed 2 s: requests / lag (s)"], rows)


def _learned_priors(data: dict[str, Any]) -> str:
    runs = {(r["resolution"], r["factor"], r["policy"]): r for r in data["simulated"]}
    rows = []
    for resolution, factor, _ in sorted({key for key in runs if key[2] == "learned"}):
        learned = runs[(resolution, factor, "learned")]
        reported = runs[(resolution, factor, "reported only")]
        fixed = runs[(resolution, factor, "fixed 2 s")]
        rows.append(
            [
                f"{resolution} {TIMES}{factor}",
                _num(learned["requests"]),
                f"**{learned['requests'] / fixed['requests']:.2f}**",
                f"{_num(learned['lag_mean'])} / {_num(learned['lag_p95'])}",
                f"{reported['requests'] / fixed['requests']:.2f}",
                f"{_num(reported['lag_mean'])} / {_num(reported['lag_p95'])}",
            ]
        )
    header = [
        "scenario",
        "learned: requests/job",
        f"{TIMES} fixed 2 s",
        "learned: lag mean / p95 (s)",
    ]
    return _table(
        [*header, f"reported times only: {TIMES} fixed 2 s", "reported only: lag (s)"], rows
    )


def _batch_overhead(data: dict[str, Any]) -> str:
    names = {
        "floor": "floor: a bare asyncio + httpx loop, all submitted at once",
        "bare": "the same loop, 16 in flight, fixed polls",
        "client": "`AsyncRunComfyClient` alone, 16 in flight",
        "flow": "the `batch_edit` flow, archiving to a local folder",
    }
    goals = data.get("goals", {})
    rows = [
        [names.get(variant, variant), f"**{ratio:.3f}**", _num(goals.get(variant), 2)]
        for variant, ratio in data["median_x_ideal"].items()
    ]
    return _table(["variant", "wall time / ideal (median)", "goal"], rows)


def _scale(data: dict[str, Any]) -> str:
    def dropped(size: int) -> int:
        return max(run["dropped_events"] for run in data["runs"] if run["rows"] == size)

    rows = [
        [
            rows_,
            f"{m['wall']:.1f} s",
            f"{m['rows_per_second']:.1f}",
            f"{m['ms_per_row']:.1f}",
            f"{m['drain']:.1f} s",
            dropped(int(rows_)),
            m["runs"],
        ]
        for rows_, m in sorted(data["medians"].items(), key=lambda item: int(item[0]))
    ]
    header = [
        "rows",
        "wall",
        "rows/s",
        "ms/row",
        "server busy after the flow returned",
        "events the server dropped (worst run)",
        "runs",
    ]
    return _table(header, rows)


def _memory(data: dict[str, Any]) -> str:
    by_size: dict[tuple[int, int], dict[str, float]] = {}
    for result in data["results"]:
        key = (result["outputs"], result["output_mb"])
        by_size.setdefault(key, {})[result["method"]] = result["peak_growth_mb"]
    rows = []
    for (outputs, size), methods in sorted(by_size.items()):
        ours, naive = methods.get("archive_outputs"), methods.get("httpx.get().content")
        ratio = f"{ours / naive:.3f}" if ours and naive else "—"
        rows.append(
            [f"{outputs} {TIMES} {size} MB", f"{_num(ours, 1)} MB", f"{_num(naive, 1)} MB", ratio]
        )
    return _table(["outputs", "`archive_outputs`", "naive `httpx.get(url).content`", "ratio"], rows)


def _s3_scale(data: dict[str, Any]) -> str:
    figures = [*data["figures"], data["full_run"], data["full_run_inline"]]
    methods = ["GET", "HEAD", "PUT", "LIST", "API GET"]
    rows = [
        [
            figure["phase"],
            f"{figure['rows']:,}",
            f"{figure['seconds']:.2f}",
            *[figure["requests"].get(method, 0) for method in methods],
            _num(figure["per_row"], 3),
        ]
        for figure in figures
    ]
    return _table(["phase", "rows", "seconds", *methods, "S3 requests / row"], rows)


def _s3_scale_listing(data: dict[str, Any]) -> str:
    rows = [
        [
            figure["phase"],
            f"{figure['objects']:,}",
            f"{figure['new_rows']:,}",
            f"**{figure['first_submit_seconds']:.1f} s**",
            f"{figure['exit_after_sigterm_seconds']:.1f} s",
            figure["requests_to_first"].get("GET", 0),
            figure["requests_to_first"].get("LIST", 0),
        ]
        for figure in data["listed_flow"]
    ]
    header = ["listed batch", "objects", "new", "call to first submit", "SIGTERM to exit"]
    return _table([*header, "S3 GET before it", "S3 LIST before it"], rows)


def _startup(data: dict[str, Any]) -> str:
    rows = [[f"`{name}`", f"{seconds:.3f} s"] for name, seconds in data["median_seconds"].items()]
    return _table(["command", "median"], rows)


TABLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "polling": _polling,
    "learned_priors": _learned_priors,
    "batch_overhead": _batch_overhead,
    "scale": _scale,
    "memory": _memory,
    "s3_scale": _s3_scale,
    "s3_scale_listing": _s3_scale_listing,
    "startup": _startup,
}


def render(name: str) -> str:
    """The table and verdict of one benchmark, as Markdown."""
    data = json.loads((RESULTS / f"{name}.json").read_text())
    machine = data.get("machine", {})
    verdict = data.get("verdict")
    lines = [TABLES[name](data), ""]
    if verdict:
        lines.append(f"**Goal {'met' if verdict['met'] else 'missed'}:** {verdict['detail']}.")
        lines.append("")
    lines.append(
        f"*From `bench/results/{name}.json`: {machine.get('cpu_count', '?')} cores, "
        f"Python {machine.get('python', '?')}.*"
    )
    return "\n".join(lines)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """MkDocs' hook: replace each marker with its benchmark's table."""
    return MARKER.sub(lambda match: render(match.group(1)), markdown)
