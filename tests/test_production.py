"""The production shape: a PostgreSQL-backed Prefect server, three workers, one of them dying.

What a data team runs once it outgrows one laptop, on loopback: Debian's PostgreSQL
(an unprivileged cluster in a temp dir), `prefect server start` on it, three
`prefect worker start` processes on the process pool, deployments/prefect.yaml
deployed and deployments/crash-zombie-flow-runs.yaml as the automation that marks
a dead machine's flow runs Crashed. The `nightly-batch` deployment runs 300 short
rows in chunks of 50; mid-chunk, one worker is SIGKILLed with its flow runs, at the
moment one of its rows has been accepted (and billed) by the API but the answer
has not come back: a loopback proxy in front of the emulator holds that answer.

Marked `production` (3-6 minutes): `.ci/run` runs it, `-m 'not production'`
leaves it out locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest

from prefect_nanobanana.emulator import EmulatorConfig, EmulatorServer
from tests.fixtures.postgres import running_postgres
from tests.fixtures.prefect_stack import (
    NIGHTLY,
    REPO,
    Stack,
    archived_metadata,
    prefect_command,
    running_stack,
    write_manifest,
)

# Minutes on a busy machine: more than the suite's 300 s per test.
pytestmark = [pytest.mark.production, pytest.mark.timeout(900)]

WORKERS = ("worker-a", "worker-b", "worker-c")
TOKEN = "production-test-token"
TIME_SCALE = 0.01  # 1K jobs of about 0.2 s
ROWS = 300
CHUNK_SIZE = 50
LANES = 4  # per chunk; the shared limit below lets all six chunks run at once
LIMIT_NAME = "runcomfy-production-test"
WORKER_LABEL = "prefect.worker.name"
AUTOMATION = "deployments/crash-zombie-flow-runs.yaml"
BATCH_SECONDS = 420
# Until the test has picked the chunk to kill, a chunk's submits from its GATE_AT-th
# row on wait at the proxy, unsent and unpaid: on a fast machine (a CI run) every
# chunk ended before the test, reading the server every 0.1 s, saw one mid-way. The
# wait is bounded under the client's 30 s read timeout, past which a gated submit
# would end "outcome unknown".
GATE_AT = 10
GATE_SECONDS = 15


class _HoldingProxy(ThreadingHTTPServer):
    """Forwards every call to the emulator; can hold the answer of one accepted submit.

    Until it is armed, submits of a chunk's rows from GATE_AT on wait at its gate
    (for GATE_SECONDS at most), so every chunk pauses mid-way. Armed with a set of
    prompts, the first submit of one of them goes through to the emulator (which
    accepts and bills it), and its answer is then never sent: to the client, the
    machine died mid-submit. The arming's `on_hold` runs right then, in the proxy's
    thread, so the machine dies before the chunk's other lanes can move on (a kill
    from the test's thread came seconds later on a loaded machine, and the other
    lanes had finished the chunk by then).
    """

    daemon_threads = True
    # Three workers' lanes open a connection a call (HTTP/1.0): the default backlog of 5
    # overflows on a loaded machine, and a client whose connection the kernel then
    # resets after it sent a submit sees an ambiguous ReadError (a CI run: one row of
    # a chunk nobody killed ended "outcome unknown").
    request_queue_size = 256

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        self.http = httpx.Client(base_url=upstream, timeout=60)
        self.lock = threading.Lock()
        self.hold_prompts: set[str] = set()
        self.on_hold: Callable[[], None] = lambda: None
        self.held: dict[str, str] = {}  # prompt -> request id the client never saw
        self.holding = threading.Event()
        self.gate_open = threading.Event()
        self.gate_closes_at: float | None = None
        self.release = threading.Event()
        self.submitted: Counter[str] = Counter()  # submits seen, by prompt
        self.errors: list[str] = []  # calls it failed to answer, but for the killed worker's

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The killed worker's connections are reset: the test's point, not news.
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError):
            self.errors.append(f"{type(error).__name__}: {error}")
            super().handle_error(request, client_address)

    def arm(self, prompts: set[str], on_hold: Callable[[], None]) -> None:
        with self.lock:
            self.hold_prompts = set(prompts)
            self.on_hold = on_hold
        self.gate_open.set()

    def wait_at_gate(self, prompt: str | None) -> None:
        if prompt is None or self.gate_open.is_set() or _row_in_chunk(prompt) < GATE_AT:
            return
        with self.lock:
            if self.gate_closes_at is None:
                self.gate_closes_at = time.monotonic() + GATE_SECONDS
            seconds_left = self.gate_closes_at - time.monotonic()
        self.gate_open.wait(max(0.0, seconds_left))

    def should_hold(self, prompt: str | None) -> str | None:
        if prompt is None:
            return None
        with self.lock:
            self.submitted[prompt] += 1
            if prompt in self.hold_prompts:
                self.hold_prompts = set()
                return prompt
        return None


def _prompt_of(body: bytes) -> str | None:
    try:
        prompt = json.loads(body).get("prompt")
    except (ValueError, AttributeError):
        return None
    return prompt if isinstance(prompt, str) else None


def _row_in_chunk(prompt: str) -> int:
    """0 for a chunk's first row: write_manifest's prompts are `{prefix} {i}`."""
    number = prompt.rpartition(" ")[2]
    return int(number) % CHUNK_SIZE if number.isdigit() else 0


class _ProxyHandler(BaseHTTPRequestHandler):
    server: _HoldingProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._forward("GET")

    def do_POST(self) -> None:
        self._forward("POST")

    def _forward(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        held = None
        if method == "POST":
            prompt = _prompt_of(body)
            self.server.wait_at_gate(prompt)
            held = self.server.should_hold(prompt)
        headers = {
            name: value
            for name, value in self.headers.items()
            if name.lower() in ("authorization", "content-type", "accept")
        }
        answer = self.server.http.request(method, self.path, content=body, headers=headers)
        if held is not None:
            self.server.held[held] = answer.json().get("request_id", "")
            try:
                self.server.on_hold()
            finally:
                self.server.holding.set()
            self.server.release.wait(600)
            self.close_connection = True
            return
        self.send_response(answer.status_code)
        for name in ("Content-Type", "Retry-After"):
            if name in answer.headers:
                self.send_header(name, answer.headers[name])
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)


@dataclass
class Production:
    stack: Stack
    proxy: _HoldingProxy
    figures: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Production]:
    root = tmp_path_factory.mktemp("production")
    with contextlib.ExitStack() as stack_of:
        database_url = stack_of.enter_context(running_postgres())
        emulator = stack_of.enter_context(
            EmulatorServer(
                EmulatorConfig(api_tokens=(TOKEN,), workers=24, time_scale=TIME_SCALE, seed=15)
            )
        )
        proxy = _HoldingProxy(emulator.base_url)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        stack_of.callback(proxy.server_close)
        stack_of.callback(proxy.shutdown)
        stack_of.callback(proxy.release.set)
        stack_of.callback(proxy.gate_open.set)
        stack = stack_of.enter_context(
            running_stack(
                root,
                emulator,
                WORKERS,
                worker_limit=3,
                api_base_url=proxy.base_url,
                extra_env={
                    # The API is reached through the proxy; its outputs are served by the
                    # emulator itself, which must therefore be an allowed output host.
                    "RUNCOMFY_OUTPUT_HOSTS": httpx.URL(emulator.base_url).netloc.decode(),
                    "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url,
                },
            )
        )
        created = subprocess.run(
            prefect_command("automation", "create", "--from-file", AUTOMATION),
            env=stack.env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert created.returncode == 0 and "Failed" not in created.stdout, created.stdout
        yield Production(stack, proxy)


def _flow_runs(**filters: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(**filters), limit=200)


def _unfinished_on(worker: str) -> list[Any]:
    """The flow runs a worker was given that are Pending or Running."""
    return [
        run
        for run in _flow_runs()
        if run.labels.get(WORKER_LABEL) == worker
        and run.state
        and (run.state.is_running() or run.state.is_pending())
    ]


def _children(parent_id: UUID) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilterParentFlowRunId

    return _flow_runs(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))


def _read_flow_run(flow_run_id: UUID) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _wait_final(flow_run_id: UUID, stack: Stack, seconds: float = BATCH_SECONDS) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        flow_run = _read_flow_run(flow_run_id)
        if flow_run.state and flow_run.state.is_final():
            return flow_run
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} not final after {seconds} s\n{stack.log_tail()}")


def _wait_crashed(flow_run_id: UUID, stack: Stack, seconds: float = 150) -> Any:
    """The flow run's Crashed state, once it has one."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = _read_flow_run(flow_run_id).state
        if state and state.is_crashed():
            return state
        assert state is None or not state.is_final(), state
        time.sleep(1)
    raise AssertionError(f"{flow_run_id} not Crashed after {seconds} s\n{stack.log_tail()}")


