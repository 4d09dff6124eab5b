"""The one submit guard: claims race across processes, losers adopt, dead claims stay unknown."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from prefect_nanobanana.client import (
    AsyncRunComfyClient,
    AuthenticationError,
    NanoBananaEditInput,
    SubmitOutcomeUnknownError,
)
from prefect_nanobanana.emulator import Fault, FaultPlan
from prefect_nanobanana.guard.protocol import submit_once
from prefect_nanobanana.guard.records import MemoryRecordStore
from prefect_nanobanana.storage import ClaimOwner, Ledger, LedgerEntry, VersionedEntry

# Slow answers widen the window in which the losers find a live "submitting" claim.
SLOW_SUBMITS = FaultPlan([Fault("slow", endpoint="submit", delay_seconds=0.3)])

# Each process waits for the start file, then claims at once: the claims overlap.
_CLAIMANT = """
import asyncio, json, os, sys, time
from pathlib import Path
from prefect_nanobanana.client import AsyncRunComfyClient, NanoBananaEditInput
from prefect_nanobanana.storage import Ledger
from prefect_nanobanana.guard.protocol import submit_once

archive, job_key, image_url, start = sys.argv[1:5]
edit = NanoBananaEditInput(prompt="race", image_urls=[image_url])
while not Path(start).exists():
    time.sleep(0.005)

async def claim():
    async with AsyncRunComfyClient() as client:
        # known=None: every claimant read "no record" before any claimed (as batch plans
        # do), so each goes straight to the atomic create, which only one may win.
        return await submit_once(job_key, Ledger(archive), client, edit, known=None)

