"""Batch overhead: what the client and the `batch_edit` flow add on top of the API's own time.

A batch of `ROWS` edits against an emulator with `WORKERS` workers and a fixed
job duration D can finish no sooner than ceil(ROWS / WORKERS) · D (the ideal).
Measured, each as wall time / ideal:

* (a) floor: asyncio + httpx written here; every row submitted at once, so the
  API's FIFO queue keeps its workers busy and none of our per-job latency is on
  the critical path; jobs are then collected in the order they end.
* (a') bare, 16 in flight: the same shape as (b) and (c), with a naive fixed
  `BARE_POLL_INTERVAL` poll: what a hand-written loop costs.
* (b) client: `AsyncRunComfyClient.submit_edit` + `wait` under a semaphore of
  `WORKERS`, with its adaptive polling schedule; no Prefect.
* (c) flow: the `batch_edit` flow (`max_concurrency=WORKERS`) on Prefect's
  temporary server (SQLite, started once), archiving to a local folder; the
  inputs are loopback http URLs, which staging passes through untouched.

Medians of `RUNS` interleaved runs: other work on a small machine makes single
runs noisy. Before each run the Prefect server must be idle: it records a flow's
events for seconds after the flow returns (reported as "drain"), and that
backlog would otherwise share the CPU with whichever run came next. The
emulator runs in a subprocess, as the real API runs elsewhere.

D is 1 s, so the client's polling schedule, tuned to Nano Banana Pro's real run
times (1K: mean 17.5 s), is scaled with RUNCOMFY_POLL_TIME_SCALE = D / 17.5: the
prior's mean run then equals D, its quiet window becomes 0.74 s and its dense
interval 86 ms, as a real 17.5 s job would be polled, shrunk; after three jobs
the schedule learns D itself.

`python -m bench.batch_overhead --profile` samples one run of (c) with py-spy
(`pip install py-spy`; not a dependency) across this process and its
subprocesses, and writes the busiest functions to bench/results/.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# The flow logs a line per row and Prefect one per task run: keep them in the API
# (that cost is measured) but off the terminal, where they would bury the table.
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")

import httpx
from PIL import Image

from prefect_nanobanana.client.polling import REPORTED_RUN_SECONDS
from prefect_nanobanana.client.vocabulary import NANO_BANANA_EDIT_MODEL_ID

from ._common import Verdict, print_header, table, write_results

ROWS = 200
WORKERS = 16
DURATION = 1.0  # D: every emulated job runs exactly this long (real seconds)
RUNS = 5
WARMUP_ROWS = WORKERS  # one unmeasured round of each variant first (imports, connections)
FLOOR_POLL_INTERVAL = 0.02  # one job polled at a time: 50 requests/s
BARE_POLL_INTERVAL = 0.05
SETTLE_TIMEOUT = 300.0
CLIENT_GOAL = 1.05
FLOW_GOAL = 1.15
TOKEN = "bench-token"
PROMPT = "Benchmark edit"  # one prompt: the emulator renders it once, not per job


def poll_time_scale(duration: float) -> float:
    """The RUNCOMFY_POLL_TIME_SCALE under which the prior's mean 1K run equals `duration`."""
    return duration / REPORTED_RUN_SECONDS["1K"][0]


# -- the rig: emulator, inputs, Prefect server -----------------------------------------


class EmulatorProcess:
    """The emulator in a subprocess on a free loopback port; stats over its control API."""

    def __init__(self, workers: int, duration: float) -> None:
        self.command = [
            sys.executable,
            "-m",
            "prefect_nanobanana.emulator",
            "--port",
            "0",
            "--workers",
            str(workers),
            "--fixed-duration",
            str(duration),
            "--token",
            TOKEN,
        ]
        self.duration = duration
        self.process: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> EmulatorProcess:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline()
        if "listening on" not in first:
            self.process.kill()
            raise RuntimeError(f"the emulator did not start: {first!r}")
        self.base_url = first.rsplit(" ", 1)[-1].strip()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.base_url}/_emulator/stats", timeout=30).json()

    def reset(self) -> None:
        httpx.post(f"{self.base_url}/_emulator/reset", timeout=30).raise_for_status()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@contextlib.contextmanager