def _processes_of(worker_pid: int, flow_run_ids: set[str]) -> set[int]:
    """The worker's descendants, and every process running one of these flow runs.

    A flow run's process may sit in a session of its own, and the pid Prefect
    records may be a launcher's; its environment names the flow run either way.
    """
    parents: dict[int, int] = {}
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            parents[int(entry.name)] = int(
                (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            )
            environ = (entry / "environ").read_bytes().split(b"\0")
            if any(
                line.decode(errors="replace").partition("=")[2] in flow_run_ids
                for line in environ
                if line.startswith(b"PREFECT__FLOW_RUN_ID=")
            ):
                found.add(int(entry.name))
    frontier = {worker_pid}
    while frontier:
        children = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= children
        frontier = children
    return found - {os.getpid()}


# A flow run that sleeps, started outside any worker. `just-started` is one of ours
# on the doomed machine that has sent no heartbeat yet (killed in its first second,
# its first beat would still be in the client's event queue): its heartbeats are
# switched off, so it never sends one, whenever the kill comes. `elsewhere` is a
# run of another team's, untagged, beating at Prefect's default of every 180 s.
_SLEEPING_RUN = """
import sys, time
from prefect import flow, tags
from prefect.flow_engine import BaseFlowRunEngine

name, tag, beats = sys.argv[1:]
if beats == "off":
    BaseFlowRunEngine.heartbeat_seconds = property(lambda self: None)

@flow(name=name, flow_run_name=name)
def sleeping() -> None:
    time.sleep(600)

with tags(*filter(None, [tag])):
    sleeping()
"""


def _start_sleeping_run(stack: Stack, name: str, *, tag: str, beats: str) -> subprocess.Popen:
    log = stack.archive.parent / f"{name}.log"
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", _SLEEPING_RUN, name, tag, beats],
            env=stack.env,
            cwd=REPO,
            stdout=out,
            stderr=out,
        )


