"""The ledger: a small record per logical job, so no job is ever paid twice.

The Model API has no idempotency key and every submit is billed. So each job has
a record under ``{archive}/_ledger/{job_key}.json``: claimed ("submitting") before
the submit, the request id right after, then how the job ended. Several runs, on
several machines, may work on one archive at once, so the ledger offers only
*conditional* writes: `create` succeeds for exactly one writer, and `replace` only
if nobody wrote since the version that was read (see `backends`). The rules of
what may follow what live in one place, the submit guard of the Prefect layer;
this module only stores records. ``job_key_for`` gives the same logical job the
same key across runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from ..guard.records import LedgerEntry, VersionedEntry
from .backends import DEFAULT_ARCHIVE_URI, open_backend
from .errors import LedgerError
from .locations import LocalLocation, join_key, parse_location, redact

LEDGER_PREFIX = "_ledger"
LOOKUP_PARALLELISM = 16
_JOB_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def job_key_for(
    prompt: str,
    sources: Sequence[str | os.PathLike[str]],
    options: Mapping[str, Any] | None = None,
    row_id: str | None = None,
    scope: str | None = None,
    content: str | None = None,
) -> str:
    """The one job-key scheme: sha256 of a job's prompt, sources, options, row id, scope
    and content.

    Local paths are made absolute, URLs signature-stripped (so restaging, with new
    signatures, does not change the key) and data: URIs named by their digest;
    options set to None count as unset.
    Defaults are not filled in here — pass options already normalised if ``"1K"``
    and an omitted resolution should be the same job. ``row_id`` tells identical
    rows of a batch apart (two copies of a row are two paid jobs). ``scope`` narrows
    the key to one context (a flow run id: "this run's edit", not "this edit ever");
    unset, it is left out, so keys made before it existed stay the same. ``content``
    is an identity of the sources' bytes (`ListedImage.content`: an S3 ETag, a local
    sha256) for rows read from a location whose files may be replaced under the same
    names: a changed image is a new job. Unset, it is left out too.
    """
    canonical = {
        "prompt": prompt,
        "sources": [_canonical_source(source) for source in sources],
        "options": {
            key: value for key, value in sorted((options or {}).items()) if value is not None
        },
        "row_id": row_id,
        **({"scope": scope} if scope is not None else {}),
        **({"content": content} if content is not None else {}),
    }
    encoded = json.dumps(redact(canonical), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()


def _canonical_source(source: str | os.PathLike[str]) -> str:
    if isinstance(source, str) and source[:5].lower() == "data:":
        # An inline image (what `stage_images` gives without a staging store) is its
        # bytes: named by their digest, it is the same job whoever encoded it.
        return "data:sha256=" + hashlib.sha256(source.encode()).hexdigest()
    location = parse_location(source)
    if isinstance(location, LocalLocation):
        return str(location.path.absolute())
    return str(location)


class Ledger:
    """Job records under ``{archive_uri}/_ledger/``, local or on S3, written conditionally.

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

    def read(self, job_key: str) -> VersionedEntry | None:
        """The entry for ``job_key`` with its version, or None if the job was never claimed."""
        found = self.backend.read_versioned(_entry_key(job_key))
        if found is None:
            return None
        raw, version = found
        try:
            return VersionedEntry(LedgerEntry.model_validate_json(raw), version)
        except ValidationError as exc:
            raise LedgerError(
                f"ledger entry {self.location(job_key)} is unreadable: {exc}"
            ) from exc

    def lookup(self, job_key: str) -> LedgerEntry | None:
        """The entry for ``job_key``, or None if the job was never claimed."""
        found = self.read(job_key)
        return found.entry if found is not None else None

    def read_many(
        self, job_keys: Sequence[str], parallel: int = LOOKUP_PARALLELISM
    ) -> dict[str, VersionedEntry | None]:
        """`read` of many jobs at once: one listing of the ledger, reads of those that exist.

        Planning a batch read every row's entry one after another, a round trip each
        before the first submit. The listing costs one request per 1,000 entries; only
        the entries it names are read, `parallel` at a time.
        """
        existing = self.known_keys()
        found: dict[str, VersionedEntry | None] = dict.fromkeys(job_keys)
        to_read = sorted(set(job_keys) & existing)
        with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(to_read) or 1))) as pool:
            for job_key, versioned in zip(to_read, pool.map(self.read, to_read), strict=True):
                found[job_key] = versioned
        return found

    def known_keys(self) -> set[str]:
        """The job keys that have an entry, from one listing (a request per 1,000 entries).

        Enough to plan a listed batch as it streams: a row whose key is not here is
        new (it needs a paid submit, no read); only the others' entries need reading.
        A snapshot: the submit guard decides again, atomically, when the row runs.

        Returns:
            The set of job keys with an entry under ``_ledger/``.
        """
        return {
            name.removesuffix(".json")
            for key in self.backend.list_keys(LEDGER_PREFIX)
            if (name := key.rsplit("/", 1)[-1]).endswith(".json")
        }

    def create(self, entry: LedgerEntry) -> str | None:
        """Write a first entry for its job; its version, or None when one exists already."""
        return self.backend.create_bytes(_entry_key(entry.job_key), _encode(entry), _JSON)

    def replace(self, entry: LedgerEntry, version: str) -> str | None:
        """Overwrite the job's entry if it is still at ``version``; the new version, or None."""
        return self.backend.replace_bytes(_entry_key(entry.job_key), _encode(entry), _JSON, version)

    def scan(self) -> list[VersionedEntry]:
        """Every entry with its version, from one listing of the ledger's prefix."""
        found = []
        for key in self.backend.list_keys(LEDGER_PREFIX):
            if key.endswith(".json"):
                versioned = self.read(key.rsplit("/", 1)[-1].removesuffix(".json"))
                if versioned is not None:
                    found.append(versioned)
        return found

    def entries(self) -> list[LedgerEntry]:
        """Every entry, sorted by submit time."""
        return sorted(
            (versioned.entry for versioned in self.scan()),
            key=lambda entry: (entry.submitted_at, entry.job_key),
        )


_JSON = "application/json"


def _encode(entry: LedgerEntry) -> bytes:
    # URLs in facts and errors lose their signatures: a ledger is a file we write.
    return json.dumps(redact(entry.model_dump(mode="json")), indent=2).encode()


def _entry_key(job_key: str) -> str:
    if not _JOB_KEY_RE.match(job_key):
        raise ValueError(f"job key {job_key!r} must be 1-200 letters, digits, '.', '_' or '-'")
    return join_key(LEDGER_PREFIX, f"{job_key}.json")
