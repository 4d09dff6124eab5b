"""Scale: rows per second of the `batch_edit` flow as batches grow, and what limits it.

With near-instant jobs (D = `DURATION`, 16 workers: the API alone could finish
`WORKERS / DURATION` rows a second) everything left is our per-row work and
Prefect's bookkeeping: three task runs per row (submit, wait, archive), their
state events, the row's own events and log lines, progress-artifact updates,
all of it written by Prefect's temporary server into SQLite. Batches of
`SIZES` rows run on one server, started once; each must archive every row
(checked against the flow's result and the metadata.json files on disk), and
the server must have recorded every task run once it has drained.

Time per row that stays flat as batches grow means the cost is per row (the
knee is then in D: below about `WORKERS` x the time per row, bookkeeping, not
the API, sets the pace); time per row that grows means some cost grows with the
batch (the database, per-run queries, the end-of-run artifacts).
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from ._common import Verdict, print_header, table, write_results
from .batch_overhead import (
    EmulatorProcess,
    api_environment,
    cpu_seconds,
    first_submit,
    flow_batch,
    input_server,
    poll_time_scale,
    prefect_server,
    settle,
)

SIZES = (500, 1000, 2000)
RUNS = {500: 3, 1000: 3, 2000: 1}  # fewer of the longest: it alone takes minutes here
WORKERS = 16
DURATION = 0.05
WARMUP_ROWS = 32
# A size whose first run takes longer than this is not repeated (noted in the output).
REPEAT_BUDGET_SECONDS = 240.0
# Goal: the largest batch loses no row, and its time per row is within this factor of
# the smallest's (flat: the cost is per row, nothing grows with the batch).
GROWTH_GOAL = 1.25


@dataclass
class ScaleRun:
    """One batch: its pace, and where the CPU went."""

    rows: int
    wall: float
    archived: int
    files: int
    head: float
    tail: float
    drain: float
    first_tenth_rps: float  # rows per second over the first and last tenth of the rows
    last_tenth_rps: float
    task_runs: int
    task_runs_completed: int
    cpu_bench: float
    cpu_server: float
    cpu_emulator: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.wall

    @property
    def ms_per_row(self) -> float:
        return 1000 * self.wall / self.rows


def _pace(finished: list[float], fraction: float, first: bool) -> float:
    """Rows per second over the first or last `fraction` of the rows to finish."""
    count = max(2, int(len(finished) * fraction))
    window = finished[:count] if first else finished[-count:]
    return (count - 1) / max(window[-1] - window[0], 1e-9)


def _task_runs(flow_run_id: str) -> tuple[int, int]:
    """(task runs, completed task runs) the server has recorded for a flow run."""
    from prefect.settings import PREFECT_API_URL

    runs = {"id": {"any_": [flow_run_id]}}
    completed = {"state": {"type": {"any_": ["COMPLETED"]}}}
    with httpx.Client(base_url=str(PREFECT_API_URL.value()), timeout=60) as client:
        total = client.post("/task_runs/count", json={"flow_runs": runs}).json()
        done = client.post(
            "/task_runs/count", json={"flow_runs": runs, "task_runs": completed}
        ).json()
    return int(total), int(done)


def measure(
    rows: int, emulator: EmulatorProcess, image_url: str, workdir: Path, server_pid: int
) -> ScaleRun:
    """One batch of `rows`, timed from the call to its return; then the server's drain."""
    settle(server_pid)
    emulator.reset()
    archive = Path(tempfile.mkdtemp(prefix="archive-", dir=workdir))
    cpu_before = (cpu_seconds(), cpu_seconds(server_pid), cpu_seconds(emulator.pid))
    started_wall, started = time.time(), time.perf_counter()
    result, finished = asyncio.run(
        flow_batch(image_url, rows, archive, "bench-scale", lanes=WORKERS)
    )
    wall = time.perf_counter() - started
    drain = settle(server_pid)
    cpu_after = (cpu_seconds(), cpu_seconds(server_pid), cpu_seconds(emulator.pid))
    request_ids = [row.request_id for row in result.rows if row.request_id]
    head = asyncio.run(first_submit(emulator.base_url, request_ids)) - started_wall
    metadata = list(archive.rglob("metadata.json"))
    flow_run_id = json_flow_run_id(metadata[0]) if metadata else None
    task_runs, completed = _task_runs(flow_run_id) if flow_run_id else (0, 0)
    return ScaleRun(
        rows=rows,
        wall=wall,
        archived=result.archived,
        files=len(metadata),
        head=head,
        tail=started_wall + wall - finished[-1],
        drain=drain,
        first_tenth_rps=_pace(finished, 0.1, first=True),
        last_tenth_rps=_pace(finished, 0.1, first=False),
        task_runs=task_runs,
        task_runs_completed=completed,
        cpu_bench=cpu_after[0] - cpu_before[0],
        cpu_server=cpu_after[1] - cpu_before[1],
        cpu_emulator=cpu_after[2] - cpu_before[2],
    )


def json_flow_run_id(path: Path) -> str | None:
    """The flow run id an archived row's metadata.json names."""
    return json.loads(path.read_text()).get("flow_run_id")