def _once_running(name: str, stack: Stack) -> Any:
    """The flow run of that name, once it runs."""
    from prefect.client.schemas.filters import FlowRunFilterName

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for run in _flow_runs(name=FlowRunFilterName(any_=[name])):
            if run.state and run.state.is_running():
                return run
        time.sleep(0.5)
    log = stack.archive.parent / f"{name}.log"
    raise AssertionError(f"the {name} run never ran\n{log.read_text()}")


def _pending_for_ever() -> Any:
    """A flow run of ours left Pending, as when its machine dies while its process starts."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Pending

    @flow(name="never-started")
    def never_started() -> None: ...

    with get_client(sync_client=True) as client:
        return client.create_flow_run(
            never_started, name="never-started", tags=["nanobanana"], state=Pending()
        )


def _kill_worker(
    stack: Stack, name: str, flow_run_ids: set[str], *others: subprocess.Popen
) -> None:
    """SIGKILL a worker, its flow runs' processes and `others`: its machine died."""
    worker = stack.workers[name]
    doomed = _processes_of(worker.pid, flow_run_ids) | {process.pid for process in others}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    worker.wait(10)


def _rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _task_runs(flow_run_id: UUID) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200
        )


def _wait_record_complete(flow_run: Any, archived: int, seconds: float = 60) -> list[Any]:
    """The server has every `row-N` task run of the flow run, each in a final state.

    The server writes task runs from events, a little after the flow run ended.
    """
    deadline = time.monotonic() + seconds
    rows: list[Any] = []
    while time.monotonic() < deadline:
        rows = [run for run in _task_runs(flow_run.id) if run.name.startswith("row-")]
        completed = [run for run in rows if run.state and run.state.is_completed()]
        if len(completed) >= archived and all(run.state and run.state.is_final() for run in rows):
            return rows
        time.sleep(1)
    return rows


