"""A batch stopped at many moments: by SIGTERM, and by Cancelling through the API.

Each trial starts `batch_edit` in a process of its own, stops it at a moment drawn
from a seed (printed; set NANOBANANA_STOP_SEED to replay), then reruns the batch,
and checks what a stop promises:

- the process ends within 20 s of the stop (Kubernetes grants 30 s);
- every request of the run that was queued at the API when the stop came was
  withdrawn (the emulator's queue is held at that moment, so "queued" stays true
  until the run has answered), and none of the run's requests is left queued;
- across the stopped run and the rerun, no row is billed twice (a withdrawn request
  is refunded), no row is left "outcome unknown", and every row is archived once.

The moments are spread evenly over the batch's first seconds (with jitter), so
the stop finds rows submitting (each submit's answer is slowed), waiting and
archiving (each output's download is slowed); the trials print which they found.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import prefect
import pytest
from PIL import Image

from prefect_nanobanana.emulator import Fault, FaultPlan

# Tens of processes started and stopped, each batch rerun: minutes, not seconds.
pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.timeout(1800)]

ROWS = 6
STOP_WITHIN_SECONDS = 20.0
# From the batch's first claim, the stretch of time the stop moments are spread over.
SPAN_SECONDS = 3.5
NEWEST = tuple(int(part) for part in prefect.__version__.split(".")[:2]) >= (3, 9)
SIGTERM_MOMENTS = 30 if NEWEST else 10
LISTED_SIGTERM_MOMENTS = 8 if NEWEST else 4
CANCEL_MOMENTS = 4 if NEWEST else 2
# A run that ended before its cancel came: Prefect refuses the cancel, and it stays Completed.
ENDED_FIRST = ", ended before the cancel"

# Imports first, then waits for a line on stdin: the next trial's process warms up
# (Prefect's import takes seconds) while the current trial runs.
_BATCH = """
import asyncio, json, sys
from prefect_nanobanana.flows import batch_edit
from prefect_nanobanana.flows.batch import plan
# A listed trial's rows are planned in groups of 2 at most, so a stop also finds its planning.
plan.GROUP_ROWS = 2
options, name = json.loads(sys.argv[1]), sys.argv[2]
if sys.stdin.readline().strip() != "go":
    sys.exit(0)  # the test ended without this trial
