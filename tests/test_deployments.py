"""deployments/prefect.yaml deployed and run for real, as an operator would.

`prefect server start` on loopback (SQLite in a temporary PREFECT_HOME), the
process work pool made with `prefect work-pool create`, two `prefect worker start`
processes and `prefect --no-prompt deploy --all` from the repository root. The
emulator and a loopback staging store run in this process; the workers (and so
their flow runs) find them through the environment, as a deployment finds the
real API. Starting all this takes ~15 s, so the module's tests share one stack.

The workers take one flow run at a time (`--limit 1`), so two chunks started
together must land on both workers: that is how the scale-out test sees them shared.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from PIL import Image

from prefect_nanobanana.emulator import EmulatorConfig, EmulatorServer
from prefect_nanobanana.storage import LoopbackObjectStore

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = "deployments/prefect.yaml"
POOL = "nanobanana-process"
WORKERS = ("worker-a", "worker-b")
SINGLE_EDIT = "nano-banana-edit-and-archive/single-edit"
NIGHTLY = "nano-banana-batch/nightly-batch"
CHUNK = "nano-banana-batch/chunk"
TOKEN = "deploy-test-token"
TIME_SCALE = 0.005
STARTUP_SECONDS = 90
RUN_SECONDS = 120


@dataclass
class Stack:
    """A running Prefect server, two workers on the process pool, the emulator and a store."""

    api_url: str
    emulator: EmulatorServer
    store: LoopbackObjectStore
    images: Path
    archive: Path
    manifest: Path
    env: dict[str, str]
    logs: dict[str, Path] = field(default_factory=dict)

    def log_tail(self, lines: int = 60) -> str:
        """The end of every process's log: what a failed assertion shows."""
        parts = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            parts.append(f"----- {name} -----\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _prefect(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("prefect")), *args]


def _spawn(command: list[str], env: dict[str, str], log: IO[bytes], cwd: Path) -> subprocess.Popen:
    # A session (so a process group) of its own: teardown kills it with its flow runs.
    return subprocess.Popen(
        command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (a worker stops its flow runs), then SIGKILL to what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(5)


def _wait_healthy(api_url: str, server: subprocess.Popen, stack: Stack) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited early\n{stack.log_tail()}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"prefect server not healthy after {STARTUP_SECONDS} s\n{stack.log_tail()}")


def _wait_workers_online(stack: Stack) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + STARTUP_SECONDS
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            online = {
                worker.name
                for worker in client.read_workers_for_work_pool(POOL)
                if worker.status == "ONLINE"
            }
            if online >= set(WORKERS):
                return
            time.sleep(0.2)
    raise RuntimeError(f"workers not online after {STARTUP_SECONDS} s\n{stack.log_tail()}")


def _draw_images(folder: Path) -> Path:
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "a.png")
    Image.new("RGB", (32, 32), (30, 200, 30)).save(folder / "b.jpg", quality=80)
    Image.new("RGB", (40, 30), (30, 30, 200)).save(folder / "c.webp")
    return folder


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Server, pool, two workers and the three deployments, for the whole module."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("deployments")
    images = _draw_images(root / "images")
    manifest = root / "nightly.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"id": f"night-{i}", "prompt": f"night {i}", "images": [name]}) + "\n"
            for i, name in enumerate(["images/a.png", "images/b.jpg", "images/c.webp"])
        )
    )
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    emulator = EmulatorServer(
        EmulatorConfig(api_tokens=(TOKEN,), workers=8, time_scale=TIME_SCALE, seed=3)
    ).start()
    store = LoopbackObjectStore(root / "store", upload_token="deploy-test-upload").start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_UI_ENABLED": "false",
        # No run of the nightly schedule may appear mid-test (the test checks the schedule).
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "PREFECT_LOCAL_STORAGE_PATH": str(root / "prefect-results"),
        # What the flow runs inherit from their worker: the API, and where to stage.
        "RUNCOMFY_API_TOKEN": TOKEN,
        "RUNCOMFY_BASE_URL": emulator.base_url,
        "RUNCOMFY_POLL_TIME_SCALE": str(TIME_SCALE),
        "NANOBANANA_STAGING_TOKEN": store.upload_token,
        # Read by `prefect deploy`: the deployments' default parameters.
        "NANOBANANA_ARCHIVE_URI": str(root / "archive"),
        "NANOBANANA_STAGING_URI": store.base_url,
        "NANOBANANA_NIGHTLY_MANIFEST_URI": str(manifest),
    }
    stack = Stack(api_url, emulator, store, images, root / "archive", manifest, env)
    processes: list[subprocess.Popen] = []
    handles: list[IO[bytes]] = []

    def start(name: str, command: list[str]) -> subprocess.Popen:
        stack.logs[name] = root / f"{name}.log"
        handles.append(stack.logs[name].open("wb"))
        processes.append(_spawn(command, env, handles[-1], cwd=root))
        return processes[-1]

    try:
        server = start(
            "server", _prefect("server", "start", "--host", "127.0.0.1", "--port", str(port))
        )
        _wait_healthy(api_url, server, stack)
        subprocess.run(
            _prefect("work-pool", "create", POOL, "--type", "process"),
            env=env,
            cwd=root,
            check=True,
            capture_output=True,
        )
        for name in WORKERS:
            start(name, _prefect("worker", "start", "--pool", POOL, "--name", name, "--limit", "1"))
        deploy = subprocess.run(
            _prefect("--no-prompt", "deploy", "--all", "--prefect-file", PREFECT_FILE),
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        with temporary_settings({PREFECT_API_URL: api_url}):
            _wait_workers_online(stack)
            try:
                yield stack
            finally:
                # Logs and events of runs made in this process go out before the server stops.
                APILogWorker.drain_all(timeout=10)
                EventsWorker.drain_all(timeout=10)
    finally:
        for process in reversed(processes):
            _stop(process)
        for handle in handles:
            handle.close()
        store.stop()
        emulator.stop()


def _deployment(name: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def _metadata(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(folder.rglob("metadata.json"))]


def test_deployments_carry_the_schedule_form_and_pull_step(stack: Stack) -> None:
    nightly = _deployment(NIGHTLY)
    (schedule,) = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "UTC")
    assert schedule.active
    assert nightly.parameters == {
        "manifest_uri": str(stack.manifest),
        "archive_uri": str(stack.archive),
        "staging_uri": stack.store.base_url,
        "max_concurrency": 8,
        "allow_partial": False,
        "chunk_size": 500,
        "chunk_deployment": CHUNK,
    }
    single = _deployment(SINGLE_EDIT)
    assert single.schedules == []
    form = single.parameter_openapi_schema
    assert form["required"] == ["prompt", "images"]
    assert form["properties"]["prompt"]["type"] == "string"
    assert form["properties"]["images"]["type"] == "array"
    assert form["properties"]["images"]["items"] == {"type": "string"}
    for name, choices in {
        "aspect_ratio": {"auto", "16:9", "1:1", "9:16"},
        "resolution": {"1K", "2K", "4K"},
        "output_format": {"jpeg", "png", "webp"},
    }.items():
        assert choices <= set(form["properties"][name]["enum"]), name
    chunk = _deployment(CHUNK)
    assert chunk.work_queue_name == "chunks" and chunk.schedules == []
    for deployment in (nightly, single, chunk):
        assert deployment.work_pool_name == POOL
        # The clone's own path, recorded when deploying: no machine's path in the file.
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]