def test_a_worker_dies_mid_chunk_and_a_rerun_finishes_its_rows(
    production: Production, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.deployments import run_deployment

    stack, proxy, emulator = production.stack, production.proxy, production.stack.emulator
    manifest = write_manifest(stack.archive.parent / "production.jsonl", ROWS, "prod")
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=LIMIT_NAME, limit=LANES * ROWS // CHUNK_SIZE)
        )
    parameters = {
        "manifest_uri": str(manifest),
        "chunk_size": CHUNK_SIZE,
        "max_concurrency": LANES,
        "concurrency_limit_name": LIMIT_NAME,
    }
    results = stack.archive / "_results"
    never_started = _pending_for_ever()
    just_started = _start_sleeping_run(stack, "just-started", tag="nanobanana", beats="off")
    request.addfinalizer(just_started.kill)
    elsewhere = _start_sleeping_run(stack, "elsewhere", tag="", beats="default")
    request.addfinalizer(elsewhere.kill)
    just_started_run, elsewhere_run = (
        _once_running(name, stack) for name in ("just-started", "elsewhere")
    )
    elsewhere_since = time.monotonic()

    submits_before = emulator.stats.submits_accepted
    began = time.monotonic()

    # From sync code, run_deployment runs as a plain call (Prefect's async_dispatch).
    first = run_deployment(
        NIGHTLY,
        parameters={**parameters, "results_uri": str(results / "first.jsonl")},
        timeout=0,
        as_subflow=False,
    )

    # Mid-chunk: a chunk with rows submitted and rows to go, on a worker not running the parent.
    deadline = time.monotonic() + BATCH_SECONDS
    target, victim, to_go = None, "", set()
    seen: list[tuple[str, str | None, str | None, int]] = []  # what the last look saw
    while target is None and time.monotonic() < deadline:
        parent_worker = _read_flow_run(first.id).labels.get(WORKER_LABEL)
        children = _children(first.id)
        seen = []
        for child in children:
            worker = child.labels.get(WORKER_LABEL)
            prompts = {job["prompt"] for job in child.parameters["jobs"]}
            to_go = prompts - set(proxy.submitted)
            state_name = child.state.name if child.state else None
            seen.append((child.name, worker, state_name, len(prompts) - len(to_go)))
            if (
                parent_worker
                and worker not in (None, parent_worker)
                and child.state
                and child.state.is_running()
                and len(prompts) - len(to_go) >= 5
                and len(to_go) >= 15
            ):
                target, victim = child, worker
                # The chunks there now; any that starts there later is the worker's child.
                there = {str(run.id) for run in children if run.labels.get(WORKER_LABEL) == worker}
                kill = functools.partial(_kill_worker, stack, worker, there, just_started)
                proxy.arm(to_go, on_hold=kill)
                break
        if children and all(child.state and child.state.is_final() for child in children):
            break  # every chunk ended before one was caught mid-way
        time.sleep(0.1)
    assert target is not None, (
        f"no chunk caught mid-way; parent on {parent_worker}; chunks (name, worker, state,"
        f" submitted): {seen}\n{stack.log_tail()}"
    )
    assert proxy.holding.wait(60), f"the chunk made no further submit\n{stack.log_tail()}"
    killed_at = time.monotonic()
    # Killed, so still Running (or Pending) until an automation marks them Crashed.
    killed_runs = _unfinished_on(victim)
    ((held_prompt, held_request),) = proxy.held.items()

    first = _wait_final(first.id, stack)
    crashed_seconds = time.monotonic() - killed_at
    assert first.state.is_failed(), (first.state, stack.log_tail())
    for run in killed_runs:
        assert _read_flow_run(run.id).state.is_crashed(), (run.name, stack.log_tail())
    # Before its first heartbeat: marked Crashed too (crash-zombie-flow-runs.yaml's second
    # automation), or a chunk killed in its first second would keep its parent waiting.
    crashed_silent = _wait_crashed(just_started_run.id, stack)
    assert "within 90 s of starting" in (crashed_silent.message or ""), crashed_silent
    seconds_to_crashed_silent = (
        crashed_silent.timestamp - just_started_run.start_time
    ).total_seconds()
    first_rows = _rows_of(results / "first.jsonl")
    killed_jobs = {job["id"] for job in target.parameters["jobs"]}
    failed_first = {row["id"] for row in first_rows if row["status"] == "failed"}
    assert failed_first and failed_first <= killed_jobs | {
        job["id"] for run in killed_runs for job in run.parameters.get("jobs", [])
    }, proxy.errors

    # The operator reruns the night's batch (allow_partial: the unknown row stays reported).
    rerun = run_deployment(
        NIGHTLY,
        parameters={
            **parameters,
            "results_uri": str(results / "rerun.jsonl"),
            "allow_partial": True,
        },
        timeout=BATCH_SECONDS,
        as_subflow=False,
    )
    assert rerun.state.is_completed(), (rerun.state, stack.log_tail())
    wall = time.monotonic() - began
    rerun_rows = _rows_of(results / "rerun.jsonl")
    by_status: dict[str, list[dict[str, Any]]] = {}
    for row in rerun_rows:
        by_status.setdefault(row["status"], []).append(row)

    # Rows that died mid-submit (the held one, and any other lane caught between its
    # claim and recording the request id): reported as outcome unknown, never sent again.
    unknown = by_status.get("failed", [])
    assert all("NOT submitted again" in row["error"] for row in unknown), unknown
    unknown_prompts = {row["prompt"] for row in unknown}
    assert held_prompt in unknown_prompts
    # Nothing was sent twice, and every other row was archived exactly once over both runs.
    assert max(proxy.submitted.values()) == 1
    metadata = archived_metadata(stack.archive)
    archived_ids = sorted(m["row_id"] for m in metadata if m["row_id"].startswith("prod-"))
    expected = sorted(f"prod-{i}" for i in range(ROWS) if f"prod {i}" not in unknown_prompts)
    assert archived_ids == expected
    assert held_request not in {m["request_id"] for m in metadata}
    # Paid once per row, but for an unknown row whose submit never reached the API.
    paid = emulator.stats.submits_accepted - submits_before
    never_sent = unknown_prompts - set(proxy.submitted)
    assert paid == len(proxy.submitted) == ROWS - len(never_sent)
    # The killed chunks' rows were finished by the rerun (archived, or adopted there).
    finished_by_rerun = {
        row["id"] for status in ("archived", "adopted") for row in by_status.get(status, [])
    }
    assert finished_by_rerun and finished_by_rerun <= failed_first

    # Prefect's record: every flow run final, a Completed `row-N` task run per row that ran.
    record_gaps = []
    task_runs_recorded = 0
    for parent_run in (first, rerun):
        for child in _children(parent_run.id):
            state = _read_flow_run(child.id).state
            assert state and state.is_final(), (child.name, state)
            if state.is_crashed():
                continue
            chunk_rows = _rows_of(Path(child.parameters["results_uri"]))
            # A row that ran (archived, or adopted: it waited on a recorded request) has a task run.
            archived = sum(row["status"] in ("archived", "adopted") for row in chunk_rows)
            recorded = _wait_record_complete(child, archived)
            task_runs_recorded += len(recorded)
            if sum(run.state.is_completed() for run in recorded) != archived:
                record_gaps.append((child.name, archived, len(recorded)))
    assert not record_gaps, record_gaps

    # Its machine died before its process began the flow: Crashed by the third automation.
    crashed_pending = _wait_crashed(never_started.id, stack, seconds=420)
    assert "Pending for 300 s" in (crashed_pending.message or ""), crashed_pending
    seconds_pending = (crashed_pending.timestamp - never_started.state.timestamp).total_seconds()

    # Alive all along, beating every 180 s (Prefect's default), and not ours: not called
    # dead, though the automations' window (90 s) passed since its first beat.
    assert time.monotonic() - elsewhere_since > 120
    elsewhere_state = _read_flow_run(elsewhere_run.id).state
    assert elsewhere_state and elsewhere_state.is_running(), elsewhere_state

    production.figures.update(
        rows=ROWS,
        chunks=ROWS // CHUNK_SIZE,
        paid_submits=paid,
        archived_once=len(archived_ids),
        outcome_unknown=len(unknown),
        outcome_unknown_never_sent=len(never_sent),
        killed_worker=victim,
        killed_flow_runs=[run.name for run in killed_runs],
        failed_in_first_run=len(failed_first),
        finished_by_rerun=len(finished_by_rerun),
        seconds_to_crashed=round(crashed_seconds, 1),
        seconds_running_to_crashed_without_heartbeat=round(seconds_to_crashed_silent, 1),
        seconds_pending_to_crashed=round(seconds_pending, 1),
        row_task_runs_recorded=task_runs_recorded,
        wall_seconds=round(wall, 1),
    )
    with capsys.disabled():  # the figures reach CI's output, captured or not
        print("\nproduction shape:", json.dumps(production.figures))