def input_server() -> Iterator[str]:
    """A loopback http URL of one small PNG: staging passes such URLs through untouched."""
    with tempfile.TemporaryDirectory(prefix="bench-inputs-") as folder:
        Image.new("RGB", (64, 64), (40, 160, 90)).save(Path(folder) / "input.png")
        server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=folder))
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/input.png"
        finally:
            server.shutdown()
            server.server_close()


@dataclass(frozen=True)
class PrefectServer:
    """Prefect's temporary server: its pid (for its CPU) and the file its log goes to."""

    pid: int
    log: Path

    def dropped_events(self) -> int:
        """Messages its in-memory broker has dropped so far (a full subscription queue)."""
        with self.log.open(errors="replace") as lines:
            return sum("dropping message" in line for line in lines)


@contextlib.contextmanager
def prefect_server() -> Iterator[PrefectServer]:
    """Prefect's temporary server (SQLite, own subprocess), started once.

    Its stderr goes to a file, not the terminal: under load it warns once per
    dropped event, thousands of lines that `dropped_events` counts instead.
    Task results go to a temporary folder, not ~/.prefect/storage.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-prefect-")))
        stack.enter_context(temporary_settings({PREFECT_LOCAL_STORAGE_PATH: folder}))
        log = folder / "server.log"
        sys.stderr.flush()
        saved = os.dup(2)
        with log.open("wb") as sink:
            os.dup2(sink.fileno(), 2)  # the server subprocess inherits this stderr
            try:
                stack.enter_context(prefect_test_harness(server_startup_timeout=120))
            finally:
                os.dup2(saved, 2)
                os.close(saved)
        process = SubprocessASGIServer._instances[None].server_process
        assert process is not None
        yield PrefectServer(process.pid, log)


@contextlib.contextmanager
def api_environment(base_url: str, scale: float) -> Iterator[None]:
    """RUNCOMFY_* as a deployment without a credentials block would set them."""
    values = {
        "RUNCOMFY_API_TOKEN": TOKEN,
        "RUNCOMFY_BASE_URL": base_url,
        "RUNCOMFY_POLL_TIME_SCALE": repr(scale),
    }
    with mock.patch.dict(os.environ, values):
        yield


@dataclass
class Stack:
    """What a run of the flow benchmarks needs, started once."""

    emulator: EmulatorProcess
    image_url: str
    workdir: Path
    server: PrefectServer


@contextlib.contextmanager
def bench_stack(workers: int, duration: float, prefix: str) -> Iterator[Stack]:
    """The emulator, the input images, the API environment and Prefect's temporary server."""
    with (
        EmulatorProcess(workers, duration) as emulator,
        input_server() as image_url,
        api_environment(emulator.base_url, poll_time_scale(duration)),
        tempfile.TemporaryDirectory(prefix=prefix) as workdir,
        prefect_server() as server,
    ):
        yield Stack(emulator, image_url, Path(workdir), server)


def _event_kind(name: str) -> str:
    """An event's family: Prefect's task runs' and flow runs' states, assets, ours."""
    for prefix, kind in (
        ("prefect.task-run.", "task-run"),
        ("prefect.flow-run.", "flow-run"),
        ("prefect.asset.", "asset"),
        ("nanobanana.", "nanobanana"),
    ):
        if name.startswith(prefix):
            return kind
    return "other"


