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

A run that stops while rows wait (a cancel, SIGTERM, a timeout) withdraws each of
their requests still queued and marks its record failed, so the rerun submits that
row again. A run started directly has no runner to stop it: a cancel from the UI
only sets its state, so it reads its state while rows run and stops itself.

Scale-out: with `chunk_size` and `chunk_deployment`, the run splits its rows into
chunks and runs each as a child run of a deployment of this flow, so the chunks
spread over the workers of that deployment's pool; the parent gathers their rows.
The ledger and the global concurrency limit are what make this safe: children skip
rows already archived, and together they stay within one API quota.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from functools import partial
from typing import Annotated, Any

from anyio import to_thread
from prefect import flow
from prefect.artifacts import (
    acreate_progress_artifact,
)
from prefect.logging import get_run_logger
from pydantic import Field

from ... import observe
from ...blocks.credentials import (
    DEFAULT_CREDENTIALS_BLOCK,
    RunComfyCredentials,
    aresolve_credentials,
    daily_budget_of,
    warn_of_signed_urls_in_parameters,
)
from ...client import (
    NANO_BANANA_EDIT_MODEL_ID,
    APIConnectionError,
    AspectRatio,
    AsyncRunComfyClient,
    AuthenticationError,
    OutputFormat,
    PermissionDeniedError,
    Resolution,
    RunComfyError,
)
from ...client.pricing import (
    BudgetExceededError,
    CostEstimate,
    base_price_of,
    format_usd,
    refuse_over_budget,
)
from ...guard.protocol import Decision
from ...pipeline import Budget, Pipeline, SharedTotal
from ...previews import DEFAULT_PREVIEW_ROWS
from ...stop import Stop
from ...storage import (
    DEFAULT_ARCHIVE_URI,
    Ledger,
    RunTimeHistory,
    strip_signature,
)
from ...storage.budget import DAILY_BUDGET_NAME, DailyBudget, SharedBudget
from ...tasks.storage import ResolvedLocation, resolve_location
from ..stopping import RunStop
from .chunks import credentials_parameter, run_in_chunks, shared_budget_name
from .lanes import run_in_lanes
from .limit import DEFAULT_CONCURRENCY_LIMIT, _ensure_concurrency_limit, lane_slots
from .models import (
    BatchDryRun,
    BatchEditResult,
    BatchJob,
    BatchOptions,
    BatchRowResult,
    PlannedAction,
    PlannedRow,
    _RowPlan,
)
from .plan import (
    _stage_rows,
    aplan_batch,
    aplan_listed_batch,
    aread_batch_manifest,
    estimate_rows,
    plan_location,
)
from .report import BatchProgress, _finish_batch, _results_location
from .row import BatchRun, RowObserver, _run_row, _settled_without_api, not_finished


