"""Scale: rows per second of the `batch_edit` flow as batches grow, and what limits it.

With near-instant jobs (D = `DURATION`, 16 workers: the API alone could finish
`WORKERS / DURATION` rows a second) everything left is our per-row work and
Prefect's bookkeeping: a task run per row (submit, wait and archive in one), its
state events, the row's own events and log lines, progress-artifact updates,
all of it recorded by Prefect's temporary server into SQLite. Batches of
`SIZES` rows run on one server, started once. Each must archive every row
(checked against the flow's result and the metadata.json files on disk), and
once the server has drained it must have recorded every task run as completed
without dropping events.

Two paces: the flow's (rows / wall) and the server's (rows / (wall + drain),
since the server records a run's events long after the flow has returned).
Time per row that stays flat as batches grow means the cost is per row; a
server that is slower than the flow builds a backlog that grows with the batch
until its in-memory broker (10,000 messages a subscriber) starts dropping
events. Jobs shorter than `WORKERS` / (the server's pace) are where that starts.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from ._common import Verdict, print_header, table, write_results
from .batch_overhead import (
    Stack,
    _median_traffic,
    _traffic_line,
    bench_stack,
    cpu_seconds,
    first_submit,
    flow_batch,
    per_row,
    prefect_traffic,
    settle,
)

SIZES = (500, 1000, 2000)
RUNS = {500: 3, 1000: 3, 2000: 1}  # fewer of the longest: it alone takes minutes here
WORKERS = 16
DURATION = 0.05
WARMUP_ROWS = 32
TASK_RUNS_PER_ROW = 1  # `batch_edit` runs each row as one task run
# A size whose first run takes longer than this is not repeated (noted in the output).
REPEAT_BUDGET_SECONDS = 240.0
# Goal: no row lost, every task run recorded by Prefect with no event dropped, and the
# largest batch's time per row within this factor of the smallest's (a per-row cost).
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
    first_fifth_rps: float  # rows per second over the first and last fifth of the rows
    last_fifth_rps: float
    task_runs: int
    task_runs_completed: int
    dropped_events: int  # messages the server's in-memory broker threw away
    cpu_bench: float
    cpu_server: float
    cpu_emulator: float
    prefect_per_row: dict[str, float]  # API calls and events one row cost (`prefect_traffic`)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.wall

    @property
    def ms_per_row(self) -> float:
        return 1000 * self.wall / self.rows

    @property
    def sustained_rows_per_second(self) -> float:
        """The pace the server keeps up with: rows over the run plus its drain."""
        return self.rows / (self.wall + self.drain)


def _pace(finished: list[float], fraction: float, first: bool) -> float:
    """Rows per second over the first or last `fraction` of the rows to finish."""
    count = max(2, int(len(finished) * fraction))
    window = finished[:count] if first else finished[-count:]
    return (count - 1) / max(window[-1] - window[0], 1e-9)


def _task_runs(flow_run_id: str, expected: int) -> tuple[int, int]:
    """(task runs, completed task runs) the server has recorded for a flow run, once it
    has recorded `expected` completed ones or its task-run recorder's periodic flush has
    passed with nothing new (a recorder batching its writes holds the last few until then).
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings

    flush = get_current_settings().server.services.task_run_recorder.flush_interval
    runs = {"id": {"any_": [flow_run_id]}}
    completed = {"state": {"type": {"any_": ["COMPLETED"]}}}
    with httpx.Client(base_url=str(PREFECT_API_URL.value()), timeout=60) as client:

        def count(**criteria: object) -> int:
            return int(client.post("/task_runs/count", json={"flow_runs": runs, **criteria}).json())

        done, unchanged_since = count(task_runs=completed), time.monotonic()
        while done < expected and time.monotonic() - unchanged_since < flush + 1.0:
            time.sleep(0.5)
            if (now := count(task_runs=completed)) != done:
                done, unchanged_since = now, time.monotonic()
        return count(), done


def _recorder_batch_size() -> int:
    """Task-run states the server writes a transaction (Prefect's default: 1), from
    `PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE`, which the server inherits."""
    from prefect.settings import get_current_settings

    return get_current_settings().server.services.task_run_recorder.batch_size


def measure(rows: int, stack: Stack) -> ScaleRun:
    """One batch of `rows`, timed from the call to its return; then the server's drain."""
    emulator, server = stack.emulator, stack.server
    settle(server.pid)
    dropped_before = server.dropped_events()
    emulator.reset()
    archive = Path(tempfile.mkdtemp(prefix="archive-", dir=stack.workdir))
    cpu_before = (cpu_seconds(), cpu_seconds(server.pid), cpu_seconds(emulator.pid))
    started_wall, started = time.time(), time.perf_counter()
    with prefect_traffic() as traffic:
        result, finished = asyncio.run(
            flow_batch(stack.image_url, rows, archive, "bench-scale", lanes=WORKERS)
        )
    wall = time.perf_counter() - started
    drain = settle(server.pid)
    cpu_after = (cpu_seconds(), cpu_seconds(server.pid), cpu_seconds(emulator.pid))
    request_ids = [row.request_id for row in result.rows if row.request_id]
    head = asyncio.run(first_submit(emulator.base_url, request_ids)) - started_wall
    metadata = list(archive.rglob("metadata.json"))
    flow_run_id = json_flow_run_id(metadata[0]) if metadata else None
    expected = TASK_RUNS_PER_ROW * rows + 1
    task_runs, completed = _task_runs(flow_run_id, expected) if flow_run_id else (0, 0)
    return ScaleRun(
        rows=rows,
        wall=wall,
        archived=result.archived,
        files=len(metadata),
        head=head,
        tail=started_wall + wall - finished[-1],
        drain=drain,
        first_fifth_rps=_pace(finished, 0.2, first=True),
        last_fifth_rps=_pace(finished, 0.2, first=False),
        task_runs=task_runs,
        task_runs_completed=completed,
        dropped_events=server.dropped_events() - dropped_before,
        cpu_bench=cpu_after[0] - cpu_before[0],
        cpu_server=cpu_after[1] - cpu_before[1],
        cpu_emulator=cpu_after[2] - cpu_before[2],
        prefect_per_row=per_row(traffic, rows),
    )