held = asyncio.run(claim())
print(json.dumps(held.model_dump(mode="json")))
"""


def _edit(image_server: Any) -> NanoBananaEditInput:
    return NanoBananaEditInput(
        prompt="paint it teal", image_urls=[image_server.url_for("wide.png")]
    )


def _race(archive: str, emulator: Any, image_server: Any, tmp_path: Path, processes: int) -> list:
    start = tmp_path / "start"
    env = {
        **os.environ,
        "RUNCOMFY_API_TOKEN": emulator.config.api_tokens[0],
        "RUNCOMFY_BASE_URL": emulator.base_url,
    }
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CLAIMANT,
                archive,
                "one-job",
                image_server.url_for("wide.png"),
                str(start),
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    time.sleep(0.5)  # let them import; each then polls for the start file
    start.touch()
    answers = []
    for child in children:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0
        answers.append(json.loads(out.strip().splitlines()[-1]))
    return answers


def _check_one_submit(answers: list, emulator: Any) -> None:
    assert emulator.stats.submits_received == 1  # one paid submit for N claimants
    assert len({answer["request_id"] for answer in answers}) == 1
    assert sum(not answer["adopted"] for answer in answers) == 1  # the winner
    assert sum(answer["adopted"] for answer in answers) == len(answers) - 1


def test_processes_racing_on_one_job_key_submit_once(emulator_factory, image_server, tmp_path):
    emulator = emulator_factory(faults=SLOW_SUBMITS)
    answers = _race(str(tmp_path / "archive"), emulator, image_server, tmp_path, processes=3)
    _check_one_submit(answers, emulator)
    entry = Ledger(tmp_path / "archive").lookup("one-job")
    assert (entry.status, entry.request_id) == ("submitted", answers[0]["request_id"])


def _claim_of(owner_pid: int, job_key: str = "stuck") -> LedgerEntry:
    now = dt.datetime.now(dt.timezone.utc)
    owner = ClaimOwner(token="gone", host=os.uname().nodename, pid=owner_pid, claimed_at=now)
    return LedgerEntry(
        job_key=job_key, status="submitting", submitted_at=now, updated_at=now, owner=owner
    )


async def test_a_claim_whose_owner_died_mid_submit_stays_outcome_unknown(
    emulator, image_server, tmp_path
):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    ledger = Ledger(tmp_path / "archive")
    ledger.check()
    assert ledger.create(_claim_of(int(dead.stdout))) is not None
    async with AsyncRunComfyClient(
        api_token=emulator.config.api_tokens[0], base_url=emulator.base_url
    ) as client:
        with pytest.raises(SubmitOutcomeUnknownError, match="NOT submitted again"):
            await submit_once("stuck", ledger, client, _edit(image_server))
    assert emulator.stats.submits_received == 0
    assert ledger.lookup("stuck").status == "submitting"  # left for a person to check


async def test_a_stale_plan_read_of_a_finished_claim_adopts_its_request(emulator, image_server):
    """The plan read "submitting" before the other run recorded its id (two runs at once):
    the guard reads again before calling that claim dead, and adopts."""
    store = MemoryRecordStore()
    async with AsyncRunComfyClient(
        api_token=emulator.config.api_tokens[0], base_url=emulator.base_url
    ) as client:
        stale_claim = None

        async def remember_the_claim() -> None:
            nonlocal stale_claim
            stale_claim = store.read("stale")

        first = await submit_once(
            "stale", store, client, _edit(image_server), before_submit=remember_the_claim
        )
        assert stale_claim is not None and stale_claim.entry.status == "submitting"
        second = await submit_once("stale", store, client, _edit(image_server), known=stale_claim)
    assert second.request_id == first.request_id
    assert emulator.stats.submits_received == 1


async def test_a_live_claim_is_waited_for_then_adopted(emulator, image_server):
    store = MemoryRecordStore()
    async with AsyncRunComfyClient(
        api_token=emulator.config.api_tokens[0], base_url=emulator.base_url
    ) as client:
        first, second = await asyncio.gather(
            submit_once("twice", store, client, _edit(image_server)),
            submit_once("twice", store, client, _edit(image_server)),
        )
    assert first.request_id == second.request_id
    assert emulator.stats.submits_received == 1


async def test_a_refused_submit_releases_the_claim_and_keeps_the_history(emulator, image_server):
    store = MemoryRecordStore()
    async with AsyncRunComfyClient(api_token="wrong", base_url=emulator.base_url) as wrong:
        with pytest.raises(AuthenticationError):
            await submit_once("refused", store, wrong, _edit(image_server))
    entry, _ = store.read("refused")
    assert entry.status == "failed" and "AuthenticationError" in entry.error
    async with AsyncRunComfyClient(
        api_token=emulator.config.api_tokens[0], base_url=emulator.base_url
    ) as client:
        held = await submit_once("refused", store, client, _edit(image_server))
        entry, version = store.read("refused")
        assert (entry.status, entry.request_id) == ("submitted", held.request_id)
        # A job that failed after its submit may be claimed and paid again; the old id stays.
        store.replace(entry.model_copy(update={"status": "failed"}), version)
        again = await submit_once("refused", store, client, _edit(image_server))
    assert again.request_id != held.request_id
    assert store.read("refused").entry.previous_request_ids == [held.request_id]
    assert emulator.stats.submits_accepted == 2


# The record of the request id is slow to write (in its thread); SIGTERM lands meanwhile.
# Blocking code submits as the CLI's `submit` does: the guard inside `signals_deferred`.
_TERMINATED_WHILE_RECORDING = """
import asyncio, sys, threading, time
from prefect_nanobanana.client import AsyncRunComfyClient, NanoBananaEditInput
from prefect_nanobanana.storage import Ledger
from prefect_nanobanana.guard.protocol import submit_once
from prefect_nanobanana.stop import signals_deferred

class SlowLedger(Ledger):
    def replace(self, entry, version):
        in_its_thread = threading.current_thread() is not threading.main_thread()
        if entry.status == "submitted" and in_its_thread:
            print("recording", flush=True)
            time.sleep(30)
        return super().replace(entry, version)

archive, image_url = sys.argv[1:3]
edit = NanoBananaEditInput(prompt="stop", image_urls=[image_url])

async def claim():
    async with AsyncRunComfyClient() as client:
        await submit_once("stopped-job", SlowLedger(archive), client, edit)

with signals_deferred():
    asyncio.run(claim())
