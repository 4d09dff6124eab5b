"""The `batch_edit` flow: many edits from a list or a manifest, nothing paid twice, nothing lost.

The way of one row: plan (validate, look it up in the ledger) → stage its images
→ then, in one task run `row-N`, submit (the ledger records the request id at
once) → wait → archive → mark archived. Rows run concurrently in one event loop,
sharing one API client, so a 429 slows the whole batch and the poll schedule
learns run times from the rows already finished. Requests in flight are capped
by a Prefect global concurrency limit that all batch runs share, so several flow
runs stay within one API quota: the run works its rows through at most
`max_concurrency` lanes and takes one slot of the limit per lane, in one
acquisition, for as long as it has rows. (Not a slot per row: each acquisition
is a write on the Prefect server, and thousands of them, serialised by Prefect's
client, made the server rather than the API the bottleneck.)

A rerun of the same batch (same manifest and archive) skips rows already
archived and adopts requests already submitted, so a crashed batch resumes
without paying twice. Rows are told apart by their `id`, else by their position:
give rows ids when a manifest may be reordered between runs.

Scale-out: with `chunk_size` and `chunk_deployment`, the run splits its rows into
chunks and runs each as a child run of a deployment of this flow, so the chunks
spread over the workers of that deployment's pool; the parent gathers their rows.
The ledger and the global concurrency limit are what make this safe: children skip
rows already archived, and together they stay within one API quota.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from prefect import flow
from prefect.artifacts import (
    acreate_progress_artifact,
)
from pydantic import Field

from ...blocks.credentials import (
    DEFAULT_CREDENTIALS_BLOCK,
    RunComfyCredentials,
    aresolve_credentials,
)
from ...client import (
    AspectRatio,
    OutputFormat,
    Resolution,
)
from ...storage import (
    DEFAULT_ARCHIVE_URI,
    Ledger,
)
from ...tasks.storage import resolve_location
from .chunks import _credentials_parameter, _run_in_chunks
from .lanes import run_in_lanes
from .limit import DEFAULT_CONCURRENCY_LIMIT, _ensure_concurrency_limit, lane_slots
from .models import BatchEditResult, BatchJob, BatchRowResult, _RowPlan
from .plan import aplan_batch, aread_batch_manifest
from .report import BatchProgress, _finish_batch, _results_location
from .row import _Batch, _run_row, _settled_without_api


@flow(name="nano-banana-batch")
async def batch_edit(
    jobs: list[BatchJob] | None = None,
    manifest_uri: str | None = None,
    archive_uri: str = DEFAULT_ARCHIVE_URI,
    staging_uri: str | None = None,
    aspect_ratio: AspectRatio = "auto",
    resolution: Resolution = "1K",
    output_format: OutputFormat = "png",
    num_images: Annotated[int, Field(ge=1, le=4)] = 1,
    max_concurrency: Annotated[int, Field(ge=1)] = 8,
    concurrency_limit_name: str = DEFAULT_CONCURRENCY_LIMIT,
    allow_partial: bool = False,
    credentials: RunComfyCredentials | str = DEFAULT_CREDENTIALS_BLOCK,
    aws_credentials: str | None = None,
    timeout_seconds: float = 1800,
    results_uri: str | None = None,
    chunk_size: Annotated[int, Field(ge=1)] | None = None,
    chunk_deployment: str | None = None,
) -> BatchEditResult:
    """Run many Nano Banana Pro edits: stage, submit, wait and archive every row.

    Args:
        jobs: The rows, when not read from `manifest_uri`.
        manifest_uri: A JSONL or CSV manifest (local or s3://), one row per edit:
            prompt, images, and optional per-row options and id.
        archive_uri: Where outputs, metadata.json files and the ledger go: a local
            folder, s3://bucket/prefix or s3-bucket://BLOCK/prefix.
        staging_uri: Where local inputs are uploaded for RunComfy to fetch
            (s3://…, s3-bucket://…, or a loopback object store's URL).
        aspect_ratio: Default output ratio of rows that set none.
        resolution: Default resolution of rows that set none.
        output_format: Default format of rows that set none.
        num_images: Default number of images of rows that set none.
        max_concurrency: Requests in flight from this run; also the size of the
            global concurrency limit when this run creates it.
        concurrency_limit_name: The Prefect global concurrency limit shared by all
            runs that use the same RunComfy quota.
        allow_partial: End Completed even when rows failed (after archiving the rest).
        credentials: A `RunComfyCredentials` block or its name ("default" falls back
            to the RUNCOMFY_* environment variables).
        aws_credentials: The name of a prefect-aws `AwsCredentials` block for S3;
            None uses boto3's standard chain and AWS_ENDPOINT_URL.
        timeout_seconds: How long one row may wait for its request.
        results_uri: Where to write the JSONL results manifest; defaults to
            `{archive_uri}/_results/batch-{timestamp}.jsonl`.
        chunk_size: Scale out: with more rows than this, run them in chunks of this
            many, each a child run of `chunk_deployment`, all at once.
        chunk_deployment: The deployment of this flow that runs the chunks, as
            "flow-name/deployment-name" (e.g. "nano-banana-batch/chunk").
    """
    if (jobs is None) == (manifest_uri is None):
        raise ValueError("give exactly one of `jobs` or `manifest_uri`")
    if (chunk_size is None) != (chunk_deployment is None):
        raise ValueError("give both `chunk_size` and `chunk_deployment`, or neither")
    if jobs is None:
        jobs = await aread_batch_manifest(manifest_uri, aws_credentials)
    if chunk_size is not None and chunk_deployment is not None and len(jobs) > chunk_size:
        options = {
            "archive_uri": archive_uri,
            "staging_uri": staging_uri,
            "aspect_ratio": aspect_ratio,
            "resolution": resolution,
            "output_format": output_format,
            "num_images": num_images,
            "max_concurrency": max_concurrency,
            "concurrency_limit_name": concurrency_limit_name,
            "allow_partial": allow_partial,
            "credentials": _credentials_parameter(credentials),
            "aws_credentials": aws_credentials,
            "timeout_seconds": timeout_seconds,
        }
        # Made here, once: children starting together would race to create it.
        await _ensure_concurrency_limit(concurrency_limit_name, max_concurrency)
        results_location = _results_location(archive_uri, results_uri)
        rows = await _run_in_chunks(
            jobs, chunk_size, chunk_deployment, options, results_location, aws_credentials
        )
        return await _finish_batch(rows, results_location, allow_partial, aws_credentials)
    defaults = {
        "aspect_ratio": aspect_ratio,
        "resolution": resolution,
        "output_format": output_format,
        "num_images": num_images,
    }
    plans = await aplan_batch(jobs, defaults, archive_uri, staging_uri, aws_credentials)
    shared_limit = await _ensure_concurrency_limit(concurrency_limit_name, max_concurrency)

    location, s3_client = resolve_location(archive_uri, aws_credentials)
    resolved = await aresolve_credentials(credentials)
    progress_id = await acreate_progress_artifact(
        progress=0.0, description=f"Rows of this batch finished, of {len(plans)}."
    )
    async with resolved.get_async_client() as client:
        batch = _Batch(
            client=client,
            ledger=Ledger(location, s3_client=s3_client),
            archive_uri=archive_uri,
            aws_credentials=aws_credentials,
            max_concurrency=min(max_concurrency, shared_limit),
            timeout_seconds=timeout_seconds,
        )

        progress = BatchProgress(len(plans), progress_id)
        outcomes: dict[int, BatchRowResult] = {}
        runnable: list[_RowPlan] = []
        for plan in plans:
            settled = _settled_without_api(plan)
            if settled is None:
                runnable.append(plan)
            else:
                outcomes[plan.row] = settled
                progress.row_done()

        async def run_row(plan: _RowPlan, request_ended: asyncio.Event) -> None:
            outcomes[plan.row] = await _run_row(plan, batch, request_ended)
            progress.row_done()

        lanes = min(batch.lanes, len(runnable))
        await run_in_lanes(runnable, lanes, run_row, hold=lane_slots(concurrency_limit_name, lanes))
        await progress.finish()
        rows = [outcomes[plan.row] for plan in plans]

    return await _finish_batch(
        rows, _results_location(archive_uri, results_uri), allow_partial, aws_credentials
    )