@flow(name="nano-banana-batch")
async def batch_edit(
    jobs: list[BatchJob] | None = None,
    manifest_uri: Annotated[str, Field(min_length=1)] | None = None,
    archive_uri: Annotated[str, Field(min_length=1)] = DEFAULT_ARCHIVE_URI,
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
    timeout_seconds: Annotated[float, Field(gt=0)] = 1800,
    results_uri: str | None = None,
    chunk_size: Annotated[int, Field(ge=1)] | None = None,
    chunk_deployment: str | None = None,
    preview_rows: Annotated[int, Field(ge=0)] = DEFAULT_PREVIEW_ROWS,
    max_cost_usd: Annotated[float, Field(ge=0)] | None = None,
    dry_run: bool = False,
    resolution_factors: dict[str, float] | None = None,
    images_uri: Annotated[str, Field(min_length=1)] | None = None,
    prompt: Annotated[str, Field(min_length=1)] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    daily_budget_usd: Annotated[float, Field(ge=0)] | None = None,
    shared_budget_name: str | None = None,
) -> BatchEditResult | BatchDryRun:
    """Run many Nano Banana Pro edits: stage, submit, wait and archive every row.

    Give the rows one of three ways: `jobs`, `manifest_uri`, or `images_uri` with a
    `prompt` (every image under the location gets the same edit).

    Args:
        jobs: The rows, when not read from `manifest_uri` or listed from `images_uri`.
        manifest_uri: A JSONL or CSV manifest (local or s3://), one row per edit:
            prompt, images, and optional per-row options and id.
        archive_uri: Where outputs, metadata.json files and the ledger go: a local
            folder, s3://bucket/prefix or s3-bucket://BLOCK/prefix.
        staging_uri: Where local inputs are uploaded for RunComfy to fetch
            (s3://…, s3-bucket://…, or a loopback object store's URL). Without one,
            local images are sent inline as data: URIs (up to 6 MiB each).
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
        preview_rows: How many rows the report artifact shows with before/after
            thumbnails (the first ones); every row is in the table artifact.
        max_cost_usd: A budget in USD. Before any submit, an estimate of the rows to
            pay over it (or a price lookup that fails) raises `BudgetExceededError`;
            during the run, a row is submitted only while the billed cost so far plus
            the estimates in flight plus its own estimate stay within it, and the
            rows held back end `over_budget`. A chunked batch checks the whole
            estimate before starting any chunk, then gives each chunk a share of
            the budget in proportion to its estimate.
        dry_run: Validate every row and estimate the cost, submit nothing; returns a
            `BatchDryRun` (rows to pay, rows done, the estimate).
        resolution_factors: Multipliers of the listed price per resolution for the
            estimate (default: 4K counts double).
        images_uri: A location whose images are the rows: a local folder, a glob,
            s3://bucket/prefix or s3-bucket://BLOCK/prefix. Each image is a row whose id
            is its path relative to the location; a rerun pays only for images not
            archived yet. The rows run as the listing goes on, unless `max_cost_usd`,
            `dry_run` or `chunk_size` needs every row first.
        prompt: The edit every image of `images_uri` gets.
        include: Glob patterns an image of `images_uri` must match (default: image
            extensions).
        exclude: Glob patterns that leave images of `images_uri` out.
        daily_budget_usd: A cap in USD per UTC day that every run using the same
            archive draws from; overrides the credentials block's `daily_budget_usd`.
            A row the cap holds back ends `over_budget`.
        shared_budget_name: Set by a chunked parent for its chunks: the stored budget
            they share, `max_cost_usd` in all.

    Returns:
        A `BatchEditResult`: a row each (status, request id, outputs, cost, error),
        the counts, `total_cost`, `paid_cost` and the results manifest's location;
        with `dry_run`, a `BatchDryRun` instead.

    Raises:
        BatchFailedError: Rows failed (or were held back by the budget) and
            `allow_partial` is off; raised after every success is archived, and
            carries the full result.
        BudgetExceededError: The estimate is over `max_cost_usd` before any submit
            (nothing was paid).
        ManifestError: The manifest cannot be read, or a row's options are invalid.

    Example:
        ```python
        import asyncio
        from prefect_nanobanana import batch_edit

        result = asyncio.run(
            batch_edit(manifest_uri="manifest.jsonl", archive_uri="archive", allow_partial=True)
        )
        print(result.archived, result.failed, result.total_cost)
        ```
    """
    # The run form's fields, as the one value the run's steps and its chunks share.
    options = BatchOptions.model_validate(
        {name: value for name, value in locals().items() if name in BatchOptions.model_fields}
    )
    warn_of_signed_urls_in_parameters()
    check_batch_sources(jobs, manifest_uri, images_uri, prompt, include, exclude)
    if (chunk_size is None) != (chunk_deployment is None):
        raise ValueError("give both `chunk_size` and `chunk_deployment`, or neither")
    listed = None
    if images_uri is not None and lists_every_row_first(options, chunk_size):
        listed = await aplan_listed_batch(options)
        log_listed(listed, images_uri)
        jobs = [plan.job for plan in listed]
    elif images_uri is None and jobs is None:
        jobs = await aread_batch_manifest(manifest_uri, aws_credentials)
    chunked = jobs is not None and chunk_size is not None and len(jobs) > chunk_size and not dry_run
    if chunked and jobs is not None and chunk_size is not None and chunk_deployment is not None:
        # The parent pays for nothing: a stop (Prefect's SIGTERM bridge) ends its
        # wait, and each chunk, a run of its own, handles its own stop.
        return await _run_chunked(jobs, chunk_size, chunk_deployment, options)
    run_stop = RunStop(STOPPED_MESSAGE)
    with run_stop.handling(asyncio.get_running_loop()) as stop:
        ended = await _run_rows(jobs, options, stop, listed)
        # Asked once more: a cancel that came as the last rows ended, before the watch's
        # next look, must end the run Cancelled (Prefect keeps a Cancelling run from
        # completing, and it would stay Cancelling).
        await run_stop.settle()
    return run_stop.end(ended)  # type: ignore[return-value]