asyncio.run(batch_edit.with_options(flow_run_name=name)(**options))
"""


def _moments(count: int) -> list[float]:
    """`count` moments over the span, one in each equal slice of it, from a printed seed."""
    seed = int(os.environ.get("NANOBANANA_STOP_SEED", time.time_ns() % 2**32))
    print(f"stop moments: seed {seed} (NANOBANANA_STOP_SEED={seed} replays them)")
    rng = random.Random(seed)
    return [SPAN_SECONDS * (index + rng.random()) / count for index in range(count)]


@pytest.fixture
def stopping_emulator(emulator_factory: Callable[..., Any], use_emulator: Callable[..., Any]):
    """Two workers, so that of three lanes' requests one waits queued; submits and output
    downloads slowed, so that a stop finds rows submitting and archiving too."""
    emulator = emulator_factory(workers=2, fixed_duration_seconds=0.8)
    emulator.set_faults(
        FaultPlan(
            [
                Fault("slow", endpoint="submit", delay_seconds=0.25),
                Fault("slow", endpoint="files", delay_seconds=0.3),
            ]
        )
    )
    return use_emulator(emulator)


class Trial:
    """One batch of ROWS rows, its own prompts, archive and concurrency limit."""

    def __init__(self, label: str, tmp_path: Path, image_url: str | None) -> None:
        """`image_url`: every row's input; None: the rows are a folder's images, listed
        (`images_uri`), each its own, sent inline."""
        self.label = label
        self.archive = tmp_path / label
        self.log = tmp_path / f"{label}.log"
        self.prefix = f"{label}:"
        if image_url is None:
            folder = tmp_path / f"{label}-images"
            folder.mkdir()
            for index in range(ROWS):
                Image.new("RGB", (24, 16), (40 * index, 90, 160)).save(folder / f"r{index}.png")
            rows: dict[str, Any] = {"images_uri": str(folder), "prompt": f"{self.prefix} listed"}
        else:
            rows = {
                "jobs": [
                    {
                        "id": f"r{index}",
                        "prompt": f"{self.prefix} row {index}",
                        "images": [image_url],
                    }
                    for index in range(ROWS)
                ]
            }
        self.options = {
            **rows,
            "archive_uri": str(self.archive),
            "max_concurrency": 3,
            # The slots of a stopped process stay leased until they expire: a limit each.
            "concurrency_limit_name": f"test-{label}",
        }

    def start(self, prefect_harness: Any) -> subprocess.Popen[bytes]:
        env = prefect_harness.env(
            **{k: v for k, v in os.environ.items() if k.startswith(("RUNCOMFY_", "NANOBANANA_"))}
        )
        with self.log.open("wb") as log:
            self.child = subprocess.Popen(
                [sys.executable, "-c", _BATCH, json.dumps(self.options), self.label],
                env=env,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.child

    def go(self) -> subprocess.Popen[bytes]:
        """Let the warmed-up process run its batch."""
        assert self.child.stdin is not None
        self.child.stdin.write(b"go\n")
        self.child.stdin.close()
        return self.child

    def records(self) -> list[dict[str, Any]]:
        folder = self.archive / "_ledger"
        if not folder.exists():
            return []
        records = []
        for path in folder.glob("*.json"):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # being replaced right now
        return records

    def wait_for_first_claim(self, child: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 120
        while not self.records():
            assert child.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the batch never claimed a row"
            time.sleep(0.01)

    def jobs(self, emulator: Any) -> list[Any]:
        return [job for job in emulator.jobs() if job.prompt.startswith(self.prefix)]

    def phases(self, emulator: Any) -> str:
        """What the rows were doing at this moment, as the ledger and the emulator tell."""
        statuses = Counter(record["status"] for record in self.records())
        jobs = Counter(job.status for job in self.jobs(emulator))
        found = []
        if statuses["submitting"]:
            found.append("submitting")
        if jobs["in_queue"] or jobs["in_progress"]:
            found.append("waiting")
        if statuses["archiving"] or (statuses["submitted"] and jobs["completed"]):
            found.append("archiving")
        if statuses["archived"] == ROWS:
            found.append("done")
        return "+".join(found) or "planning"


def _stop_and_check(
    trial: Trial, emulator: Any, child: subprocess.Popen[bytes], stop: Callable[[], bool | None]
) -> str:
    """Stop the run with its queue held, and check the stop itself; the phases it found.

    `stop` answers False when the run had already ended and refused it (a cancel)."""
    emulator.hold_queue(True)
    try:
        queued = {job.request_id for job in trial.jobs(emulator) if job.status == "in_queue"}
        phases = trial.phases(emulator)
        stopped_at = time.monotonic()
        if stop() is False:
            phases += ENDED_FIRST
        try:
            child.wait(timeout=STOP_WITHIN_SECONDS + 30)
        finally:
            child.kill()
        took = time.monotonic() - stopped_at
        assert took <= STOP_WITHIN_SECONDS, (
            f"{trial.label} ({phases}): ended {took:.1f} s after; {trial.log.read_text()[-3000:]}"
        )
        _check_withdrawn(trial, emulator, queued, phases)
    finally:
        emulator.hold_queue(False)
    return phases


def _check_withdrawn(trial: Trial, emulator: Any, queued: set[str], phases: str) -> None:
    """Every request queued when the stop came was withdrawn; none of the run's is queued."""
    jobs = {job.request_id: job for job in trial.jobs(emulator)}
    kept = [request_id for request_id in queued if jobs[request_id].status != "cancelled"]
    assert not kept, f"{trial.label} ({phases}): queued, not withdrawn: {kept}"
    left = [job.request_id for job in jobs.values() if job.status == "in_queue"]
    assert not left, f"{trial.label} ({phases}): left queued at the API: {left}"