@contextlib.contextmanager
def prefect_traffic() -> Iterator[Counter[str]]:
    """What this process sends Prefect while the block runs: `api` (HTTP calls to its API,
    log batches included) and `events` with one count per family (`events:task-run`…).

    Counted at the two doors every Prefect client goes through: httpx's `send` (calls
    to other hosts, such as the emulator, are not counted) and the events client's
    `emit` (the websocket carries events one by one).
    """
    from prefect.events.clients import EventsClient
    from prefect.settings import PREFECT_API_URL

    api = str(PREFECT_API_URL.value() or "")
    counts: Counter[str] = Counter()
    async_send, sync_send, emit = httpx.AsyncClient.send, httpx.Client.send, EventsClient.emit

    async def counted_async_send(self: Any, request: httpx.Request, **kwargs: Any) -> Any:
        if api and str(request.url).startswith(api):
            counts["api"] += 1
        return await async_send(self, request, **kwargs)

    def counted_sync_send(self: Any, request: httpx.Request, **kwargs: Any) -> Any:
        if api and str(request.url).startswith(api):
            counts["api"] += 1
        return sync_send(self, request, **kwargs)

    async def counted_emit(self: Any, event: Any) -> None:
        counts["events"] += 1
        counts[f"events:{_event_kind(event.event)}"] += 1
        return await emit(self, event)

    with (
        mock.patch.object(httpx.AsyncClient, "send", counted_async_send),
        mock.patch.object(httpx.Client, "send", counted_sync_send),
        mock.patch.object(EventsClient, "emit", counted_emit),
    ):
        yield counts


def per_row(counts: Counter[str], rows: int) -> dict[str, float]:
    """Counts of `prefect_traffic` divided by the rows of the batch, rounded for a table."""
    return {name: round(value / rows, 2) for name, value in sorted(counts.items())}


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU of a process (this one by default) and its reaped children."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def settle(pid: int | None, busy_below: float = 0.1, window: float = 0.5) -> float:
    """Wait until a process (the Prefect server) is idle; the seconds that took.

    The server records a flow's events after the flow returns; a run started
    meanwhile would share the CPU with that backlog, whichever variant it is.
    """
    if pid is None:
        return 0.0
    began = time.perf_counter()
    while time.perf_counter() - began < SETTLE_TIMEOUT:
        before = cpu_seconds(pid)
        time.sleep(window)
        if cpu_seconds(pid) - before < busy_below * window:
            break
    return time.perf_counter() - began - window


def edit_payload(image_url: str) -> dict[str, Any]:
    """The same small edit for every row (1K, so the prior's 17.5 s mean applies)."""
    return {"prompt": PROMPT, "image_urls": [image_url], "resolution": "1K"}


# -- one run of each variant -------------------------------------------------------------


@dataclass
class Run:
    """One batch: its wall time and where that time went."""

    variant: str
    rows: int
    wall: float
    ok: int
    head: float = math.nan  # call to first submit
    tail: float = math.nan  # last row done to return
    lag_mean: float = math.nan  # a job's end to the moment we knew (a, b)
    polls_per_job: float = math.nan
    gap: float = math.nan  # a slot's mean idle time between one job's end and the next submit
    drain: float = math.nan  # the Prefect server still busy after the flow returned
    cpu: dict[str, float] = field(default_factory=dict)
    # What one row cost in Prefect: API calls and events (`prefect_traffic`), flow only.
    prefect_per_row: dict[str, float] = field(default_factory=dict)


def _parse_time(value: str | None) -> float:
    return datetime.fromisoformat(value).timestamp() if value else math.nan


def _bare_http(base_url: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=4 * WORKERS, max_keepalive_connections=4 * WORKERS)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits)


async def floor_batch(base_url: str, image_url: str, rows: int) -> tuple[int, list[float]]:
    """The floor: submit every row up front, so the API's FIFO keeps all its workers busy
    and no per-job latency of ours is on the critical path; then collect the jobs in
    submit order (the order they end in), polling each every FLOOR_POLL_INTERVAL."""
    lags: list[float] = []
    async with _bare_http(base_url) as http:
        path = f"/v1/models/{NANO_BANANA_EDIT_MODEL_ID}"
        # One by one, so the FIFO order is the submit order (the first round starts at
        # once; the later submits are hidden behind it).
        answers = [await http.post(path, json=edit_payload(image_url)) for _ in range(rows)]
        ok = 0
        for answer in answers:
            request_id = answer.json()["request_id"]
            while (await http.get(f"/v1/requests/{request_id}/status")).json()["status"] in (
                "in_queue",
                "in_progress",
            ):
                await asyncio.sleep(FLOOR_POLL_INTERVAL)
            result = (await http.get(f"/v1/requests/{request_id}/result")).json()
            lags.append(time.time() - _parse_time(result.get("finished_at")))
            ok += result["status"] == "completed"
    return ok, lags


