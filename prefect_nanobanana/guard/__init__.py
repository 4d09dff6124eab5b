"""The submit guard: every paid submit of the package, at most once per job key.

Two modules, neither of which imports Prefect: `records` (what a job's record
holds and the `RecordStore` it lives in) and `protocol` (claim, adopt, outcome
unknown, archive claims, withdrawal, and the one decision over a record). The
Prefect layer adds its record store and its run's identity (`tasks.guard`,
`tasks.records`). Names resolve on first use, so the storage room can read the
record types without the client.
"""

from .._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        [
            "ClaimOwner",
            "JobStatus",
            "LedgerEntry",
            "MemoryRecordStore",
            "RecordStore",
            "VersionedEntry",
        ],
        ".records",
    ),
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
