"""Planning: validate every row and find what earlier runs did, before anything is paid."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from queue import SimpleQueue
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
    read_manifest,
    redact_text,
    stage_assets,
    strip_signature,
    url_input_problem,
)
from ...tasks.storage import SIGNED_RESULT_OPTIONS, ResolvedLocation, resolve_location
from .models import BatchJob, BatchOptions, _RowPlan
from .sources import KeyedRow, key_listed_rows, listed_rows

# Ledger entries read at once while planning a listed batch (round trips, not CPU).
LOOKUP_PARALLELISM = 16
# The most rows of a listed batch planned into one group: each group is staged at
# once, its staging store checked once.
GROUP_ROWS = 512
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
            plan.job_key = job_key_for(
                job.prompt, job.images, options, row_id=job.id or str(row), content=job.content
            )
        except (ValidationError, StorageError, ValueError) as error:
            plan.error = f"row {row} is invalid: {redact_text(str(error))}"
        plans.append(plan)
    found = ledger.read_many([plan.job_key for plan in plans if plan.job_key])
    for plan in plans:
        versioned = found.get(plan.job_key) if plan.job_key else None
        if versioned is not None:
            plan.entry, plan.version = versioned
        plan.new = plan.job_key is not None and plan.entry is None
    return plans


def plan_keyed_rows(
    keyed: Iterable[KeyedRow],
    defaults: dict[str, Any],
    ledger: Ledger,
    staging: ResolvedLocation | None = None,
) -> Iterator[list[_RowPlan]]:
    """The rows of a listed batch, planned as the listing streams, in groups of what is ready.

    Rows are keyed against one scan of the ledger (`key_listed_rows`) in a thread of
    their own. A new row (a key the scan did not know) is ready at once; a known
    row once its entry is read (archived: skip; submitted: adopt; failed: pay
    again), `LOOKUP_PARALLELISM` reads at a time. So the new images of a nightly
    rerun reach their lanes after the listing, not after thousands of reads of
    images archived earlier; groups come out of the listing's order.

    Each group is what is ready when it is asked for, at most `GROUP_ROWS` rows.
    With `staging`, each group is staged (`_stage_rows`) before it is given;
    without, the caller stages them (a chunked batch's chunks do). The listing
    proved each image exists, so nothing here reads the images themselves: an S3
    input is signed right before its row's submit (`_stage_rows`). Closing the
    iterator stops the listing after its current page and the reads not started.

    Args:
        keyed: From `key_listed_rows`.
        defaults: The batch's edit options.
        ledger: The archive's ledger.
        staging: Where the rows' local inputs go; None: leave the rows unstaged.

    Returns:
        An iterator of groups of planned rows, each row numbered in the listing's order.

    Raises:
        LocationError: The location cannot be listed.
        StorageError: The ledger cannot be listed or an entry read.
    """
    ready: SimpleQueue[_RowPlan | BaseException | None] = SimpleQueue()
    closed = threading.Event()

    def read_entry(plan: _RowPlan) -> None:
        try:
            versioned = ledger.read(plan.job_key)  # type: ignore[arg-type]
        except BaseException as error:  # the consumer raises it
            ready.put(error)
            return
        if versioned is not None:
            plan.entry, plan.version = versioned
        plan.new = plan.entry is None
        ready.put(plan)

    def plan_all() -> None:
        pool = ThreadPoolExecutor(max_workers=LOOKUP_PARALLELISM)
        try:
            for row, item in enumerate(keyed, start=1):
                if closed.is_set():
                    return
                plan = _listed_plan(row, item, defaults)
                if plan.new:
                    ready.put(plan)
                else:
                    pool.submit(read_entry, plan)
        except BaseException as error:
            ready.put(error)
        finally:
            if closed.is_set() and hasattr(keyed, "close"):
                keyed.close()  # its ledger scan, in this thread that iterated it
            pool.shutdown(wait=not closed.is_set(), cancel_futures=closed.is_set())
            ready.put(None)

    # A daemon: a run that stops must not wait for its listing's page to end its process.
    threading.Thread(target=plan_all, name="plan-listed-rows", daemon=True).start()
    try:
        while True:
            items = [ready.get()]  # waits for the first; the rest only if already there
            while len(items) < GROUP_ROWS and not ready.empty():
                items.append(ready.get())
            for item in items:
                if isinstance(item, BaseException):
                    raise item
            group = [item for item in items if isinstance(item, _RowPlan)]
            if group:
                if staging is not None:
                    _stage_rows(group, staging, dry_run=False)
                yield group
            if len(group) < len(items):  # the end (None): nothing comes after it
                return
    finally:
        closed.set()


def _listed_plan(row: int, item: KeyedRow, defaults: dict[str, Any]) -> _RowPlan:
    listed = item.row
    job = listed.job.model_copy(update={"content": listed.content})
    plan = _RowPlan(row=row, job=job, options=dict(defaults), job_key=item.job_key, new=item.new)
    try:
        NanoBananaEditInput(prompt=job.prompt, image_urls=job.images, **plan.options)
    except (ValidationError, ValueError) as error:
        plan.error = f"row {row} is invalid: {redact_text(str(error))}"
    return plan


def _stage_rows(plans: list[_RowPlan], staging: ResolvedLocation, dry_run: bool) -> None:
    """Check the images of rows that still need a submit, `STAGING_PARALLELISM` rows at a
    time, and sign their S3 inputs; a bad image fails only its row.

    Local images are only checked here (the inline caps without a staging location;
    the staging store answers, once): the row uploads or encodes them right before
    its submit (`stage_row_images`), so a batch of thousands pays for its first rows
    while the rest wait their turn, not after every upload. An http(s) input is asked
    for its first bytes (once per URL) before its row is submitted, since the API
    fetches it only after billing. A dry run checks the same and uploads nothing.
    """
    location, s3_client = staging
    probed: dict[str, str | None] = {}
    # A request id known, or a claim in flight: the guard will not submit such a row.
    pending = [
        plan
        for plan in plans
        if not plan.error and not (plan.entry and plan.entry.status != "failed")
    ]

    def stage(plan: _RowPlan, check_target: bool) -> None:
        images = plan.job.images
        if plan.job.content is not None and not dry_run and _all_on_s3(images):
            # Listed from a prefix: the listing proved each object is there, and checking
            # 5,000 of them one by one kept the first submit waiting minutes. Signed (and
            # judged an image) right before the row's submit; a bad one fails its row.
            plan.stage_at_submit = True
            return
        try:
            if check_target:
                check_assets(images, location, s3_client=s3_client)  # the staging store too
            elif dry_run or _has_local_images(images):
                check_sources(images, location, s3_client=s3_client, probe_timeout=None)
            if dry_run:
                return
            if _has_local_images(images):
                plan.stage_at_submit = True
                urls = [image for image in images if image.startswith(("http://", "https://"))]
            else:
                staged = stage_assets(
                    images, location, s3_client=s3_client, check_target=False, url_timeout=None
                )
                plan.image_urls = [asset.url for asset in staged]
                plan.sources = [asset.provenance for asset in staged]
                NanoBananaEditInput(
                    prompt=plan.job.prompt, image_urls=plan.image_urls, **plan.options
                )
                urls = [asset.url for asset in staged if asset.passed_through]
            for url in urls:
                if url not in probed:
                    probed[url] = url_input_problem(url)
                if probed[url] is not None:
                    raise StagingError(probed[url])
        except (StorageError, ValidationError, ValueError) as error:
            plan.error = f"row {plan.row}: {redact_text(str(error))}"

    if not pending:
        return
    if all(plan.job.content is not None and _all_on_s3(plan.job.images) for plan in pending):
        for plan in pending:
            stage(plan, check_target=False)
        return
    # One row checks the staging store for all (the first with local images); the rest go
    # in parallel, each checking it again only if that row failed (so each says why).
    first = next((plan for plan in pending if _has_local_images(plan.job.images)), pending[0])
    stage(first, check_target=True)
    rest = [plan for plan in pending if plan is not first]
    with ThreadPoolExecutor(max_workers=STAGING_PARALLELISM) as pool:
        list(pool.map(stage, rest, [first.error is not None] * len(rest)))


def _all_on_s3(images: list[str]) -> bool:
    return all(image.startswith("s3://") for image in images)


def _has_local_images(images: list[str]) -> bool:
    return any(not image.startswith(("s3://", "http://", "https://")) for image in images)


def stage_row_images(plan: _RowPlan, staging: ResolvedLocation) -> None:
    """Upload a row's local images (checked at planning) to the staging location, or encode
    them inline without one, right before the row's submit."""
    staged = stage_assets(
        plan.job.images, staging.location, s3_client=staging.s3_client, check_target=False
    )
    plan.image_urls = [asset.url for asset in staged]
    plan.sources = [asset.provenance for asset in staged]
    NanoBananaEditInput(prompt=plan.job.prompt, image_urls=plan.image_urls, **plan.options)


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
    staging = resolve_location(staging_uri, aws_credentials)
    await to_thread.run_sync(_stage_rows, plans, staging, dry_run)
    return plans


def plan_location(
    options: BatchOptions, staging: ResolvedLocation | None = None
) -> Iterator[list[_RowPlan]]:
    """List the batch's `images_uri` into planned rows, a group at a time (`plan_keyed_rows`).

    Each image is a row whose id is its path relative to the location; the ledger is
    checked and scanned once. Nothing is listed before the first ``next``.

    Args:
        options: The batch's options, with `images_uri` and `prompt`.
        staging: Where the rows' local inputs go (each group staged as it is planned);
            None: leave the rows unstaged.

    Returns:
        An iterator of groups of planned rows.

    Raises:
        LocationError: The location cannot be listed (on the first ``next``).
        StorageError: The ledger cannot be read.
    """
    assert options.images_uri is not None and options.prompt is not None
    location, s3_client = resolve_location(options.archive_uri, options.aws_credentials)
    ledger = Ledger(location, s3_client=s3_client)
    ledger.check()
    rows = listed_rows(
        options.images_uri,
        options.prompt,
        include=options.include,
        exclude=options.exclude,
        aws_credentials=options.aws_credentials,
    )
    defaults = options.row_defaults
    yield from plan_keyed_rows(key_listed_rows(rows, defaults, ledger), defaults, ledger, staging)


@task(name="plan-listed-batch", **SIGNED_RESULT_OPTIONS)
async def aplan_listed_batch(options: BatchOptions) -> list[_RowPlan]:
    """List `images_uri` into rows and find what earlier runs did, every row before any
    runs (for a dry run, a budget checked up front, chunks to split); the rows are staged
    by the run that pays for them (`_stage_rows`), a chunked batch's by its chunks."""

    def plan() -> list[_RowPlan]:
        plans = [plan for group in plan_location(options) for plan in group]
        return sorted(plans, key=lambda plan: plan.row)

    return await to_thread.run_sync(plan)


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
