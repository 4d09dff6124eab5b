"""The ledger: a small record per logical job, so a crashed batch never pays twice.

The Model API has no idempotency key and every submit is billed. So right after a
submit the request id is written under ``{archive}/_ledger/{job_key}.json``; a
rerun of the batch looks each job up first and resumes waiting on the recorded
request instead of submitting again. ``job_key_for`` gives the same logical job
the same key across runs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from .backends import DEFAULT_ARCHIVE_URI, open_backend
from .errors import LedgerError
from .locations import LocalLocation, join_key, parse_location, redact, redact_text

LEDGER_PREFIX = "_ledger"
LOOKUP_PARALLELISM = 16
_JOB_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")

JobStatus = Literal["submitting", "submitted", "archived", "failed"]


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


def job_key_for(
    prompt: str,
    sources: Sequence[str | os.PathLike[str]],
    options: Mapping[str, Any] | None = None,
    row_id: str | None = None,
) -> str:
    """A stable key for a logical job: sha256 of its prompt, sources, options and row id.

    Local paths are made absolute and URLs signature-stripped, so restaging (new
    signatures) does not change the key; options set to None count as unset.
    Defaults are not filled in here — pass options already normalised if ``"1K"``
    and an omitted resolution should be the same job. ``row_id`` tells identical
    rows of a batch apart (two copies of a row are two paid jobs).
    """
    canonical = {
        "prompt": prompt,
        "sources": [_canonical_source(source) for source in sources],
        "options": {
            key: value for key, value in sorted((options or {}).items()) if value is not None
        },
        "row_id": row_id,
    }
    encoded = json.dumps(redact(canonical), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()


def _canonical_source(source: str | os.PathLike[str]) -> str:
    location = parse_location(source)
    if isinstance(location, LocalLocation):
        return str(location.path.absolute())
    return str(location)


class Ledger:
    """Job records under ``{archive_uri}/_ledger/``, local or on S3.

    Nothing touches the network until used; call :meth:`check` before the first
    paid submit so a missing bucket fails early.
    """

    def __init__(
        self, archive_uri: str | os.PathLike[str] = DEFAULT_ARCHIVE_URI, s3_client: Any = None
    ) -> None:
        self.backend = open_backend(archive_uri, s3_client)

    def check(self) -> None:
        """Raise a clear error now if the ledger cannot be written (e.g. missing bucket)."""
        self.backend.check()

    def location(self, job_key: str) -> str:
        """Where the entry for ``job_key`` is stored."""
        return self.backend.location(_entry_key(job_key))

    def record_submitting(self, job_key: str) -> LedgerEntry:
        """Mark ``job_key`` as being submitted; call right before the (billed) submit.

        If the process dies between the submit and :meth:`record_submit`, a rerun
        finds this marker without a request id and must not submit blindly again.
        """
        now = _now()
        previous = self.lookup(job_key)
        history = list(previous.previous_request_ids) if previous else []
        if previous is not None and previous.request_id:
            history.append(previous.request_id)
        return self._write(
            LedgerEntry(
                job_key=job_key,
                status="submitting",
                submitted_at=now,
                updated_at=now,
                previous_request_ids=history,
            )
        )

    def record_submit(self, job_key: str, request_id: str, **facts: Any) -> LedgerEntry:
        """Record that ``job_key`` was submitted as ``request_id``; call right after the submit.

        ``facts`` (model id, parameters, staged sources, estimated cost…) are kept
        with URLs signature-stripped. Recording a new request for a known job keeps
        the old request id in ``previous_request_ids``.
        """
        now = _now()
        previous = self.lookup(job_key)
        history = []
        if previous is not None:
            history = previous.previous_request_ids
            if previous.request_id and previous.request_id != request_id:
                history = [*history, previous.request_id]
        entry = LedgerEntry(
            job_key=job_key,
            request_id=request_id,
            status="submitted",
            submitted_at=now,
            updated_at=now,
            facts=redact(facts),
            previous_request_ids=history,
        )
        return self._write(entry)

    def lookup(self, job_key: str) -> LedgerEntry | None:
        """The entry for ``job_key``, or None if the job was never submitted."""
        raw = self.backend.read_bytes(_entry_key(job_key))
        if raw is None:
            return None
        try:
            return LedgerEntry.model_validate_json(raw)
        except ValidationError as exc:
            raise LedgerError(
                f"ledger entry {self.location(job_key)} is unreadable: {exc}"
            ) from exc

    def lookup_many(
        self, job_keys: Sequence[str], parallel: int = LOOKUP_PARALLELISM
    ) -> dict[str, LedgerEntry | None]:
        """The entries of many jobs at once: one listing of the ledger, reads of those that exist.

        Planning a batch looked every row up one after another, a round trip each
        before the first submit. The listing costs one request per 1,000 entries; only
        the entries it names are read, `parallel` at a time.
        """
        wanted = set(job_keys)
        existing = {
            name.removesuffix(".json")
            for key in self.backend.list_keys(LEDGER_PREFIX)
            if (name := key.rsplit("/", 1)[-1]).endswith(".json")
        }
        found: dict[str, LedgerEntry | None] = dict.fromkeys(job_keys)
        to_read = sorted(wanted & existing)
        with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(to_read) or 1))) as pool:
            for job_key, entry in zip(to_read, pool.map(self.lookup, to_read), strict=True):
                found[job_key] = entry
        return found

    def mark_archived(
        self, job_key: str, metadata_location: str, output_locations: Sequence[str]
    ) -> LedgerEntry:
        """Record that the job's outputs are safely archived; the job is done."""
        entry = self._require(job_key)
        return self._write(
            entry.model_copy(
                update={
                    "status": "archived",
                    "updated_at": _now(),
                    "metadata_location": metadata_location,
                    "output_locations": list(output_locations),
                    "error": None,
                }
            )
        )

    def mark_failed(self, job_key: str, error: str | BaseException) -> LedgerEntry:
        """Record that the job failed (the text is kept with URLs signature-stripped)."""
        entry = self._require(job_key)
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        return self._write(
            entry.model_copy(
                update={"status": "failed", "updated_at": _now(), "error": redact_text(text)}
            )
        )

    def entries(self) -> list[LedgerEntry]:
        """Every entry, sorted by submit time."""
        found = []
        for key in self.backend.list_keys(LEDGER_PREFIX):
            if key.endswith(".json"):
                entry = self.lookup(key.rsplit("/", 1)[-1].removesuffix(".json"))
                if entry is not None:
                    found.append(entry)
        return sorted(found, key=lambda entry: (entry.submitted_at, entry.job_key))

    def _require(self, job_key: str) -> LedgerEntry:
        entry = self.lookup(job_key)
        if entry is None:
            raise LedgerError(f"no ledger entry for job {job_key}")
        return entry

    def _write(self, entry: LedgerEntry) -> LedgerEntry:
        data = entry.model_dump_json(indent=2).encode()
        self.backend.write_bytes(_entry_key(entry.job_key), data, "application/json")
        return entry


def _entry_key(job_key: str) -> str:
    if not _JOB_KEY_RE.match(job_key):
        raise ValueError(f"job key {job_key!r} must be 1-200 letters, digits, '.', '_' or '-'")
    return join_key(LEDGER_PREFIX, f"{job_key}.json")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
