"""The submit guard's records: what is known of one logical job, and where it is kept.

A record is a `LedgerEntry` per job key, read with a *version* and written only
conditionally, through a `RecordStore`:

- `create(entry)` succeeds for exactly one writer of a job key (the claim);
- `replace(entry, version)` succeeds only if nobody wrote since `version` was read;
- `scan()` reads every record at once (a batch can plan from one listing).

The stores: the archive's `storage.Ledger` (local folder or S3, atomic across
machines), Prefect's result store (`tasks.records.PrefectRecordStore`, for bare
tasks and blocks), and `MemoryRecordStore` (one process: tests, the CLI's raw
submit). Knows nothing of Prefect, of the API, or of where a store keeps its bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import threading
from typing import Any, Literal, NamedTuple, Protocol

from pydantic import BaseModel, Field

__all__ = [
    "ClaimOwner",
    "JobStatus",
    "LedgerEntry",
    "MemoryRecordStore",
    "RecordStore",
    "VersionedEntry",
    "version_of",
]

JobStatus = Literal["submitting", "submitted", "archiving", "archived", "failed"]


class ClaimOwner(BaseModel):
    """Who holds a claim on a job (its submit, or its archiving), and since when.

    Enough to tell a live claim from one whose process died: the same process knows
    its own live claims by ``token``, the same host can ask whether ``pid`` still
    runs, and any other machine can only wait until the claim is old.
    """

    token: str = Field(description="One claim attempt, unique.")
    host: str
    pid: int
    flow_run_id: str | None = None
    claimed_at: dt.datetime


class LedgerEntry(BaseModel):
    """What is known about one logical job: its request, and how far it got.

    ``previous_request_ids`` lists earlier submits of the same job (e.g. a rerun
    after a failure), so every paid request stays traceable.
    """

    job_key: str
    request_id: str | None = Field(
        default=None, description="None only while `submitting`: the outcome is not known yet."
    )
    status: JobStatus
    submitted_at: dt.datetime
    updated_at: dt.datetime
    facts: dict[str, Any] = Field(default_factory=dict)
    metadata_location: str | None = None
    output_locations: list[str] = Field(default_factory=list)
    error: str | None = None
    previous_request_ids: list[str] = Field(default_factory=list)
    owner: ClaimOwner | None = Field(default=None, description="Who claimed the submit.")
    archiver: ClaimOwner | None = Field(default=None, description="Who claimed the archiving.")
    cost: float | None = Field(default=None, description="What RunComfy billed, once known.")


class VersionedEntry(NamedTuple):
    """An entry as read, with the version a conditional `Ledger.replace` must name."""

    entry: LedgerEntry
    version: str


class RecordStore(Protocol):
    """Where the submit guard keeps its records; `storage.Ledger` is one."""

    def read(self, job_key: str) -> VersionedEntry | None:
        """Read a job's record.

        Args:
            job_key: The job.

        Returns:
            The record with its version, or None if the job was never claimed.
        """
        ...

    def create(self, entry: LedgerEntry) -> str | None:
        """Write a job's first record, atomically: of two writers exactly one wins.

        Args:
            entry: The record (its `job_key` names the job).

        Returns:
            The new record's version, or None when one exists already (a lost claim).
        """
        ...

    def replace(self, entry: LedgerEntry, version: str) -> str | None:
        """Overwrite a job's record only if it is still at `version`.

        Args:
            entry: The new record.
            version: The version the writer read (or wrote) last.

        Returns:
            The new version, or None when someone else wrote in between.
        """
        ...

    def scan(self) -> list[VersionedEntry]:
        """List the records.

        Returns:
            Every record this store can list, with its version.
        """
        ...

    def location(self, job_key: str) -> str:
        """Where a job's record is, for messages that tell a person what to look at.

        Args:
            job_key: The job.

        Returns:
            A path, an `s3://` location or a description of the record's place.
        """
        ...


def version_of(entry: LedgerEntry) -> str:
    """A version for stores that keep no versions of their own: the entry's digest."""
    return hashlib.sha256(entry.model_dump_json().encode()).hexdigest()


class MemoryRecordStore:
    """Records in this process's memory: as conditional as the others, gone with the process."""

    def __init__(self) -> None:
        self._entries: dict[str, LedgerEntry] = {}
        self._lock = threading.Lock()

    def read(self, job_key: str) -> VersionedEntry | None:
        with self._lock:
            entry = self._entries.get(job_key)
        return VersionedEntry(entry, version_of(entry)) if entry is not None else None

    def create(self, entry: LedgerEntry) -> str | None:
        with self._lock:
            if entry.job_key in self._entries:
                return None
            self._entries[entry.job_key] = entry
        return version_of(entry)

    def replace(self, entry: LedgerEntry, version: str) -> str | None:
        with self._lock:
            current = self._entries.get(entry.job_key)
            if current is None or version_of(current) != version:
                return None
            self._entries[entry.job_key] = entry
        return version_of(entry)

    def scan(self) -> list[VersionedEntry]:
        with self._lock:
            entries = list(self._entries.values())
        return [VersionedEntry(entry, version_of(entry)) for entry in entries]

    def location(self, job_key: str) -> str:
        return f"memory of process {os.getpid()} (job {job_key})"