def json_flow_run_id(path: Path) -> str | None:
    """The flow run id an archived row's metadata.json names."""
    return json.loads(path.read_text()).get("flow_run_id")


def run() -> Verdict:
    """Each size RUNS times (medians), smallest first; print, verdict, JSON."""
    recorder_batch = _recorder_batch_size()
    print_header(
        f"scale: batch_edit over {', '.join(map(str, SIZES))} rows, D = {DURATION:g} s, "
        f"{WORKERS} workers and lanes (API alone: {WORKERS / DURATION:g} rows/s); the "
        f"server's task-run recorder writes {recorder_batch} state(s) a transaction"
    )
    began = time.perf_counter()
    runs: list[ScaleRun] = []
    skipped: dict[int, int] = {}
    with bench_stack(WORKERS, DURATION, "bench-scale-") as stack:
        measure(WARMUP_ROWS, stack)
        for size in SIZES:
            for attempt in range(RUNS[size]):
                runs.append(measure(size, stack))
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
        cell = {
            "runs": len(mine),
            "wall": statistics.median(r.wall for r in mine),
            "rows_per_second": statistics.median(r.rows_per_second for r in mine),
            "ms_per_row": statistics.median(r.ms_per_row for r in mine),
            "first_fifth_rps": statistics.median(r.first_fifth_rps for r in mine),
            "last_fifth_rps": statistics.median(r.last_fifth_rps for r in mine),
            "drain": statistics.median(r.drain for r in mine),
            "sustained_rows_per_second": statistics.median(
                r.sustained_rows_per_second for r in mine
            ),
            "cpu_bench_ms_per_row": statistics.median(1000 * r.cpu_bench / r.rows for r in mine),
            "cpu_server_ms_per_row": statistics.median(1000 * r.cpu_server / r.rows for r in mine),
            "head": statistics.median(r.head for r in mine),
            "tail": statistics.median(r.tail for r in mine),
        }
        medians[size] = cell
        table_rows.append(
            [
                size,
                cell["runs"],
                cell["wall"],
                cell["rows_per_second"],
                cell["ms_per_row"],
                cell["first_fifth_rps"],
                cell["last_fifth_rps"],
                cell["drain"],
                cell["sustained_rows_per_second"],
                cell["cpu_bench_ms_per_row"],
                cell["cpu_server_ms_per_row"],
                f"{min(r.archived for r in mine)}/{min(r.files for r in mine)}/{size}",
                f"{min(r.task_runs_completed for r in mine)}/{TASK_RUNS_PER_ROW * size + 1}",
                max(r.dropped_events for r in mine),
            ]
        )
    print(
        "median of the runs of each size (a 2-core machine shared with other work: noisy). "
        "pace = rows/s over the first and last fifth of the rows; drain = seconds the server "
        "stayed busy after the flow returned; sustained = rows / (wall + drain), the pace the "
        "server keeps up with; CPU per row includes the drain; task runs = completed as "
        "recorded by the server / expected (one a row + plan); dropped = events the server's "
        "in-memory broker threw away (worst run)"
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
                "drain s",
                "sustained",
                "CPU flow ms/row",
                "CPU server ms/row",
                "archived/files/rows",
                "task runs",
                "dropped",
            ],
            table_rows,
        )
    )
    if skipped:
        print(f"not repeated (first run over {REPEAT_BUDGET_SECONDS:g} s): {skipped}")
    traffic = _median_traffic([run.prefect_per_row for run in runs])
    print(f"Prefect per row (median of every run): {_traffic_line(traffic)}")
    smallest, largest = medians[SIZES[0]], medians[SIZES[-1]]
    growth = largest["ms_per_row"] / smallest["ms_per_row"]
    lost = [run for run in runs if run.archived != run.rows or run.files != run.rows]
    unrecorded = [
        run
        for run in runs
        if run.task_runs_completed < TASK_RUNS_PER_ROW * run.rows or run.dropped_events
    ]
    # Past this, the flow outruns the server: jobs shorter than this (at these lanes)
    # leave a backlog that grows with the batch until the broker drops events.
    knee_seconds = WORKERS / smallest["sustained_rows_per_second"]
    met = not lost and not unrecorded and growth <= GROWTH_GOAL
    detail = (
        f"{largest['rows_per_second']:.1f} rows/s at {SIZES[-1]} rows vs "
        f"{smallest['rows_per_second']:.1f} at {SIZES[0]} (time per row x{growth:.2f}, goal <= "
        f"{GROWTH_GOAL}); rows lost in {len(lost)} runs; Prefect's record incomplete in "
        f"{len(unrecorded)} runs (server sustains {smallest['sustained_rows_per_second']:.1f} "
        f"rows/s: jobs under ~{knee_seconds:.1f} s at {WORKERS} lanes outrun it)"
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
            "task_run_recorder_batch_size": recorder_batch,
            "medians": medians,
            "ms_per_row_growth": growth,
            "knee_job_seconds": knee_seconds,
            "prefect_per_row": traffic,
            "runs": [
                {
                    **asdict(run),
                    "rows_per_second": run.rows_per_second,
                    "ms_per_row": run.ms_per_row,
                    "sustained_rows_per_second": run.sustained_rows_per_second,
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
