"""The submit records of the Prefect path (bare tasks, the job block) on several machines.

Two processes stand for two machines: each its own `PREFECT_HOME` (so its own file
locks), one Prefect server, one shared result storage folder, configured through
environment variables alone, as a work pool's job variables would. They race one
explicit `job_key` 20 times, the claim forced to overlap: the run that finds the record
free holds its lock until the other run is at the lock's door, then for half a second
more, or until the other is inside too (which only a lock they do not share lets it
be). With `NANOBANANA_LOCK_URL` naming a real `redis-server`, every key is paid
once and both runs return the same request; with the per-machine lock (the variable
unset) both runs claim, and a key is paid twice.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from uuid import uuid4

import pytest
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.locking.filesystem import FileSystemLockManager
from prefect.results import ResultStore

from prefect_nanobanana.storage import LedgerEntry
from prefect_nanobanana.tasks import locks
from prefect_nanobanana.tasks.locks import (
    LOCK_URL_ENV_VAR,
    LockSettingError,
    RecordLockError,
    shared_storage,
)
from prefect_nanobanana.tasks.records import PrefectRecordStore
from tests.fixtures.prefect_stack import free_port

RACES = 20

# One "machine": a flow run that submits one edit per key with an explicit job_key. The
# patches only force the overlap (they decide nothing): the claimant that finds the
# record free, inside its lock, says so and waits until the other run is about to take
# the lock, then for a moment more, or until the other is inside too.
_MACHINE = """
import json, sys, threading, time
from pathlib import Path

from prefect import flow

from prefect_nanobanana.tasks import records, submit_edit

rendezvous, me, image_url = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
count, hold = int(sys.argv[4]), float(sys.argv[5])
claiming = threading.local()


def others(key, mark):
    return [p for p in rendezvous.glob(f"{key}.*.{mark}") if p.name != f"{key}.{me}.{mark}"]


def wait_for(found, seconds):
    deadline = time.monotonic() + seconds
    while not found():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


Store = records.PrefectRecordStore
locked, create, read_merged = Store._locked, Store.create, Store._read_merged


def at_the_door(self, key):
    if key.startswith("nanobanana-submit-"):
        (rendezvous / f"{key}.{me}.want").touch()
    return locked(self, key)


def claim(self, entry):
    claiming.key = records.record_names(entry.job_key)[0]
    try:
        return create(self, entry)
    finally:
        claiming.key = None


def read_inside(self, job_key):
    found = read_merged(self, job_key)
    key = getattr(claiming, "key", None)
    if found is None and key is not None:
        (rendezvous / f"{key}.{me}.in").touch()
        assert wait_for(lambda: others(key, "want"), 120), "the other machine never came"
        wait_for(lambda: others(key, "in"), hold)
    return found


Store._locked, Store.create, Store._read_merged = at_the_door, claim, read_inside


@flow
def race(keys):
    once = submit_edit.with_options(retries=0)
    found = {}
    for index, key in enumerate(keys):
        edit = {"prompt": f"race {index}", "image_urls": [image_url]}
        try:
            found[key] = once(edit, job_key=key).request_id
        except Exception as error:
            found[key] = f"error: {type(error).__name__}: {error}"
    return found


keys = [f"{rendezvous.name}-{index}" for index in range(count)]
print("RESULT " + json.dumps(race(keys)), flush=True)
"""


def _race(
    tmp_path: Path, prefect_harness, emulator, image_server, lock_url: str | None, hold: float
) -> tuple[dict[str, str], dict[str, str], list[str]]:
    rendezvous = tmp_path / f"race-{uuid4().hex[:8]}"
    rendezvous.mkdir()
    shared_results = tmp_path / "shared-results"
    env = prefect_harness.env(
        PREFECT_LOCAL_STORAGE_PATH=str(shared_results),
        RUNCOMFY_API_TOKEN=emulator.config.api_tokens[0],
        RUNCOMFY_BASE_URL=emulator.base_url,
        RUNCOMFY_POLL_TIME_SCALE=str(emulator.config.time_scale),
    )
    env.pop(LOCK_URL_ENV_VAR, None)
    if lock_url is not None:
        env[LOCK_URL_ENV_VAR] = lock_url
    machines = []
    for name in ("a", "b"):
        home = tmp_path / f"machine-{name}"
        home.mkdir()
        log = (tmp_path / f"machine-{name}.log").open("w")
        machines.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _MACHINE,
                    str(rendezvous),
                    name,
                    image_server.url_for("wide.png"),
                    str(RACES),
                    str(hold),
                ],
                env={**env, "PREFECT_HOME": str(home)},
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        )
    results = []
    for name, machine in zip("ab", machines, strict=True):
        out, _ = machine.communicate(timeout=280)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        log_text = (tmp_path / f"machine-{name}.log").read_text()
        assert machine.returncode == 0 and lines, f"machine {name}:\n{out}\n{log_text[-4000:]}"
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    keys = [f"{rendezvous.name}-{index}" for index in range(RACES)]
    return results[0], results[1], keys


@pytest.mark.prefect
@pytest.mark.redis
def test_two_machines_racing_one_job_key_pay_once_with_the_redis_lock(
    tmp_path, prefect_harness, emulator, image_server, redis_url
):
    started = time.monotonic()
    a, b, keys = _race(tmp_path, prefect_harness, emulator, image_server, redis_url, hold=0.5)
    assert sorted(a) == sorted(b) == sorted(keys)
    assert not [value for value in [*a.values(), *b.values()] if value.startswith("error")], (a, b)
    assert a == b  # both runs return the same request for every key
    assert emulator.stats.submits_accepted == RACES  # each key paid once
    assert {emulator.job(a[key]).prompt for key in keys} == {f"race {i}" for i in range(RACES)}
    print(f"redis race: {time.monotonic() - started:.1f} s")


@pytest.mark.prefect
@pytest.mark.redis
def test_two_machines_racing_one_job_key_with_the_per_machine_lock_pay_twice(
    tmp_path, prefect_harness, emulator, image_server
):
    """What the Redis lock prevents: each machine's file lock lets both claim."""
    a, b, keys = _race(tmp_path, prefect_harness, emulator, image_server, None, hold=0.5)
    twice = [key for key in keys if a[key] != b[key]]
    assert emulator.stats.submits_accepted > RACES, (a, b)
    assert twice, (a, b)