print("finished", flush=True)
"""


def test_sigterm_right_after_the_api_accepted_a_submit_still_records_the_request_id(
    emulator, image_server, tmp_path
):
    env = {
        **os.environ,
        "RUNCOMFY_API_TOKEN": emulator.config.api_tokens[0],
        "RUNCOMFY_BASE_URL": emulator.base_url,
    }
    archive = tmp_path / "archive"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _TERMINATED_WHILE_RECORDING,
            str(archive),
            image_server.url_for("wide.png"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "recording"  # the id exists, unrecorded
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGTERM and "finished" not in out
    entry = Ledger(archive).lookup("stopped-job")
    assert emulator.stats.submits_accepted == 1
    assert entry.status == "submitted" and emulator.job(entry.request_id) is not None


@pytest.mark.prefect
def test_prefect_record_store_creates_once_among_concurrent_writers(prefect_harness):
    """The bare tasks' and the job block's store: only one of many simultaneous claims wins."""
    from concurrent.futures import ThreadPoolExecutor

    from prefect_nanobanana.tasks.records import PrefectRecordStore

    job_key = f"prefect-store-race-{os.getpid()}-{time.monotonic_ns()}"
    now = dt.datetime.now(dt.timezone.utc)

    def claim(index: int) -> str | None:
        entry = LedgerEntry(
            job_key=job_key, status="submitting", submitted_at=now, updated_at=now, error=str(index)
        )
        return PrefectRecordStore().create(entry)  # a store each: as separate processes would

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(claim, range(16)))
    assert sum(version is not None for version in versions) == 1
    entry, version = PrefectRecordStore().read(job_key)
    assert versions[int(entry.error)] == version  # the record is the winner's


class _CountingStore(MemoryRecordStore):
    """Memory records that count reads: a row that knows its record's version reads none."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def read(self, job_key: str):
        self.reads += 1
        return super().read(job_key)


async def test_archiving_from_the_version_a_row_wrote_reads_nothing(emulator, image_server):
    from prefect_nanobanana.guard.protocol import archive_claim, mark_archived

    store = _CountingStore()
    async with AsyncRunComfyClient(
        api_token=emulator.config.api_tokens[0], base_url=emulator.base_url
    ) as client:
        held = await submit_once("job-known", store, client, _edit(image_server), known=None)
    assert store.reads == 0 and held.record is not None
    assert "record" not in held.model_dump()  # never in a result or a log line
    async with archive_claim(store, "job-known", known=held.record) as turn:
        assert turn.elsewhere is None and not turn.started_before
        await mark_archived(
            store,
            "job-known",
            metadata_location="m",
            output_locations=["o"],
            cost=0.1,
            known=turn.claim,
        )
    assert store.reads == 0
    assert store.read("job-known").entry.status == "archived"


