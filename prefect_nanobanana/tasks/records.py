"""Prefect's result store as the submit guard's `RecordStore`, for bare tasks and blocks.

The guard's records and their interface live in `prefect_nanobanana.guard.records`
(with `MemoryRecordStore`); the archive's `storage.Ledger` is the store of flows
that have an archive (atomic across machines: a hard link / rename under a lock
locally, `IfNoneMatch` / `IfMatch` on S3). `PrefectRecordStore` keeps a record in
Prefect's result store plus the flow run's labels. Conditional writes hold the
records' lock manager (`locks.py`: Redis when `NANOBANANA_LOCK_URL` is set, atomic
across machines; else a file lock, atomic across the processes of one machine); the
labels carry the request ids to any machine that reruns the flow run.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any
from uuid import UUID, uuid4

from prefect.client.orchestration import get_client
from prefect.filesystems import NullFileSystem
from prefect.results import ResultStore, get_result_store

from .. import observe
from ..guard.records import LedgerEntry, VersionedEntry, version_of
from .locks import (
    is_lock_service_error,
    lock_service_error,
    record_lock_manager,
    warn_if_machine_local,
)

RECORD_LABEL_PREFIX = "nanobanana.job."
_LABEL_SUBMITTING = "submitting"
_LABEL_NOT_SUBMITTED = "not-submitted"
# How long a lock of the result store may be held (a crashed holder's lock expires).
_LOCK_HOLD_SECONDS = 60.0
_LOCK_WAIT_SECONDS = 60.0


def record_names(job_key: str) -> tuple[str, str]:
    """The result-store key and the flow-run label of a job key (safe for paths and labels)."""
    digest = hashlib.sha256(job_key.encode()).hexdigest()[:24]
    return f"nanobanana-submit-{digest}", f"{RECORD_LABEL_PREFIX}{digest}"


def recorded_request_ids(labels: dict[str, Any]) -> list[str]:
    """The request ids a flow run recorded in its labels.

    Args:
        labels: The flow run's labels, as Prefect's API returns them.

    Returns:
        The request ids, in the order they were made.
    """
    return [
        value
        for key, value in labels.items()
        if key.startswith(RECORD_LABEL_PREFIX)
        and isinstance(value, str)
        and value not in (_LABEL_SUBMITTING, _LABEL_NOT_SUBMITTED)
    ]


def _label_value(entry: LedgerEntry) -> str:
    if entry.request_id:
        return entry.request_id
    return _LABEL_SUBMITTING if entry.status == "submitting" else _LABEL_NOT_SUBMITTED


def _from_label(job_key: str, value: Any) -> LedgerEntry | None:
    """What a label alone says (a rerun on a machine whose result store is elsewhere)."""
    if not isinstance(value, str) or not value:
        return None
    now = datetime.now(timezone.utc)
    if value == _LABEL_SUBMITTING:
        # No owner: whoever wrote it is gone, so its outcome is unknown.
        return LedgerEntry(job_key=job_key, status="submitting", submitted_at=now, updated_at=now)
    if value == _LABEL_NOT_SUBMITTED:
        return LedgerEntry(job_key=job_key, status="failed", submitted_at=now, updated_at=now)
    return LedgerEntry(
        job_key=job_key, request_id=value, status="submitted", submitted_at=now, updated_at=now
    )


_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(key: str) -> threading.Lock:
    """This process's lock for one record key (one per key: a record and its flow run's
    labels are locked one inside the other, so keys must not share a lock)."""
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(key, threading.Lock())


class PrefectRecordStore:
    """Records in Prefect's result store, mirrored to the current flow run's labels.

    The result store works for tasks outside a flow run too; the labels live on the
    Prefect API, so a rerun of the flow run on another machine, and the
    `on_cancellation` hook in the runner's process, read them after the flow's
    process is gone. A known request id in either place wins.

    Why it cannot race: a create or replace reads and writes while holding a lock
    for that record (`locks.record_lock_manager`: Redis when `NANOBANANA_LOCK_URL`
    is set, else the result store's own lock manager, else a file lock), so of two
    writers that share the lock one waits for the other and then sees its record.
    A file lock is shared by the processes of one machine only. Label updates of
    one flow run hold a lock too, so concurrent tasks of the run never lose one
    another's labels.
    """

    def __init__(self, result_store: ResultStore | None = None) -> None:
        store = result_store or get_result_store()
        # Never from memory: another process may have written since.
        update: dict[str, Any] = {
            "cache_result_in_memory": False,
            "lock_manager": record_lock_manager(store),
        }
        if isinstance(store.metadata_storage, NullFileSystem):
            # A flow's store (a task's has none): a record is kept with its metadata, in
            # the same place as a task's records.
            update["metadata_storage"] = None
        self.result_store = store.model_copy(update=update)
        self.flow_run_id: UUID | None = observe.current_flow_run_id()
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid4().hex}"

    def warn_if_machine_local(self) -> bool:
        """Warn once per process if these records are shared but their lock is not.

        Callers that name a `job_key` of their own call it: such a key spans runs,
        and runs on two machines may claim it at the same moment.

        Returns:
            Whether this call logged the warning.
        """
        lock_manager = self.result_store.lock_manager
        assert lock_manager is not None
        return warn_if_machine_local(self.result_store, lock_manager)

    def location(self, job_key: str) -> str:
        storage_key, label = record_names(job_key)
        where = f"Prefect result record {storage_key!r}"
        if self.flow_run_id is not None:
            where += f" and label {label!r} of flow run {self.flow_run_id}"
        return where

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        lock_manager = self.result_store.lock_manager
        assert lock_manager is not None
        # Threads of this process take turns first: Prefect's file lock manager reads a
        # lock file another thread may be half-way through writing, which 16 concurrent
        # submits of one flow run hit on PostgreSQL (tests/test_production.py). Another
        # process can still be caught in between: see the retry below.
        with _process_lock(key):
            deadline = time.monotonic() + _LOCK_WAIT_SECONDS
            while True:
                try:
                    acquired = lock_manager.acquire_lock(
                        key,
                        holder=self.holder,
                        acquire_timeout=max(deadline - time.monotonic(), 0.0),
                        hold_timeout=_LOCK_HOLD_SECONDS,
                    )
                    break
                except ValueError:
                    # Prefect's file lock creates its file, then writes who holds it: a
                    # waiter that reads in between finds it empty. Locked, so ask again.
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)
                except Exception as error:
                    if is_lock_service_error(error):
                        raise lock_service_error(error) from error
                    raise
            if not acquired:
                raise TimeoutError(f"could not lock the submit record {key!r}")
            try:
                yield
            finally:
                lock_manager.release_lock(key, holder=self.holder)

    def _read_labels(self) -> dict[str, Any]:
        if self.flow_run_id is None:
            return {}
        with get_client(sync_client=True) as client:
            return client.read_flow_run(self.flow_run_id).labels or {}

    def _read_merged(self, job_key: str) -> LedgerEntry | None:
        storage_key, label = record_names(job_key)
        stored = None
        if self.result_store.exists(storage_key):
            value = self.result_store.read(storage_key, holder=self.holder).result
            stored = LedgerEntry.model_validate(value)
        labelled = _from_label(job_key, self._read_labels().get(label))
        if stored is not None and (stored.request_id or labelled is None):
            return stored
        if labelled is not None and labelled.request_id:
            return labelled
        return stored or labelled

    def read(self, job_key: str) -> VersionedEntry | None:
        entry = self._read_merged(job_key)
        return VersionedEntry(entry, version_of(entry)) if entry is not None else None

    def _write(self, entry: LedgerEntry) -> str:
        storage_key, label = record_names(entry.job_key)
        self.result_store.write(entry.model_dump(mode="json"), key=storage_key, holder=self.holder)
        # Only what the labels say changes the flow run's labels.
        value = _label_value(entry)
        if self.flow_run_id is not None and self._read_labels().get(label) != value:
            with (
                self._locked(f"labels-{self.flow_run_id}"),
                get_client(sync_client=True) as client,
            ):
                client.update_flow_run_labels(self.flow_run_id, {label: value})
        return version_of(entry)

    def ensure_label(self, job_key: str, request_id: str) -> None:
        """Name a request found elsewhere (another run's record) in this run's labels too,
        so this run's cancellation hook finds it.

        Args:
            job_key: The job.
            request_id: The request its record names.
        """
        _, label = record_names(job_key)
        if self.flow_run_id is None or self._read_labels().get(label) == request_id:
            return
        with self._locked(f"labels-{self.flow_run_id}"), get_client(sync_client=True) as client:
            client.update_flow_run_labels(self.flow_run_id, {label: request_id})

    def create(self, entry: LedgerEntry) -> str | None:
        storage_key, _ = record_names(entry.job_key)
        with self._locked(storage_key):
            if self._read_merged(entry.job_key) is not None:
                return None
            return self._write(entry)

    def replace(self, entry: LedgerEntry, version: str) -> str | None:
        storage_key, _ = record_names(entry.job_key)
        with self._locked(storage_key):
            current = self._read_merged(entry.job_key)
            if current is None or version_of(current) != version:
                return None
            return self._write(entry)

    def scan(self) -> list[VersionedEntry]:
        """List the records this flow run's labels name (a result store cannot be listed).

        Returns:
            Those records, with their versions.
        """
        found = []
        for key, value in self._read_labels().items():
            if key.startswith(RECORD_LABEL_PREFIX) and value:
                entry = _from_label(key.removeprefix(RECORD_LABEL_PREFIX), value)
                if entry is not None:
                    found.append(VersionedEntry(entry, version_of(entry)))
        return found