def _entry(job_key: str) -> LedgerEntry:
    now = dt.datetime.now(dt.timezone.utc)
    return LedgerEntry(job_key=job_key, status="submitting", submitted_at=now, updated_at=now)


@pytest.fixture
def warning_once(monkeypatch):
    monkeypatch.delenv(LOCK_URL_ENV_VAR, raising=False)
    locks._reset_warning()
    yield
    locks._reset_warning()


def test_shared_records_with_a_per_machine_lock_warn_once_naming_the_setting(warning_once, caplog):
    store = PrefectRecordStore(ResultStore(result_storage=RemoteFileSystem(basepath="s3://b/r")))
    assert isinstance(store.result_store.lock_manager, FileSystemLockManager)
    with caplog.at_level(logging.WARNING):
        assert store.warn_if_machine_local()
        assert not store.warn_if_machine_local()
        assert not PrefectRecordStore(store.result_store).warn_if_machine_local()
    warnings = [r for r in caplog.records if LOCK_URL_ENV_VAR in r.getMessage()]
    assert len(warnings) == 1
    assert "s3://b/r" in warnings[0].getMessage()


def test_local_records_or_a_redis_lock_do_not_warn(warning_once, monkeypatch, tmp_path):
    local = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)))
    assert not PrefectRecordStore(local).warn_if_machine_local()
    monkeypatch.setenv(LOCK_URL_ENV_VAR, f"redis://127.0.0.1:{free_port()}/0")
    remote = ResultStore(result_storage=RemoteFileSystem(basepath="gs://b/r"))
    store = PrefectRecordStore(remote)
    assert type(store.result_store.lock_manager).__name__ == "RedisLockManager"
    assert not store.warn_if_machine_local()


def test_a_folder_on_a_network_file_system_is_shared_storage(tmp_path):
    share = tmp_path / "the share"
    folder = share / "results"
    folder.mkdir(parents=True)
    escaped = str(share).replace(" ", "\\040")  # as /proc/mounts writes a blank
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\n"
        f"server:/export {escaped} nfs4 rw,relatime 0 0\n"
        f"tmpfs {folder / 'nested'} tmpfs rw 0 0\n"
    )
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(folder)))
    assert "nfs4" in shared_storage(store, mounts_file=mounts)
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\ntmpfs {escaped} tmpfs rw 0 0\n")
    assert shared_storage(store, mounts_file=mounts) is None


def test_a_lock_url_that_is_not_redis_is_refused_without_its_password(monkeypatch):
    monkeypatch.setenv(LOCK_URL_ENV_VAR, "http://user:s3cret@host/0")
    with pytest.raises(LockSettingError, match=LOCK_URL_ENV_VAR) as refused:
        PrefectRecordStore(ResultStore())
    assert "s3cret" not in str(refused.value)


def test_an_unreachable_lock_service_fails_the_claim_naming_the_setting(monkeypatch):
    monkeypatch.setenv(LOCK_URL_ENV_VAR, f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    store = PrefectRecordStore(ResultStore())
    with pytest.raises(RecordLockError, match=LOCK_URL_ENV_VAR) as failed:
        store.create(_entry(f"unreachable-{uuid4().hex}"))
    assert "s3cret" not in str(failed.value) and "Nothing was submitted" in str(failed.value)


@pytest.mark.prefect
def test_the_task_and_the_job_block_warn_for_an_explicit_job_key_only(
    warning_once, monkeypatch, prefect_harness, use_emulator, emulator, image_server, caplog
):
    from prefect import flow

    from prefect_nanobanana import NanoBananaEditJob, RunComfyCredentials
    from prefect_nanobanana.tasks import submit_edit

    use_emulator(emulator)
    # The harness's results are in a local folder; stand for one that other machines share.
    monkeypatch.setattr(locks, "shared_storage", lambda store: "s3://bucket/results")
    edit = {"prompt": "warn", "image_urls": [image_server.url_for("wide.png")]}

    @flow
    def default_key():
        return submit_edit(edit)

    @flow
    def explicit_key(job_key: str):
        return submit_edit(edit, job_key=job_key), submit_edit(edit, job_key=job_key)

    def warnings() -> int:
        return len([r for r in caplog.records if LOCK_URL_ENV_VAR in r.getMessage()])

    with caplog.at_level(logging.WARNING):
        default_key()
        assert warnings() == 0
        explicit_key(f"warned-{uuid4().hex[:8]}")
        assert warnings() == 1
        # The job block: the same warning (a fresh process would log it once too).
        locks._reset_warning()
        job = NanoBananaEditJob(
            credentials=RunComfyCredentials(
                api_token=emulator.config.api_tokens[0], base_url=emulator.base_url
            ),
            **edit,
        )
        job.trigger()
        assert warnings() == 1
        job_key = f"warned-block-{uuid4().hex[:8]}"
        job.trigger(job_key=job_key)
        job.trigger(job_key=job_key)
        assert warnings() == 2