async def bare_batch(
    base_url: str, image_url: str, rows: int, lanes: int, interval: float
) -> tuple[int, list[float]]:
    """A naive loop like (b)'s: `lanes` in flight, each polling its job every `interval`."""
    gate = asyncio.Semaphore(lanes)
    lags: list[float] = []
    async with _bare_http(base_url) as http:

        async def one() -> bool:
            async with gate:
                payload = edit_payload(image_url)
                submitted = await http.post(f"/v1/models/{NANO_BANANA_EDIT_MODEL_ID}", json=payload)
                request_id = submitted.json()["request_id"]
                while True:
                    await asyncio.sleep(interval)
                    status = (await http.get(f"/v1/requests/{request_id}/status")).json()
                    if status["status"] not in ("in_queue", "in_progress"):
                        break
                result = (await http.get(f"/v1/requests/{request_id}/result")).json()
                lags.append(time.time() - _parse_time(result.get("finished_at")))
                return result["status"] == "completed"

        done = await asyncio.gather(*(one() for _ in range(rows)))
    return sum(done), lags


async def client_batch(image_url: str, rows: int) -> tuple[int, list[float]]:
    """Our client alone: submit_edit + wait per row, at most WORKERS in flight."""
    from prefect_nanobanana.client import AsyncRunComfyClient, NanoBananaEditInput

    gate = asyncio.Semaphore(WORKERS)
    lags: list[float] = []
    async with AsyncRunComfyClient() as client:

        async def one() -> bool:
            async with gate:
                handle = await client.submit_edit(NanoBananaEditInput(**edit_payload(image_url)))
                result = await client.wait(handle.request_id, resolution="1K")
            if result.finished_at is not None:
                lags.append(time.time() - result.finished_at.timestamp())
            return result.status == "completed"

        done = await asyncio.gather(*(one() for _ in range(rows)))
    return sum(done), lags


async def flow_batch(
    image_url: str, rows: int, archive: Path, limit_name: str, lanes: int = WORKERS
) -> tuple[Any, list[float]]:
    """The `batch_edit` flow; also when each row finished (from its progress hook)."""
    from prefect_nanobanana.flows import batch_edit
    from prefect_nanobanana.flows.batch import ROW_PROGRESS, BatchJob

    finished: list[float] = []
    token = ROW_PROGRESS.set(lambda done, total: finished.append(time.time()))
    try:
        result = await batch_edit(
            jobs=[
                BatchJob(prompt=PROMPT, images=[image_url], resolution="1K", id=f"row-{row}")
                for row in range(rows)
            ],
            archive_uri=str(archive),
            max_concurrency=lanes,
            concurrency_limit_name=limit_name,
        )
    finally:
        ROW_PROGRESS.reset(token)
    return result, finished


