"""Planning: validate every row and find what earlier runs did, before anything is paid."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from anyio import to_thread
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import ValidationError

from ...client import (
    NanoBananaEditInput,
)
from ...client.pricing import CostEstimate, estimate_cost, row_estimate_usd
from ...storage import (
    Ledger,
    ManifestError,
    StagingError,
    StorageError,
    check_assets,
    check_sources,
    job_key_for,
    probe_image_url,
    read_manifest,
    redact_text,
    stage_assets,
    strip_signature,
)
from ...tasks.storage import SIGNED_RESULT_OPTIONS, resolve_location
from .models import BatchJob, _RowPlan

# Rows staged at once: uploads are round trips, not CPU; bounded so a batch of
# thousands opens a pool's worth of connections, not thousands.
STAGING_PARALLELISM = 16


def _plan_rows(jobs: list[BatchJob], defaults: dict[str, Any], ledger: Ledger) -> list[_RowPlan]:
    """Validate every row and look it up in the ledger, before anything is paid.

    What a row's entry says now is a hint (rows archived earlier are skipped); the
    submit guard decides again, atomically, when the row runs. The lookups are one
    listing of the ledger plus reads of the entries that exist (`Ledger.read_many`):
    a round trip per row, one after another, kept a 5,000-row batch on S3 waiting
    minutes for its first submit.
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
        except (ValidationError, StorageError, ValueError) as error:
            plan.error = f"row {row} is invalid: {redact_text(str(error))}"
        plans.append(plan)
    found = ledger.read_many([plan.job_key for plan in plans if plan.job_key])
    for plan in plans:
        versioned = found.get(plan.job_key) if plan.job_key else None
        if versioned is not None:
            plan.entry, plan.version = versioned
    return plans


def _stage_rows(
    plans: list[_RowPlan], staging_uri: str | None, aws_credentials: str | None, dry_run: bool
) -> None:
    """Stage the images of rows that still need a submit, `STAGING_PARALLELISM` rows at a
    time; a bad image fails only its row.

    An http(s) input is asked for its first bytes (once per URL) before its row is
    submitted, since the API fetches it only after billing. Without a staging
    location local images are only checked here (inline caps included); the row
    encodes them right before its submit. A dry run checks the same (sources,
    staging store) and uploads nothing.
    """
    location, s3_client = resolve_location(staging_uri, aws_credentials)
    probed: dict[str, str | None] = {}
    # A request id known, or a claim in flight: the guard will not submit such a row.
    pending = [
        plan
        for plan in plans
        if not plan.error and not (plan.entry and plan.entry.status != "failed")
    ]

    def stage(plan: _RowPlan, check_target: bool) -> None:
        try:
            if dry_run:
                check_assets(plan.job.images, location, s3_client=s3_client)
                return
            if location is None and _has_local_images(plan.job.images):
                # Checked now (URLs probed too), encoded at submit; the count is checked then.
                check_sources(plan.job.images, s3_client=s3_client)
                plan.inline_at_submit = True
                return
            staged = stage_assets(
                plan.job.images, location, s3_client=s3_client, check_target=check_target
            )
            for asset in staged:
                if asset.passed_through:
                    if asset.url not in probed:
                        probed[asset.url] = probe_image_url(asset.url)
                    if probed[asset.url] is not None:
                        raise StagingError(probed[asset.url])
            plan.image_urls = [asset.url for asset in staged]
            plan.sources = [asset.provenance for asset in staged]
            NanoBananaEditInput(prompt=plan.job.prompt, image_urls=plan.image_urls, **plan.options)
        except (StorageError, ValidationError, ValueError) as error:
            plan.error = f"row {plan.row}: {redact_text(str(error))}"

    if not pending:
        return
    # The first row checks the target (bucket, store) for all; the rest go in parallel,
    # each checking again only if that first row failed (so each says why).
    stage(pending[0], check_target=True)
    check_each = pending[0].error is not None
    with ThreadPoolExecutor(max_workers=STAGING_PARALLELISM) as pool:
        list(pool.map(stage, pending[1:], [check_each] * (len(pending) - 1)))


def _has_local_images(images: list[str]) -> bool:
    return any(not image.startswith(("s3://", "http://", "https://")) for image in images)


def inline_images(plan: _RowPlan) -> None:
    """Encode a row's local images (checked at planning) as data: URIs, right before its submit."""
    staged = stage_assets(plan.job.images)
    plan.image_urls = [asset.url for asset in staged]
    plan.sources = [asset.provenance for asset in staged]


def estimate_rows(
    plans: list[_RowPlan],
    base_price_usd: float | None,
    resolution_factors: dict[str, float] | None,
) -> CostEstimate | None:
    """Give each row that still needs a paid submit its estimate; their sum (None: no price)."""
    if base_price_usd is None:
        return None
    to_pay = [plan for plan in plans if plan.needs_paid_submit]
    for plan in to_pay:
        plan.estimated_cost = row_estimate_usd(
            base_price_usd,
            resolution=plan.options["resolution"],
            num_images=plan.options["num_images"],
            resolution_factors=resolution_factors,
        )
    return estimate_cost(
        base_price_usd,
        [(plan.options["resolution"], plan.options["num_images"]) for plan in to_pay],
        resolution_factors=resolution_factors,
    )


@task(name="plan-batch", **SIGNED_RESULT_OPTIONS)
async def aplan_batch(
    jobs: list[BatchJob],
    defaults: dict[str, Any],
    archive_uri: str,
    staging_uri: str | None,
    aws_credentials: str | None,
    dry_run: bool = False,
) -> list[_RowPlan]:
    """Validate rows, find what earlier runs did, stage the inputs still needed."""
    location, s3_client = resolve_location(archive_uri, aws_credentials)
    ledger = Ledger(location, s3_client=s3_client)
    await to_thread.run_sync(ledger.check)
    plans = await to_thread.run_sync(_plan_rows, jobs, defaults, ledger)
    await to_thread.run_sync(_stage_rows, plans, staging_uri, aws_credentials, dry_run)
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