def lists_every_row_first(options: BatchOptions, chunk_size: int | None) -> bool:
    """Whether a listed batch must know every row before any runs: to split it into chunks,
    to report a dry run, or to refuse an estimate over `max_cost_usd` before anything is
    paid. Otherwise its rows run as the listing streams in (`plan_location`), so a
    prefix of thousands pays for its first image within seconds."""
    return chunk_size is not None or options.dry_run or options.max_cost_usd is not None


def log_listed(plans: list[_RowPlan], images_uri: str) -> None:
    """Say how many images the location listed, and how many the ledger knew."""
    get_run_logger().info(
        "Listed %d images under %s: %d new, %d known to the ledger",
        len(plans),
        strip_signature(images_uri),
        sum(plan.new for plan in plans),
        sum(not plan.new for plan in plans),
    )


def check_batch_sources(
    jobs: list[BatchJob] | None,
    manifest_uri: str | None,
    images_uri: str | None,
    prompt: str | None,
    include: list[str] | None,
    exclude: list[str] | None,
) -> None:
    """Refuse, before anything is listed or paid, a batch given no rows or two kinds.

    Raises:
        ValueError: Not exactly one of `jobs`, `manifest_uri`, `images_uri`; or
            `images_uri` without a `prompt`; or `prompt`, `include`, `exclude` without it.
    """
    given = [
        name
        for name, value in (
            ("jobs", jobs),
            ("manifest_uri", manifest_uri),
            ("images_uri", images_uri),
        )
        if value is not None
    ]
    if len(given) != 1:
        also = f" (got {', '.join(given)})" if given else ""
        raise ValueError(f"give exactly one of `jobs`, `manifest_uri` or `images_uri`{also}")
    if images_uri is not None and not (prompt or "").strip():
        raise ValueError("`images_uri` needs a `prompt`: the edit every listed image gets")
    if images_uri is None:
        stray = [
            name
            for name, value in (("prompt", prompt), ("include", include), ("exclude", exclude))
            if value is not None
        ]
        if stray:
            raise ValueError(
                f"{', '.join(f'`{name}`' for name in stray)} go with `images_uri` only; rows of "
                "`jobs` or a manifest carry their own prompt"
            )


STOPPED_MESSAGE = (
    "The batch stopped: its queued requests were withdrawn, the running ones stay recorded "
    "for a rerun to adopt, and the results manifest names every unfinished row"
)


async def _run_chunked(
    jobs: list[BatchJob], chunk_size: int, chunk_deployment: str, options: BatchOptions
) -> BatchEditResult:
    """The rows as child runs of `chunk_deployment`, one a chunk, gathered into one result."""
    shared_budget = None
    if options.max_cost_usd is not None:
        plans = await _plan(jobs, options, dry_run=True)
        resolved = await aresolve_credentials(options.credentials)
        async with resolved.get_async_client() as client:
            await _estimate_before_paying(
                client, plans, options.max_cost_usd, options.resolution_factors
            )
        shared_budget = shared_budget_name(observe.current_flow_run_id())
        archive, archive_s3 = resolve_location(options.archive_uri, options.aws_credentials)
        assert archive is not None
        await to_thread.run_sync(
            SharedBudget(archive, shared_budget, options.max_cost_usd, s3_client=archive_s3).check
        )
    # Made here, once: children starting together would race to create it.
    await _ensure_concurrency_limit(options.concurrency_limit_name, options.max_concurrency)
    results_location = _results_location(options.archive_uri, options.results_uri)
    rows = await run_in_chunks(
        jobs,
        chunk_size,
        chunk_deployment,
        options.chunk_parameters(credentials_parameter(options.credentials)),
        results_location,
        options.aws_credentials,
        shared_budget,
    )
    return await _finish_batch(
        rows,
        results_location,
        options.allow_partial,
        options.aws_credentials,
        options.archive_uri,
        options.preview_rows,
    )