async def test_single_edit_deployment_runs_on_a_worker(stack: Stack) -> None:
    from prefect.deployments import run_deployment

    submits_before = stack.emulator.stats.submits_accepted
    flow_run = await run_deployment(
        SINGLE_EDIT,
        parameters={
            "prompt": "make it look like a watercolour",
            "images": [str(stack.images / "a.png"), str(stack.images / "b.jpg")],
            "aspect_ratio": "4:3",
            "output_format": "jpeg",
            "num_images": 2,
        },
        timeout=RUN_SECONDS,
        poll_interval=0.25,
        as_subflow=False,
    )
    assert flow_run.state and flow_run.state.is_completed(), (flow_run.state, stack.log_tail())
    assert flow_run.labels["prefect.worker.name"] in WORKERS
    assert stack.emulator.stats.submits_accepted == submits_before + 1
    # Archived under the deployment's default archive_uri, staged through its staging_uri.
    (metadata,) = [m for m in _metadata(stack.archive) if m["flow_run_id"] == str(flow_run.id)]
    assert metadata["prompt"] == "make it look like a watercolour"
    assert metadata["parameters"]["aspect_ratio"] == "4:3"
    outputs = sorted((stack.archive).rglob(f"{metadata['request_id']}/*.jp*g"))
    assert len(outputs) == 2
    assert all(Image.open(path).format == "JPEG" for path in outputs)
    fetched = stack.emulator.stats.fetched_input_urls
    assert sum(url.startswith(stack.store.base_url) for url in fetched) >= 2


async def test_nightly_batch_deployment_runs_its_manifest(stack: Stack) -> None:
    from prefect.deployments import run_deployment

    submits_before = stack.emulator.stats.submits_accepted
    flow_run = await run_deployment(
        NIGHTLY, timeout=RUN_SECONDS, poll_interval=0.25, as_subflow=False
    )
    assert flow_run.state and flow_run.state.is_completed(), (flow_run.state, stack.log_tail())
    assert stack.emulator.stats.submits_accepted == submits_before + 3
    nightly = [m for m in _metadata(stack.archive) if m["flow_run_id"] == str(flow_run.id)]
    assert sorted(m["row_id"] for m in nightly) == ["night-0", "night-1", "night-2"]


