"""Planning: validate every row and find what earlier runs did, before anything is paid."""

from __future__ import annotations

from functools import partial
from typing import Any

from anyio import to_thread
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import ValidationError

from ...client import (
    NanoBananaEditInput,
)
from ...storage import (
    Ledger,
    ManifestError,
    StorageError,
    job_key_for,
    read_manifest,
    redact_text,
    stage_assets,
    strip_signature,
)
from ...tasks.storage import SIGNED_RESULT_OPTIONS, resolve_location
from .models import BatchJob, _RowPlan


def _plan_rows(jobs: list[BatchJob], defaults: dict[str, Any], ledger: Ledger) -> list[_RowPlan]:
    """Validate every row and look it up in the ledger, before anything is paid.

    What a row's entry says now is a hint (rows archived earlier are skipped); the
    submit guard decides again, atomically, when the row runs.
    """
    plans = []
    for row, job in enumerate(jobs, start=1):
        options = {
            name: value if value is not None else defaults[name]
            for name, value in job.model_dump(include=set(defaults)).items()
        }
        plan = _RowPlan(row=row, job=job, options=options)
        try:
            NanoBananaEditInput(prompt=job.prompt, image_urls=job.images, **options)
            plan.job_key = job_key_for(job.prompt, job.images, options, row_id=job.id or str(row))
            found = ledger.read(plan.job_key)
            if found is not None:
                plan.entry, plan.version = found
        except (ValidationError, StorageError, ValueError) as error:
            plan.error = f"row {row} is invalid: {redact_text(str(error))}"
        plans.append(plan)
    return plans


def _stage_rows(
    plans: list[_RowPlan], staging_uri: str | None, aws_credentials: str | None
) -> None:
    """Stage the images of rows that still need a submit; a bad image fails only its row."""
    location, s3_client = resolve_location(staging_uri, aws_credentials)
    for plan in plans:
        # A request id known, or a claim in flight: the guard will not submit this row.
        if plan.error or (plan.entry and plan.entry.status != "failed"):
            continue
        try:
            staged = stage_assets(plan.job.images, location, s3_client=s3_client)
            plan.image_urls = [asset.url for asset in staged]
            NanoBananaEditInput(prompt=plan.job.prompt, image_urls=plan.image_urls, **plan.options)
        except (StorageError, ValidationError, ValueError) as error:
            plan.error = f"row {plan.row}: {redact_text(str(error))}"


@task(name="plan-batch", **SIGNED_RESULT_OPTIONS)
async def aplan_batch(
    jobs: list[BatchJob],
    defaults: dict[str, Any],
    archive_uri: str,
    staging_uri: str | None,
    aws_credentials: str | None,
) -> list[_RowPlan]:
    """Validate rows, find what earlier runs did, stage the inputs still needed."""
    location, s3_client = resolve_location(archive_uri, aws_credentials)
    ledger = Ledger(location, s3_client=s3_client)
    await to_thread.run_sync(ledger.check)
    plans = await to_thread.run_sync(_plan_rows, jobs, defaults, ledger)
    await to_thread.run_sync(_stage_rows, plans, staging_uri, aws_credentials)
    return plans


@task(name="read-manifest", cache_policy=NO_CACHE)
async def aread_batch_manifest(
    manifest_uri: str, aws_credentials: str | None = None
) -> list[BatchJob]:
    """The rows of a JSONL or CSV manifest, local or on S3."""
    location, s3_client = resolve_location(manifest_uri, aws_credentials)
    rows = await to_thread.run_sync(partial(read_manifest, location, s3_client=s3_client))
    return [_batch_job(row, strip_signature(manifest_uri)) for row in rows]


def _batch_job(row: dict[str, Any], shown: str) -> BatchJob:
    """A manifest row as a `BatchJob`; a bad value is a `ManifestError` naming its line."""
    line = row["line"]
    try:
        return BatchJob.model_validate({k: v for k, v in row.items() if k != "line"})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        )
        raise ManifestError(f"{shown}:{line}: {problems}") from None