async def _run_rows(
    jobs: list[BatchJob] | None,
    options: BatchOptions,
    stop: Stop,
    listed: list[_RowPlan] | None = None,
) -> BatchEditResult | BatchDryRun:
    """Every row of an unchunked batch through its lanes, until done or stopped; then the
    results manifest and the report.

    The rows are `jobs`, or `listed` (planned already from `images_uri`), or, with
    neither, `images_uri` listed as the lanes run (`lists_every_row_first`).
    """
    staging = resolve_location(options.staging_uri, options.aws_credentials)
    plans: list[_RowPlan] | None = listed
    if jobs is not None and listed is None:
        plans = await _plan(jobs, options, dry_run=options.dry_run)
    elif listed is not None:
        await to_thread.run_sync(_stage_rows, listed, staging, options.dry_run)
    archive = resolve_location(options.archive_uri, options.aws_credentials)
    location, s3_client = archive
    resolved = await aresolve_credentials(options.credentials)
    daily_cap = daily_budget_of(options.daily_budget_usd, resolved)
    async with resolved.get_async_client() as client:
        if plans is not None:
            estimate = await _estimate_before_paying(
                client, plans, options.max_cost_usd, options.resolution_factors, daily_cap
            )
            if options.dry_run:
                return _dry_run_of(plans, estimate)
            base_price = estimate.base_price_usd if estimate else None
            groups = _one_group(plans)
        else:
            base_price = await _price_for_listing(client, daily_cap)
            groups = _listed_groups(options, staging, stop)
        shared_limit = await _ensure_concurrency_limit(
            options.concurrency_limit_name, options.max_concurrency
        )
        progress_id = await acreate_progress_artifact(
            progress=0.0,
            description="Rows of this batch finished, of "
            + (f"{len(plans)}." if plans is not None else "those listed so far."),
        )
        run_id = observe.current_flow_run_id()
        batch = BatchRun(
            pipeline=Pipeline(
                client=client,
                store=Ledger(location, s3_client=s3_client),
                archive_uri=location,
                stop=stop,
                budget=run_budget(options, daily_cap, location, s3_client),
                observer=RowObserver(),
                timeout_seconds=options.timeout_seconds,
                s3_client=s3_client,
            ),
            staging=staging,
            lanes=min(options.max_concurrency, shared_limit),
            preview_rows=options.preview_rows,
            run_id=str(run_id) if run_id else None,
        )

        progress = BatchProgress(progress_id)
        outcomes: dict[int, BatchRowResult] = {}
        seen: list[_RowPlan] = []
        learned: list[RunTimeHistory | None] = []  # the run-time history, once read

        async def runnable_rows() -> AsyncIterator[_RowPlan]:
            """The rows to run, as they are planned; the rest settled on the way."""
            async for group in groups:
                seen.extend(group)
                progress.rows_planned(len(group))
                estimate_rows(group, base_price, options.resolution_factors)
                for plan in group:
                    settled = _settled_without_api(plan)
                    if settled is not None:
                        outcomes[plan.row] = settled
                        progress.row_done()
                        continue
                    if not learned:  # read once a row needs its request, not for none
                        learned.append(await alearn_run_times(client, location, s3_client))
                    yield plan

        async def run_row(plan: _RowPlan, request_ended: asyncio.Event) -> None:
            outcomes[plan.row] = await _run_row(plan, batch, request_ended)
            progress.row_done()

        async with aclosing(groups), aclosing(runnable_rows()) as rows_to_run:
            await run_in_lanes(
                rows_to_run,
                batch.lanes,
                run_row,
                hold=partial(lane_slots, options.concurrency_limit_name),
                stop=stop,
            )
        if learned:
            await asave_run_times(client, learned[0])
        await progress.finish()
        if options.images_uri is not None and plans is None:
            log_listed(seen, options.images_uri)
        estimate = estimate_rows(seen, base_price, options.resolution_factors)
        unfinished = f"{not_finished(stop)}; nothing was submitted"
        seen.sort(key=lambda plan: plan.row)  # a listed batch's rows come as they are ready
        rows = [outcomes.get(plan.row) or plan.result("failed", error=unfinished) for plan in seen]

    return await _finish_batch(
        rows,
        _results_location(options.archive_uri, options.results_uri),
        options.allow_partial or stop.is_set,
        options.aws_credentials,
        options.archive_uri,
        options.preview_rows,
        estimated_cost=estimate.estimate_usd if estimate else None,
    )