def test_concurrent_submits_in_one_run_keep_every_label(
    production: Production,
    image_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Prefect's server reads a flow run's labels, merges, writes: on PostgreSQL two
    label writes at once can lose one. Every request id must survive in the labels,
    where the run's cancellation hook looks for them."""
    from prefect import flow

    from prefect_nanobanana.tasks import asubmit_edit, recorded_request_ids

    emulator = production.stack.emulator
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    monkeypatch.setenv("RUNCOMFY_BASE_URL", emulator.base_url)
    image = image_server.url_for("wide.png")
    submits = 16

    @flow
    async def submit_many() -> tuple[str, list[str]]:
        from prefect.context import FlowRunContext

        handles = await asyncio.gather(
            *(
                asubmit_edit({"prompt": f"label race {i}", "image_urls": [image]}, job_key=f"l{i}")
                for i in range(submits)
            )
        )
        context = FlowRunContext.get()
        assert context and context.flow_run
        return str(context.flow_run.id), [handle.request_id for handle in handles]

    flow_run_id, request_ids = asyncio.run(submit_many())

    labels = _read_flow_run(UUID(flow_run_id)).labels
    assert len(set(request_ids)) == submits
    kept = recorded_request_ids(labels)
    production.figures["labels_kept"] = f"{len(set(kept) & set(request_ids))} of {submits}"
    with capsys.disabled():
        print("\nlabels kept on PostgreSQL:", production.figures["labels_kept"])
    assert sorted(kept) == sorted(request_ids)