def run() -> Verdict:
    """Each size RUNS times (medians), smallest first; print, verdict, JSON."""
    print_header(
        f"scale: batch_edit over {', '.join(map(str, SIZES))} rows, D = {DURATION:g} s, "
        f"{WORKERS} workers and lanes (API alone: {WORKERS / DURATION:g} rows/s)"
    )
    began = time.perf_counter()
    runs: list[ScaleRun] = []
    skipped: dict[int, int] = {}
    with (
        EmulatorProcess(WORKERS, DURATION) as emulator,
        input_server() as image_url,
        api_environment(emulator.base_url, poll_time_scale(DURATION)),
        tempfile.TemporaryDirectory(prefix="bench-scale-") as folder,
        prefect_server() as server_pid,
    ):
        workdir = Path(folder)
        measure(WARMUP_ROWS, emulator, image_url, workdir, server_pid)
        for size in SIZES:
            for attempt in range(RUNS[size]):
                runs.append(measure(size, emulator, image_url, workdir, server_pid))
                last = runs[-1]
                print(
                    f"  {size:5d} rows: {last.wall:6.1f} s, {last.rows_per_second:5.1f} rows/s, "
                    f"archived {last.archived}, server drained {last.drain:.1f} s later",
                    flush=True,
                )
                if last.wall + last.drain > REPEAT_BUDGET_SECONDS and attempt + 1 < RUNS[size]:
                    skipped[size] = RUNS[size] - attempt - 1
                    break
    table_rows: list[list[object]] = []
    medians: dict[int, dict[str, float]] = {}
    for size in SIZES:
        mine = [run for run in runs if run.rows == size]

        def median(values: list[float]) -> float:
            return statistics.median(values) if values else math.nan

        cell = {
            "runs": len(mine),
            "wall": median([r.wall for r in mine]),
            "rows_per_second": median([r.rows_per_second for r in mine]),
            "ms_per_row": median([r.ms_per_row for r in mine]),
            "first_tenth_rps": median([r.first_tenth_rps for r in mine]),
            "last_tenth_rps": median([r.last_tenth_rps for r in mine]),
            "drain": median([r.drain for r in mine]),
            "cpu_bench_ms_per_row": median([1000 * r.cpu_bench / r.rows for r in mine]),
            "cpu_server_ms_per_row": median([1000 * r.cpu_server / r.rows for r in mine]),
            "head": median([r.head for r in mine]),
            "tail": median([r.tail for r in mine]),
        }
        medians[size] = cell
        table_rows.append(
            [
                size,
                cell["runs"],
                cell["wall"],
                cell["rows_per_second"],
                cell["ms_per_row"],
                cell["first_tenth_rps"],
                cell["last_tenth_rps"],
                cell["head"],
                cell["tail"],
                cell["drain"],
                cell["cpu_bench_ms_per_row"],
                cell["cpu_server_ms_per_row"],
                f"{min(r.archived for r in mine)}/{min(r.files for r in mine)}/{size}",
                f"{min(r.task_runs_completed for r in mine)}/{min(r.task_runs for r in mine)}",
            ]
        )
    print(
        "median of the runs of each size (noisy 2-core machine shared with other work); "
        "pace = rows/s over the first and last tenth of the rows; drain = seconds the "
        "server stayed busy after the flow returned; CPU per row includes the drain"
    )
    print(
        table(
            [
                "rows",
                "runs",
                "wall s",
                "rows/s",
                "ms/row",
                "pace first",
                "pace last",
                "head s",
                "tail s",
                "drain s",
                "CPU flow ms/row",
                "CPU server ms/row",
                "archived/files/rows",
                "task runs done/all",
            ],
            table_rows,
        )
    )
    if skipped:
        print(f"not repeated (first run over {REPEAT_BUDGET_SECONDS:g} s): {skipped}")
    smallest, largest = medians[SIZES[0]], medians[SIZES[-1]]
    growth = largest["ms_per_row"] / smallest["ms_per_row"]
    lost = [run for run in runs if run.archived != run.rows or run.files != run.rows]
    unrecorded = [run for run in runs if run.task_runs_completed < 3 * run.rows]
    bookkeeping = WORKERS * smallest["ms_per_row"] / 1000
    met = not lost and not unrecorded and growth <= GROWTH_GOAL
    detail = (
        f"{largest['rows_per_second']:.1f} rows/s at {SIZES[-1]} rows vs "
        f"{smallest['rows_per_second']:.1f} at {SIZES[0]} (time per row x{growth:.2f}, goal <= "
        f"{GROWTH_GOAL}); {len(lost)} runs lost rows, {len(unrecorded)} left task runs "
        f"unrecorded; bookkeeping sets the pace for jobs shorter than ~{bookkeeping:.1f} s "
        f"at {WORKERS} lanes"
    )
    verdict = Verdict("scale", met, detail)
    write_results(
        "scale",
        {
            "sizes": SIZES,
            "runs_per_size": RUNS,
            "not_repeated": skipped,
            "workers": WORKERS,
            "duration_seconds": DURATION,
            "medians": medians,
            "ms_per_row_growth": growth,
            "knee_job_seconds": bookkeeping,
            "runs": [
                {
                    **asdict(run),
                    "rows_per_second": run.rows_per_second,
                    "ms_per_row": run.ms_per_row,
                }
                for run in runs
            ],
            "benchmark_seconds": time.perf_counter() - began,
            "verdict": asdict(verdict),
        },
    )
    print(verdict.line())
    return verdict


def main() -> None:
    """`python -m bench.scale`."""
    run()


if __name__ == "__main__":
    main()