async def _one_group(plans: list[_RowPlan]) -> AsyncGenerator[list[_RowPlan], None]:
    yield plans


async def _listed_groups(
    options: BatchOptions, staging: ResolvedLocation, stop: Stop
) -> AsyncGenerator[list[_RowPlan], None]:
    """The listed rows, planned and staged a group at a time in a worker thread; no group is
    planned once the run is stopping."""
    groups = plan_location(options, staging)
    try:
        while not stop.is_set:
            group = await to_thread.run_sync(next, groups, None)
            if group is None:
                return
            yield group
    finally:
        await to_thread.run_sync(groups.close)


async def _price_for_listing(client: AsyncRunComfyClient, daily_cap: float | None) -> float | None:
    """The listed price, for rows estimated as the listing streams; refused before anything
    is listed or paid when the API refuses the token, or the price is unknown under a
    daily cap (every row would reserve nothing)."""
    base_price, failure = await _alook_up_price(client)
    if base_price is None and daily_cap is not None:
        raise BudgetExceededError(
            None,
            daily_cap,
            0,
            reason=failure,
            cap_name=DAILY_BUDGET_NAME,
            message=(
                f"No estimate for the listed rows ({failure}), so the budget "
                f"{DAILY_BUDGET_NAME}={format_usd(daily_cap)} cannot be checked; "
                "nothing was submitted"
            ),
        )
    if base_price is None:
        get_run_logger().warning("No cost estimate (%s); going on without one", failure)
    else:
        get_run_logger().info(
            "Price %s per image (listed); each row is estimated as it is listed",
            format_usd(base_price),
        )
    return base_price


def run_budget(
    options: BatchOptions, daily_cap: float | None, archive: Any, s3_client: Any
) -> Budget:
    """The run's `Budget`: its own `max_cost_usd` in memory, or, for a chunk, the budget its
    parent shares with every chunk; and the archive's daily cap."""
    shared: list[SharedTotal] = []
    local_cap = options.max_cost_usd
    if options.shared_budget_name is not None and options.max_cost_usd is not None:
        shared.append(
            SharedBudget(
                archive, options.shared_budget_name, options.max_cost_usd, s3_client=s3_client
            )
        )
        local_cap = None
    if daily_cap is not None:
        shared.append(DailyBudget(archive, daily_cap, s3_client=s3_client))
    return Budget(local_cap, shared=shared)


async def _alook_up_price(client: AsyncRunComfyClient) -> tuple[float | None, str | None]:
    """The model's listed price, or None and why the lookup failed.

    Raises:
        AuthenticationError, PermissionDeniedError, APIConnectionError: A refused token
            or an unreachable API would fail every row the same way, each after its own
            retries (a minute and a screen of warnings): said once, now.
    """
    try:
        return base_price_of(await client.model_info()), None
    except (AuthenticationError, PermissionDeniedError, APIConnectionError):
        raise
    except (RunComfyError, ValueError) as error:
        return None, f"the price lookup failed: {error}"


async def _estimate_before_paying(
    client: AsyncRunComfyClient,
    plans: list[_RowPlan],
    max_cost_usd: float | None,
    resolution_factors: dict[str, float] | None,
    daily_budget_usd: float | None = None,
) -> CostEstimate | None:
    """Look up the price and estimate the rows to pay; refuse, before any submit, when the
    estimate is over `max_cost_usd` or the price is unknown under a budget, and stop the
    batch when the API refuses the token or cannot be reached."""
    logger = get_run_logger()
    rows_to_pay = sum(plan.needs_paid_submit for plan in plans)
    base_price, failure = await _alook_up_price(client)
    estimate = estimate_rows(plans, base_price, resolution_factors)
    refuse_over_budget(estimate, max_cost_usd, rows_to_pay=rows_to_pay, lookup_failure=failure)
    if estimate is None and daily_budget_usd is not None and rows_to_pay:
        # Without a price every row would reserve nothing: the daily cap would not hold.
        raise BudgetExceededError(
            None, daily_budget_usd, rows_to_pay, reason=failure, cap_name=DAILY_BUDGET_NAME
        )
    if estimate is None:
        logger.warning("No cost estimate (%s); going on without one (no max_cost_usd)", failure)
    else:
        logger.info(
            "Cost %s (listed %s per image)%s",
            estimate.describe(),
            format_usd(estimate.base_price_usd),
            "" if max_cost_usd is None else f"; budget max_cost_usd={format_usd(max_cost_usd)}",
        )
    return estimate