async def _rerun_and_check(trial: Trial, emulator: Any) -> None:
    """The rerun finishes the batch: each row billed once, archived once, nothing unknown."""
    from prefect_nanobanana.flows import batch_edit

    options = {**trial.options, "concurrency_limit_name": f"test-{trial.label}-rerun"}
    rerun = await batch_edit(**options)
    assert rerun.failed == 0, [row.error for row in rerun.rows if row.error]
    assert rerun.archived + rerun.adopted + rerun.skipped == ROWS
    records = trial.records()
    assert sorted(record["status"] for record in records) == ["archived"] * ROWS, records
    billed = Counter(
        (job.prompt, job.image_urls) for job in trial.jobs(emulator) if job.status != "cancelled"
    )
    assert sorted(billed.values()) == [1] * ROWS, f"{trial.label}: billed {billed}"
    archived = Counter(
        json.loads(path.read_text())["row_id"] for path in trial.archive.rglob("metadata.json")
    )
    assert sorted(archived.values()) == [1] * ROWS, f"{trial.label}: archived {archived}"


async def test_a_batch_stopped_by_sigterm_at_many_moments(
    prefect_harness, stopping_emulator, image_server, tmp_path
):
    """What a worker sends a flow run it cancels, and Kubernetes an evicted pod."""
    image = image_server.url_for("wide.png")
    await _sigterm_trials(prefect_harness, stopping_emulator, tmp_path, "sigterm", image)


async def test_a_listed_batch_stopped_by_sigterm_at_several_moments(
    prefect_harness, stopping_emulator, tmp_path
):
    """A folder as the batch, its rows running while the rest are still being planned."""
    await _sigterm_trials(prefect_harness, stopping_emulator, tmp_path, "sigterm-listed", None)


async def _sigterm_trials(
    prefect_harness: Any, emulator: Any, tmp_path: Path, label: str, image: str | None
) -> None:
    found = []
    moments = _moments(SIGTERM_MOMENTS if image is not None else LISTED_SIGTERM_MOMENTS)
    trials = [Trial(f"{label}-{number}", tmp_path, image) for number in range(1, len(moments) + 1)]
    trials[0].start(prefect_harness)
    for number, (trial, moment) in enumerate(zip(trials, moments, strict=True), start=1):
        child = trial.go()
        if number < len(trials):
            trials[number].start(prefect_harness)
        trial.wait_for_first_claim(child)
        time.sleep(moment)
        phases = _stop_and_check(trial, emulator, child, partial(child.send_signal, signal.SIGTERM))
        found.append(f"{moment:.2f}s:{phases}")
        await _rerun_and_check(trial, emulator)
    print("stopped while:", ", ".join(found))