async def test_batch_scales_out_in_chunks_over_both_workers(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from prefect_nanobanana.flows import batch_edit
    from prefect_nanobanana.flows.batch import chunks

    monkeypatch.setattr(chunks, "CHUNK_POLL_SECONDS", 0.25)
    # The in-process rerun at the end reaches the emulator as the workers do.
    for name in ("RUNCOMFY_API_TOKEN", "RUNCOMFY_BASE_URL", "RUNCOMFY_POLL_TIME_SCALE"):
        monkeypatch.setenv(name, stack.env[name])
    monkeypatch.setenv("NANOBANANA_STAGING_TOKEN", stack.store.upload_token)
    names = ["a.png", "b.jpg", "c.webp"]
    jobs = [
        {
            "prompt": f"variation {i}",
            "images": [str(stack.images / names[i % 3])],
            # Rows without ids are told apart by position: the chunks must keep the parent's.
            **({"id": f"row-{i}"} if i % 2 else {}),
        }
        for i in range(10)
    ]
    limit = f"deploy-chunks-{uuid.uuid4().hex[:6]}"
    async with get_client() as client:
        # Sized for the fleet: both chunks' lanes (4 each) fit at once.
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=limit, limit=8)
        )
    archive = tmp_path / "archive"
    options = {
        "jobs": jobs,
        "archive_uri": str(archive),
        "staging_uri": stack.store.base_url,
        "max_concurrency": 4,
        "concurrency_limit_name": limit,
    }
    submits_before = stack.emulator.stats.submits_accepted

    state = await batch_edit(**options, chunk_size=4, chunk_deployment=CHUNK, return_state=True)

    assert state.is_completed(), (state, stack.log_tail())
    result = await state.aresult()
    assert (result.archived, result.skipped, result.failed) == (10, 0, 0)
    assert [row.row for row in result.rows] == list(range(1, 11))
    assert [row.id for row in result.rows] == [job.get("id") for job in jobs]
    assert [row.prompt for row in result.rows] == [job["prompt"] for job in jobs]
    # Every row paid and archived exactly once, over all chunks.
    assert stack.emulator.stats.submits_accepted == submits_before + 10
    assert len(_metadata(archive)) == 10
    lines = Path(result.results_manifest).read_text().splitlines()
    assert [json.loads(line)["row"] for line in lines] == list(range(1, 11))

    async with get_client() as client:
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(
                    any_=[state.state_details.flow_run_id]
                )
            )
        )
    assert len(children) == 3
    assert all(child.state and child.state.is_completed() for child in children)
    assert sorted(len(child.parameters["jobs"]) for child in children) == [2, 4, 4]
    workers = {child.labels["prefect.worker.name"] for child in children}
    assert workers == set(WORKERS), [(c.name, c.labels, c.infrastructure_pid) for c in children]
    assert len({child.infrastructure_pid for child in children}) == 3

    # The same batch unchunked: every row is found in the ledger the chunks kept.
    again = await batch_edit(**options)
    assert (again.archived, again.skipped, again.failed) == (0, 10, 0)
    assert stack.emulator.stats.submits_accepted == submits_before + 10


def test_chunk_rows_come_back_in_the_parents_numbering(tmp_path: Path) -> None:
    from prefect_nanobanana.flows import BatchJob, BatchRowResult
    from prefect_nanobanana.flows.batch.chunks import _in_parent_numbering, _read_chunk_rows

    chunk = [
        BatchJob(prompt="p5", images=["a.png"]),
        BatchJob(prompt="p6", images=["https://x/b.png?X-Amz-Signature=s"], id="six"),
    ]
    # The child saw the id-less row under its parent position "5", as row 1 of its chunk.
    reported = [BatchRowResult(row=1, id="5", status="archived", prompt="p5")]
    assert _read_chunk_rows(str(tmp_path / "never-written.jsonl"), None) == []
    rows = _in_parent_numbering(chunk, 4, reported, "chunk 2 ended Crashed")
    assert [(row.row, row.id, row.status) for row in rows] == [
        (5, None, "archived"),
        (6, "six", "failed"),
    ]
    assert rows[1].error == "chunk 2 ended Crashed"
    assert rows[1].sources == ["https://x/b.png"]


async def test_chunk_options_go_together(stack: Stack) -> None:
    from prefect_nanobanana.flows import batch_edit

    with pytest.raises(ValueError, match="chunk_deployment"):
        await batch_edit(jobs=[{"prompt": "p", "images": ["a.png"]}], chunk_size=2)