# What a dry run says of each decision of the guard (None: the row is invalid); a row
# another run is submitting right now will be adopted.
_PLANNED_ACTIONS: dict[Decision | None, PlannedAction] = {
    None: "invalid",
    "pay": "pay",
    "done": "skip",
    "adopt": "adopt",
    "wait": "adopt",
    "unknown": "invalid",
}


def _dry_run_of(plans: list[_RowPlan], estimate: CostEstimate | None) -> BatchDryRun:
    """What a run would do with each row, and what the rows to pay are estimated to cost."""
    rows = []
    for plan in plans:
        entry = plan.entry
        decision = plan.decision
        if decision == "unknown":
            plan.error = "an earlier run stopped while submitting this row (outcome unknown)"
        action: PlannedAction = _PLANNED_ACTIONS[decision]
        rows.append(
            PlannedRow(
                row=plan.row,
                id=plan.job.id,
                action=action,
                request_id=entry.request_id if entry is not None else None,
                estimated_cost=plan.estimated_cost,
                error=plan.error,
            )
        )
    dry_run = BatchDryRun(
        rows=rows,
        rows_to_pay=sum(row.action == "pay" for row in rows),
        rows_done=sum(row.action == "skip" for row in rows),
        rows_adopted=sum(row.action == "adopt" for row in rows),
        rows_invalid=sum(row.action == "invalid" for row in rows),
        base_price_usd=estimate.base_price_usd if estimate else None,
        estimated_cost=estimate.estimate_usd if estimate else None,
        estimated_by_resolution=dict(estimate.by_resolution) if estimate else {},
    )
    get_run_logger().info(
        "Dry run, nothing submitted: %d rows to pay, %d done earlier, %d adopted, %d invalid; "
        "estimated cost %s",
        dry_run.rows_to_pay,
        dry_run.rows_done,
        dry_run.rows_adopted,
        dry_run.rows_invalid,
        "unknown" if dry_run.estimated_cost is None else format_usd(dry_run.estimated_cost),
    )
    return dry_run


# The wait schedule starts from the run times earlier batches saw (`RunTimeHistory`,
# with the archive), and the batch saves its own: priors, not records, so a history
# that cannot be read or written costs a little polling, never the batch.


async def alearn_run_times(
    client: AsyncRunComfyClient, archive_location: Any, s3_client: Any
) -> RunTimeHistory | None:
    """Seed the client's estimator from the archive's history; the history, to save to."""
    try:
        history = RunTimeHistory(archive_location, s3_client=s3_client)
        saved = await to_thread.run_sync(history.load, NANO_BANANA_EDIT_MODEL_ID)
    except Exception as error:  # a prior only: the batch goes on from the reported times
        get_run_logger().warning("Could not read earlier run times: %s", error)
        return None
    client.duration_estimator.seed(saved, client.polling_policy.time_scale)
    return history


async def asave_run_times(client: AsyncRunComfyClient, history: RunTimeHistory | None) -> None:
    """Add the run times this batch observed to the archive's history."""
    if history is None:
        return
    observed = client.duration_estimator.recorded(client.polling_policy.time_scale)
    try:
        await to_thread.run_sync(history.save, NANO_BANANA_EDIT_MODEL_ID, observed)
    except Exception as error:
        get_run_logger().warning("Could not save this batch's run times: %s", error)


async def _plan(jobs: list[BatchJob], options: BatchOptions, dry_run: bool) -> list[_RowPlan]:
    """The rows planned against the batch's archive and staging (see `aplan_batch`)."""
    return await aplan_batch(
        jobs,
        options.row_defaults,
        options.archive_uri,
        options.staging_uri,
        options.aws_credentials,
        dry_run,
    )