def _cancel_through_the_api(flow_run_name: str) -> bool:
    """Cancel as the UI and `prefect flow-run cancel` do: unforced, so Prefect refuses the
    cancel of a run that has already ended. Whether the run took it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name]))
        )
        answer = client.set_flow_run_state(flow_run.id, Cancelling())
    return answer.status == SetStateStatus.ACCEPT


def _final_state(flow_run_name: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name]))
        )
    return flow_run.state


async def test_a_direct_batch_cancelled_through_the_api_at_several_moments(
    prefect_harness, stopping_emulator, image_server, tmp_path
):
    """A run started directly has no runner: its Cancelling state is all it gets."""
    image = image_server.url_for("wide.png")
    found = []
    for number, moment in enumerate(_moments(CANCEL_MOMENTS), start=1):
        trial = Trial(f"cancel-direct-{number}", tmp_path, image)
        trial.start(prefect_harness)
        child = trial.go()
        trial.wait_for_first_claim(child)
        time.sleep(moment)
        phases = _stop_and_check(
            trial, stopping_emulator, child, partial(_cancel_through_the_api, trial.label)
        )
        state = _final_state(trial.label)
        if phases.endswith(ENDED_FIRST):
            assert state.is_completed(), f"{trial.label} ({phases}) refused the cancel: {state}"
        elif "done" not in phases:
            assert state.is_cancelled(), f"{trial.label} ({phases}) ended {state}"
        found.append(f"{moment:.2f}s:{phases}")
        await _rerun_and_check(trial, stopping_emulator)
    print("cancelled while:", ", ".join(found))


# Served from the repository's entry point, as `deployments/prefect.yaml` points at it:
# the runner's child process loads the flow from there.
_SERVE = """
import sys
from prefect import flow
batch = flow.from_source(source=sys.argv[2], entrypoint="flows/nightly_batch.py:batch_edit")
batch.serve(name=sys.argv[1], limit=1)
"""


async def test_a_deployment_batch_cancelled_through_the_api_at_several_moments(
    prefect_harness, stopping_emulator, image_server, tmp_path
):
    """A deployment's run: its runner sees Cancelling and sends the flow's process SIGTERM;
    the run sees Cancelling itself too. Either way it stops as designed, and ends Cancelled."""
    from prefect.deployments import run_deployment

    image = image_server.url_for("wide.png")
    env = prefect_harness.env(
        **{k: v for k, v in os.environ.items() if k.startswith(("RUNCOMFY_", "NANOBANANA_"))}
    )
    served_log = tmp_path / "served.log"
    with served_log.open("wb") as log:
        served = subprocess.Popen(
            [sys.executable, "-c", _SERVE, "stop-test", str(Path(__file__).parents[1])],
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        await _served(served, served_log, "nano-banana-batch/stop-test")
        found = []
        for number, moment in enumerate(_moments(CANCEL_MOMENTS), start=1):
            trial = Trial(f"cancel-deployment-{number}", tmp_path, image)
            flow_run = await run_deployment(
                "nano-banana-batch/stop-test",
                parameters=trial.options,
                flow_run_name=trial.label,
                timeout=0,
            )
            deadline = time.monotonic() + 120
            while not trial.records():
                assert served.poll() is None, served_log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the deployment's run never claimed a row"
                time.sleep(0.01)
            time.sleep(moment)
            phases = await _cancel_deployment_run_and_check(trial, stopping_emulator, flow_run.id)
            found.append(f"{moment:.2f}s:{phases}")
            await _rerun_and_check(trial, stopping_emulator)
        print("cancelled while:", ", ".join(found))
    finally:
        served.terminate()
        served.wait(30)


async def _served(served: subprocess.Popen[bytes], log: Path, name: str) -> None:
    """Wait until the serving process has registered its deployment."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + 120
    async with get_client() as client:
        while True:
            try:
                await client.read_deployment_by_name(name)
                return
            except ObjectNotFound:
                assert served.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"{name} was never served"
                await asyncio.sleep(0.2)


async def _cancel_deployment_run_and_check(trial: Trial, emulator: Any, flow_run_id: Any) -> str:
    """As `_stop_and_check`, for a run in the runner's process: ended = a final state."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Cancelling

    emulator.hold_queue(True)
    try:
        queued = {job.request_id for job in trial.jobs(emulator) if job.status == "in_queue"}
        phases = trial.phases(emulator)
        async with get_client() as client:
            stopped_at = time.monotonic()
            # As the UI and `prefect flow-run cancel` do: unforced, so a run that has already
            # ended refuses it (a forced Cancelling would sit on it, as no process is left).
            answer = await client.set_flow_run_state(flow_run_id, Cancelling())
            if answer.status != SetStateStatus.ACCEPT:
                state = (await client.read_flow_run(flow_run_id)).state
                assert state is not None and state.is_completed(), (
                    f"{trial.label} ({phases}) refused the cancel: {state}"
                )
                _check_withdrawn(trial, emulator, queued, phases)
                return phases + ENDED_FIRST
            while True:
                state = (await client.read_flow_run(flow_run_id)).state
                if state is not None and state.is_final():
                    break
                assert time.monotonic() - stopped_at <= STOP_WITHIN_SECONDS, (
                    f"{trial.label} ({phases}): still {state} after {STOP_WITHIN_SECONDS} s"
                )
                await asyncio.sleep(0.1)
        # The runner stops the flow's process with SIGTERM, and the run asks the API why:
        # Cancelled, whether it saw its Cancelling first or the signal came first.
        if "done" not in phases:
            assert state.is_cancelled(), f"{trial.label} ended {state}"
        _check_withdrawn(trial, emulator, queued, phases)
    finally:
        emulator.hold_queue(False)
    return phases