class _WriteCountingStore(_CountingStore):
    """Memory records that count reads and writes, as an S3 ledger would bill them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def create(self, entry):
        self.writes += 1
        return super().create(entry)

    def replace(self, entry, version):
        self.writes += 1
        return super().replace(entry, version)


async def test_archiving_claimed_with_the_request_id_costs_no_write_and_holds_off_adopters(
    emulator, image_server
):
    """`hold_archiving`: the request id's write claims the archiving too, so the row's
    archiving takes three writes in all (claim, id, done) and no read; another run that
    adopts the request meanwhile waits for that archive instead of making its own; and
    a claim released unused (the wait failed) lets the next caller archive at once."""
    from prefect_nanobanana.guard.protocol import (
        _LIVE_CLAIMS,
        archive_claim,
        mark_archived,
        release_archiving,
    )

    store = _WriteCountingStore()
    async with AsyncRunComfyClient(
        api_token=emulator.config.api_tokens[0], base_url=emulator.base_url
    ) as client:
        held = await submit_once(
            "job-held", store, client, _edit(image_server), known=None, hold_archiving=True
        )
        adopted = await submit_once("job-held", store, client, _edit(image_server))
        released = await submit_once(
            "job-released", store, client, _edit(image_server), known=None, hold_archiving=True
        )
    assert adopted.request_id == held.request_id and emulator.stats.submits_accepted == 2
    assert held.archiving_token in _LIVE_CLAIMS
    assert held.record.entry.archiver.token == held.archiving_token
    assert "archiving_token" not in held.model_dump()
    writes_before = store.writes

    adopter_turns = []

    async def adopter_archives() -> None:
        async with archive_claim(store, "job-held", known=adopted.record) as turn:
            adopter_turns.append(turn)

    adopting = asyncio.create_task(adopter_archives())
    await asyncio.sleep(0.3)
    assert not adopter_turns  # it waits: the submitter holds the archiving
    async with archive_claim(
        store, "job-held", known=held.record, held_token=held.archiving_token
    ) as turn:
        assert turn.elsewhere is None and not turn.started_before
        assert store.writes == writes_before  # the turn took no write
        await mark_archived(
            store,
            "job-held",
            metadata_location="mine",
            output_locations=["o"],
            cost=0.1,
            known=turn.claim,
        )
    await asyncio.wait_for(adopting, 10)
    assert adopter_turns[0].elsewhere is not None
    assert adopter_turns[0].elsewhere.metadata_location == "mine"
    assert held.archiving_token not in _LIVE_CLAIMS
    # One write since the submits: the done mark. The adopter only read.
    assert store.writes == writes_before + 1

    token = released.archiving_token
    await release_archiving(store, released)
    assert token not in _LIVE_CLAIMS and store.read("job-released").entry.archiver is None
    async with archive_claim(store, "job-released") as turn:
        assert turn.elsewhere is None and not turn.started_before


async def test_an_archiving_held_on_a_machine_that_went_quiet_is_taken_over_after_a_grace(
    emulator, image_server, monkeypatch
):
    """A claim made with the request id on another machine is trusted for
    `HELD_ARCHIVE_GRACE_SECONDS` once the adopter's own wait is over, not for the 15
    minutes a claim lasts: its machine may have died with the rows. An archiving that
    machine has begun (status "archiving") is still waited for."""
    import prefect_nanobanana.guard.protocol as guard

    monkeypatch.setattr(guard, "HELD_ARCHIVE_GRACE_SECONDS", 0.5)
    store = MemoryRecordStore()
    async with AsyncRunComfyClient(
        api_token=emulator.config.api_tokens[0], base_url=emulator.base_url
    ) as client:
        held = await submit_once("job-away", store, client, _edit(image_server), known=None)
    elsewhere = guard.new_owner().model_copy(update={"host": "another-machine", "pid": 1})
    current = store.read("job-away")
    away = current.entry.model_copy(update={"archiver": elsewhere})
    store.replace(away, current.version)

    began = time.monotonic()
    async with guard.archive_claim(store, "job-away", known=held.record) as turn:
        waited = time.monotonic() - began
        assert turn.elsewhere is None and turn.started_before  # so it looks for its work
    assert 0.5 <= waited < 5, waited

    current = store.read("job-away")
    begun = current.entry.model_copy(update={"status": "archiving", "archiver": elsewhere})
    store.replace(begun, current.version)

    async def claim() -> None:
        async with guard.archive_claim(store, "job-away"):
            pass

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(claim(), 1.5)


async def test_a_stale_known_record_only_costs_a_read_and_keeps_archiving_once(
    emulator, image_server
):
    """Another run took the archiving over since this caller's record was written: the
    conditional write loses, the record is read, and the other run's archive is adopted."""
    from prefect_nanobanana.guard.protocol import (
        _LIVE_CLAIMS,
        archive_claim,
        mark_archived,
        new_owner,
    )

    store = _CountingStore()
    async with AsyncRunComfyClient(
        api_token=emulator.config.api_tokens[0], base_url=emulator.base_url
    ) as client:
        held = await submit_once("job-stale", store, client, _edit(image_server), known=None)
    current = store.read("job-stale")
    other = new_owner()
    _LIVE_CLAIMS.add(other.token)
    taken = current.entry.model_copy(update={"status": "archiving", "archiver": other})
    version = store.replace(taken, current.version)
    assert version is not None

    async def other_finishes() -> None:
        await asyncio.sleep(0.2)
        await mark_archived(
            store,
            "job-stale",
            metadata_location="theirs",
            output_locations=["o"],
            cost=0.1,
            known=VersionedEntry(taken, version),
        )
        _LIVE_CLAIMS.discard(other.token)

    finishing = asyncio.create_task(other_finishes())
    async with archive_claim(store, "job-stale", known=held.record) as turn:
        assert turn.elsewhere is not None and turn.elsewhere.metadata_location == "theirs"
    await finishing
    # A dead archiver's claim is taken over, and then the archive is looked for.
    dead = new_owner()
    entry = store.read("job-stale")
    crashed = entry.entry.model_copy(update={"status": "archiving", "archiver": dead})
    store.replace(crashed, entry.version)
    async with archive_claim(store, "job-stale") as turn:
        assert turn.elsewhere is None and turn.started_before
