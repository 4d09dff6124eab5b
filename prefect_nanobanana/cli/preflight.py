"""A batch's pre-flight: every row checked before Prefect's server starts or anything is paid.

The manifest is read (its shape, each row's options against the API's
vocabulary), every local input is checked as staging would (exists, is an image,
within the inline caps when there is no staging location) and every http(s)
input is asked for its first bytes with a short timeout, because the API fetches
URLs only after the submit is billed. All problems come back at once, each with
its manifest line. Nothing of Prefect is imported here: a bad manifest costs a
second, not a server start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..client import NanoBananaEditInput
from ..storage import StagingError, check_sources, read_manifest
from ..storage.manifest import OPTION_KEYS

# URL probes wait on the network, not the CPU: a few at once keep a long manifest quick.
_PROBE_WORKERS = 8


@dataclass(frozen=True)
class Preflight:
    """What the pre-flight found: how many rows, and the problems (each naming its line).

    `unreadable` counts the rows whose options are wrong: the flow cannot read such a
    manifest at all, so even `--allow-partial` cannot skip them.
    """

    rows: int
    problems: list[str]
    unreadable: int = 0


def preflight_batch(
    manifest_uri: str | os.PathLike[str],
    staging_uri: str | None,
    *,
    probe_timeout: float = 5.0,
) -> Preflight:
    """Check every row of the manifest; a malformed manifest raises `ManifestError`."""
    rows = read_manifest(manifest_uri)
    with ThreadPoolExecutor(max_workers=_PROBE_WORKERS) as pool:
        found = list(pool.map(lambda row: _row_problem(row, staging_uri, probe_timeout), rows))
    return Preflight(
        rows=len(rows),
        problems=[problem for problem, _ in found if problem],
        unreadable=sum(unreadable for _, unreadable in found),
    )


def _row_problem(
    row: Mapping[str, Any], staging_uri: str | None, probe_timeout: float
) -> tuple[str | None, bool]:
    """The row's problem (None when it can run), and whether it is in its options."""
    options = {key: row[key] for key in OPTION_KEYS if key != "id" and row.get(key) is not None}
    try:
        NanoBananaEditInput(prompt=row["prompt"], image_urls=row["images"], **options)
    except ValidationError as error:
        reasons = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            for item in error.errors()
        )
        return f"line {row['line']}: {reasons}", True
    try:
        check_sources(row["images"], staging_uri, probe_timeout=probe_timeout)
    except StagingError as error:
        return f"line {row['line']}: {error}", False
    return None, False
