"""Scale-out: a large batch as chunks, each a child run of a deployment of this flow."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from uuid import uuid4

from anyio import to_thread
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger
from prefect.settings import get_current_settings

from ...blocks.credentials import (
    RunComfyCredentials,
)
from ...storage import (
    redact_text,
    strip_signature,
)
from ...storage.backends import open_object
from ...tasks.storage import resolve_location
from .models import BatchJob, BatchRowResult
from .report import ROW_PROGRESS

# How often the parent of a chunked batch asks the server whether a chunk's run ended.
CHUNK_POLL_SECONDS = 5.0


def credentials_parameter(credentials: RunComfyCredentials | str) -> str:
    """The parent's credentials as a child run's parameter: the block's name.

    A block object cannot travel as a parameter (its token is a secret), so a saved
    block goes by its name, which the child loads.
    """
    if isinstance(credentials, str):
        return credentials
    name = credentials._block_document_name
    if name is None:
        raise ValueError(
            "a chunked batch passes its credentials to child runs, so they must be a saved "
            "RunComfyCredentials block (or its name), not an unsaved one"
        )
    return name


def shared_budget_name(flow_run_id: object) -> str:
    """The name of the budget a chunked batch's chunks share: the parent's flow run.

    One name per parent run, so a rerun of the batch starts a budget of its own, and
    every chunk, on whichever worker, reserves in and settles to the same stored total
    (`storage.SharedBudget`, beside the archive's ledger): a fast chunk can use a slow
    one's slack, and together they pass `max_cost_usd` only by what is in flight.
    """
    return f"batch-{flow_run_id or uuid4().hex}"


def max_parameter_bytes() -> int:
    """The size Prefect allows a flow run's parameters, JSON-serialized (0: no limit).

    Prefect 3.9 checks it in the client (`PREFECT_SERVER_API_MAX_PARAMETER_SIZE`,
    512 KiB by default); 3.8 has no such setting, and the same 512 KiB is assumed.
    """
    settings = get_current_settings().server.api
    return int(getattr(settings, "max_parameter_size", _PREFECT_PARAMETER_BYTES))


_PREFECT_PARAMETER_BYTES = 512 * 1024


def check_chunk_parameters(parameters: list[dict[str, Any]], chunk_size: int) -> None:
    """Refuse, before any chunk starts (so before anything is paid), chunks whose rows
    Prefect would refuse as a child run's parameters: a refusal once some chunks ran
    would fail the parent with those chunks' rows paid and running."""
    limit = max_parameter_bytes()
    if limit <= 0:
        return
    sizes = [len(json.dumps(each, separators=(",", ":")).encode()) for each in parameters]
    if (largest := max(sizes, default=0)) <= limit:
        return
    fits = max(1, int(chunk_size * limit / largest * 0.9))
    raise ValueError(
        f"chunk_size={chunk_size} gives a chunk's run {largest:,} bytes of parameters, over "
        f"the {limit:,} Prefect accepts for a flow run; use chunk_size={fits} or less "
        "(nothing was submitted)"
    )


def _read_chunk_rows(location: str, aws_credentials: str | None) -> list[BatchRowResult]:
    """The rows a chunk's run wrote to its results manifest; none if it wrote none."""
    target, s3_client = resolve_location(location, aws_credentials)
    assert target is not None
    backend, key = open_object(target, s3_client)
    raw = backend.read_bytes(key)
    lines = raw.decode("utf-8").splitlines() if raw else []
    return [BatchRowResult.model_validate_json(line) for line in lines if line.strip()]


def _in_parent_numbering(
    chunk: list[BatchJob], start: int, child_rows: list[BatchRowResult], missing: str
) -> list[BatchRowResult]:
    """A chunk's rows with the parent's row numbers and ids; a row the child never reported
    (its run crashed, say) fails with `missing` as the reason."""
    found = {row.row: row for row in child_rows}
    rows = []
    for offset, job in enumerate(chunk, start=1):
        row = found.get(offset) or BatchRowResult(
            row=offset,
            status="failed",
            prompt=job.prompt,
            sources=[strip_signature(source) for source in job.images],
            error=missing,
        )
        rows.append(row.model_copy(update={"row": start + offset, "id": job.id}))
    return rows


async def run_in_chunks(
    jobs: list[BatchJob],
    chunk_size: int,
    chunk_deployment: str,
    options: dict[str, Any],
    results_location: str,
    aws_credentials: str | None,
    shared_budget: str | None = None,
) -> list[BatchRowResult]:
    """Run the rows as concurrent child runs of `chunk_deployment`; their rows, renumbered.

    `shared_budget` names the budget every chunk draws its `max_cost_usd` from (see
    `shared_budget_name`); None: the chunks have no `max_cost_usd`.

    A child returns its rows through its results manifest, written next to the
    parent's, rather than through Prefect's result storage: the manifest is written
    even when the child fails on failed rows, it lives in the archive every worker
    must share anyway (for the ledger), and persisting the flow's result would also
    persist its tasks' results, which hold the API's signed output URLs.
    """
    logger = get_run_logger()
    context = FlowRunContext.get()
    parent = context.flow_run.name if context and context.flow_run else "batch"
    # Fresh per run of the parent: a retried parent never reads an earlier attempt's rows.
    token = uuid4().hex[:8]
    starts = range(0, len(jobs), chunk_size)
    done = 0

    def location_of(index: int) -> str:
        return f"{results_location.removesuffix('.jsonl')}.chunk-{index:03d}-{token}.jsonl"

    def parameters_of(index: int, start: int) -> dict[str, Any]:
        # A row without an id is told apart by its position: give it its position in
        # the parent, so the child finds the same ledger entry as an unchunked run would.
        child_jobs = [
            {**job.model_dump(exclude_none=True), "id": job.id or str(start + offset)}
            for offset, job in enumerate(jobs[start : start + chunk_size], start=1)
        ]
        return {
            **options,
            "jobs": child_jobs,
            "results_uri": location_of(index),
            "chunk_size": None,
            "chunk_deployment": None,
            "shared_budget_name": shared_budget,
        }

    parameters = [parameters_of(index, start) for index, start in enumerate(starts, start=1)]
    check_chunk_parameters(parameters, chunk_size)

    async def run_chunk(index: int, start: int) -> list[BatchRowResult]:
        nonlocal done
        chunk = jobs[start : start + chunk_size]
        location = location_of(index)
        child = await run_deployment(
            name=chunk_deployment,
            parameters=parameters[index - 1],
            flow_run_name=f"{parent}-chunk-{index}-of-{len(starts)}",
            poll_interval=CHUNK_POLL_SECONDS,
            as_subflow=True,
        )
        ended = child.state.name if child.state else "unknown"
        if child.state and child.state.message:
            ended = redact_text(f"{ended} ({child.state.message})")
        rows = f"{start + 1}-{start + len(chunk)}"
        logger.info("Chunk %d (rows %s) ran as flow run %r: %s", index, rows, child.name, ended)
        child_rows = await to_thread.run_sync(_read_chunk_rows, location, aws_credentials)
        missing = (
            f"chunk {index} (flow run {child.name}) ended {ended} without a result for this "
            "row; rerun the batch to retry it (rows already archived are skipped)"
        )
        done += len(chunk)
        if (listener := ROW_PROGRESS.get()) is not None:
            listener(done, len(jobs))
        return _in_parent_numbering(chunk, start, child_rows, missing)

    chunks = await asyncio.gather(
        *(run_chunk(index, start) for index, start in enumerate(starts, start=1))
    )
    return [row for rows in chunks for row in rows]