async def first_submit(base_url: str, request_ids: list[str]) -> float:
    """The wall-clock moment the earliest of these requests was created at the emulator."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers) as http:
        created = []
        for request_id in request_ids[: WORKERS * 2]:
            body = (await http.get(f"/v1/requests/{request_id}/result")).json()
            created.append(_parse_time(body.get("created_at")))
    return min(created)


def measure(
    variant: str,
    emulator: EmulatorProcess,
    image_url: str,
    rows: int,
    workdir: Path,
    server_pid: int | None,
) -> Run:
    """One run of a variant, timed from the call to its return, with CPU by process."""
    settle(server_pid)
    emulator.reset()
    pids = {"bench": None, "emulator": emulator.pid, "prefect server": server_pid}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items() if name == "bench" or pid}
    started_wall, started = time.time(), time.perf_counter()
    head = tail = math.nan
    lags: list[float] = []
    prefect_per_row: dict[str, float] = {}
    if variant == "floor":
        ok, lags = asyncio.run(floor_batch(emulator.base_url, image_url, rows))
    elif variant == "bare":
        ok, lags = asyncio.run(
            bare_batch(emulator.base_url, image_url, rows, WORKERS, BARE_POLL_INTERVAL)
        )
    elif variant == "client":
        ok, lags = asyncio.run(client_batch(image_url, rows))
    else:
        archive = Path(tempfile.mkdtemp(prefix="archive-", dir=workdir))
        with prefect_traffic() as traffic:
            result, finished = asyncio.run(
                flow_batch(image_url, rows, archive, "bench-batch-overhead")
            )
        prefect_per_row = per_row(traffic, rows)
        ok = result.archived
        ended_wall = started_wall + time.perf_counter() - started
        request_ids = [row.request_id for row in result.rows if row.request_id]
        head = asyncio.run(first_submit(emulator.base_url, request_ids)) - started_wall
        tail = ended_wall - finished[-1]
    wall = time.perf_counter() - started
    drain = settle(server_pid) if variant == "flow" else math.nan
    cpu = {name: cpu_seconds(pids[name]) - before for name, before in cpu_before.items()}
    calls = emulator.stats()["calls"]
    phase = wall - (0.0 if math.isnan(head) else head) - (0.0 if math.isnan(tail) else tail)
    return Run(
        variant=variant,
        rows=rows,
        wall=wall,
        ok=ok,
        head=head,
        tail=tail,
        lag_mean=statistics.fmean(lags) if lags else math.nan,
        polls_per_job=(calls["status"] + calls["result"]) / rows,
        gap=phase / math.ceil(rows / WORKERS) - emulator.duration,
        drain=drain,
        cpu=cpu,
        prefect_per_row=prefect_per_row,
    )


VARIANTS = {
    "floor": "(a) floor: all submitted",
    "bare": "(a') bare, 16 in flight",
    "client": "(b) AsyncRunComfyClient",
    "flow": "(c) batch_edit flow",
}


def run() -> Verdict:
    """Median of RUNS interleaved runs of each variant; print, verdict, JSON."""
    print_header(
        f"batch overhead: {ROWS} edits, {WORKERS} workers, D = {DURATION:g} s "
        f"(ideal {math.ceil(ROWS / WORKERS) * DURATION:g} s)"
    )
    ideal = math.ceil(ROWS / WORKERS) * DURATION
    scale = poll_time_scale(DURATION)
    began = time.perf_counter()
    runs: list[Run] = []
    with bench_stack(WORKERS, DURATION, "bench-batch-") as stack:
        emulator, image_url, workdir = stack.emulator, stack.image_url, stack.workdir
        server_pid = stack.server.pid
        for variant in VARIANTS:  # warm-up: imports, connection pools, flow registration
            measure(variant, emulator, image_url, WARMUP_ROWS, workdir, server_pid)
        for _ in range(RUNS):
            for variant in VARIANTS:
                runs.append(measure(variant, emulator, image_url, ROWS, workdir, server_pid))
                last = runs[-1]
                print(f"  {variant:6} {last.wall:6.2f} s  ({last.wall / ideal:.3f} x ideal)")
    rows: list[list[object]] = []
    medians: dict[str, float] = {}
    for variant, label in VARIANTS.items():
        mine = [run for run in runs if run.variant == variant]
        wall = statistics.median(run.wall for run in mine)
        medians[variant] = wall / ideal
        rows.append(
            [
                label,
                wall,
                wall / ideal,
                min(run.wall for run in mine) / ideal,
                max(run.wall for run in mine) / ideal,
                statistics.median(run.lag_mean for run in mine) * 1000,
                statistics.median(run.polls_per_job for run in mine),
                statistics.median(run.gap for run in mine) * 1000,
                statistics.median(run.head for run in mine),
                statistics.median(run.tail for run in mine),
                statistics.median(run.cpu.get("bench", math.nan) for run in mine),
                statistics.median(run.cpu.get("prefect server", math.nan) for run in mine),
                statistics.median(run.drain for run in mine),
                f"{min(run.ok for run in mine)}/{ROWS}",
            ]
        )
    print(
        f"median of {RUNS} runs each, interleaved, after one {WARMUP_ROWS}-row warm-up of each; "
        f"RUNCOMFY_POLL_TIME_SCALE={scale:.4f} (D / 17.5 s); bare polls every "
        f"{BARE_POLL_INTERVAL * 1000:g} ms, the floor every {FLOOR_POLL_INTERVAL * 1000:g} ms"
    )
    print(
        table(
            [
                "variant",
                "wall s",
                "x ideal",
                "min x",
                "max x",
                "lag ms",
                "polls/job",
                "gap ms",
                "head s",
                "tail s",
                "CPU bench s",
                "CPU server s",
                "drain s",
                "ok",
            ],
            rows,
        )
    )
    client, flow_ratio = medians["client"], medians["flow"]
    # The flow's goal holds for every run, not only the median: a user sees one run.
    flow_runs = [run.wall / ideal for run in runs if run.variant == "flow"]
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"flow runs x ideal: {', '.join(f'{ratio:.3f}' for ratio in flow_runs)}; load {load}")
    flow_traffic = _median_traffic([run.prefect_per_row for run in runs if run.variant == "flow"])
    print(f"Prefect per row (flow, median): {_traffic_line(flow_traffic)}")
    lost = [run for run in runs if run.ok != ROWS]
    met = client <= CLIENT_GOAL and max(flow_runs) <= FLOW_GOAL and not lost
    detail = (
        f"client {client:.3f} x ideal (goal <= {CLIENT_GOAL}), flow {flow_ratio:.3f} x ideal, "
        f"worst of {len(flow_runs)} {max(flow_runs):.3f} (goal <= {FLOW_GOAL} in every run); "
        f"floor {medians['floor']:.3f}, bare 16 in flight {medians['bare']:.3f}"
        + (f"; {len(lost)} runs lost rows" if lost else "")
    )
    verdict = Verdict("batch_overhead", met, detail)
    write_results(
        "batch_overhead",
        {
            "rows": ROWS,
            "workers": WORKERS,
            "duration_seconds": DURATION,
            "ideal_seconds": ideal,
            "poll_time_scale": scale,
            "bare_poll_interval_seconds": BARE_POLL_INTERVAL,
            "floor_poll_interval_seconds": FLOOR_POLL_INTERVAL,
            "runs_per_variant": RUNS,
            "flow_runs_x_ideal": flow_runs,
            "load_average": load,
            "median_x_ideal": medians,
            "prefect_per_row": flow_traffic,
            "goals": {"client": CLIENT_GOAL, "flow": FLOW_GOAL},
            "runs": [asdict(run) for run in runs],
            "benchmark_seconds": time.perf_counter() - began,
            "verdict": asdict(verdict),
        },
    )
    print(verdict.line())
    return verdict


def _median_traffic(per_rows: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({name for per_row in per_rows for name in per_row})
    return {
        name: statistics.median(per_row.get(name, 0.0) for per_row in per_rows) for name in names
    }


def _traffic_line(traffic: dict[str, float]) -> str:
    kinds = ", ".join(
        f"{name.removeprefix('events:')} {value:g}"
        for name, value in traffic.items()
        if name.startswith("events:")
    )
    return f"{traffic.get('api', 0):g} API calls, {traffic.get('events', 0):g} events ({kinds})"


# Leaf frames of a thread that waits rather than works (py-spy's idle filter misses some).
_IDLE_LEAVES = ("Condition.wait", "EpollSelector.select", "_PollLikeSelector.select", "sleep")
# Frames every sample of a process passes through: entry points, not where time goes.
_WRAPPER_FILES = ("asyncio/", "runpy", "click/", "uvicorn/", "socketserver", "bench/batch_")
PROFILE_RATE = 100  # samples per second
PROFILE_TOP = 30


def summarize_profile(raw: Path, top: int = PROFILE_TOP) -> str:
    """CPU seconds by process, and each process's busiest functions (inclusive).

    `raw` is py-spy's collapsed-stack output: one `frame;frame;... count` per line,
    the first frames naming the process and thread.
    """
    by_process: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        process = [frame for frame in frames if frame.startswith("process ")][-1]
        name = process.split('"')[1].split(" --")[0][:60] if '"' in process else process
        code = [
            re.sub(r":\d+\)", ")", f) for f in frames if not f.startswith(("process ", "thread "))
        ]
        if not code or code[-1].startswith(_IDLE_LEAVES):
            continue
        by_process[name] += int(count)
        counter = inclusive.setdefault(name, Counter())
        for frame in set(code):
            counter[frame] += int(count)
    lines = ["busy thread-seconds by process (samples / rate; threads in C code count too):"]
    lines += [f"  {n / PROFILE_RATE:7.1f}  {name}" for name, n in by_process.most_common()]
    for name, counter in inclusive.items():
        lines.append(f"\nbusiest functions of {name} (inclusive busy thread-seconds):")
        useful = [
            (frame, n)
            for frame, n in counter.most_common()
            if not frame.startswith(("Thread.", "_run_module", "_run_code", "<module>"))
            and not any(part in frame for part in _WRAPPER_FILES)
        ]
        lines += [f"  {n / PROFILE_RATE:7.2f}  {frame}" for frame, n in useful[:top]]
    return "\n".join(lines)


def profile() -> None:
    """One run of (c) sampled by py-spy across the bench, emulator and server processes.

    py-spy (`pip install py-spy`, not a dependency; needs ptrace rights) sees every
    thread and subprocess, which is where (c)'s time goes: threads that create SSL
    contexts without the GIL, and the Prefect server writing the run's events.
    """
    from ._common import RESULTS_DIR

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    RESULTS_DIR.mkdir(exist_ok=True)
    raw = Path(tempfile.mkdtemp(prefix="bench-profile-")) / "profile.raw"  # ~10 MB
    with bench_stack(WORKERS, DURATION, "bench-batch-") as stack:
        emulator, image_url, workdir = stack.emulator, stack.image_url, stack.workdir
        server_pid = stack.server.pid
        measure("flow", emulator, image_url, WARMUP_ROWS, workdir, server_pid)
        settle(server_pid)
        command = [spy, "record", "--pid", str(os.getpid()), "--subprocesses", "--nonblocking"]
        command += ["--rate", str(PROFILE_RATE), "--format", "raw", "-o", str(raw)]
        sampler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2.0)  # attach before the run starts
        run_ = measure("flow", emulator, image_url, ROWS, workdir, server_pid)
        sampler.send_signal(signal.SIGINT)
        sampler.wait(timeout=60)
    report = summarize_profile(raw)
    ideal = math.ceil(ROWS / WORKERS) * DURATION
    header = (
        f"profiled run of (c): {run_.wall:.2f} s ({run_.wall / ideal:.3f} x ideal),"
        f" {run_.ok}/{ROWS} archived, server drained {run_.drain:.1f} s later, "
        f"CPU s {run_.cpu} (sampling adds its own load)"
    )
    (RESULTS_DIR / "batch_overhead_profile.txt").write_text(header + "\n\n" + report + "\n")
    print(header)
    print(report)


def main() -> None:
    """`python -m bench.batch_overhead [--profile]`."""
    if "--profile" in sys.argv[1:]:
        profile()
    else:
        run()


if __name__ == "__main__":
    main()
