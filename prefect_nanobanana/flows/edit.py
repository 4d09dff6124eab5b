"""The `edit_image` flow: one Nano Banana Pro edit, submitted at most once and followed to its end.

Its job goes through the pipeline (`run_edit`, shared with `edit_and_archive`):
submit through the guard, wait, and, for `edit_and_archive`, archive.

The remote job follows the Prefect run. A run asked to stop (cancelled from the
UI or the API, SIGTERM from a worker or Kubernetes, Ctrl-C) handles it as a state,
the way a batch does (`stopping.RunStop`): the wait ends, a request still queued
at RunComfy is withdrawn through the guard (nothing is billed, and its record says
so, so a retry submits it again), and a running one stays recorded for a retry to
adopt. The run then ends Cancelled when it was cancelled, else as Prefect ends a
terminated run. Two more ways cover what the run's own process cannot see:

- an ending that is an exception (a flow timeout, a cancelled task) withdraws a
  queued request as it leaves the pipeline (`withdrawn_if_abandoned`);
- the `on_cancellation` hook, which Prefect's runner may call in its own process
  after killing the flow's, reads the request ids the run recorded in its labels
  from the API and does the same.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from functools import partial
from typing import Annotated, Any, TypeVar

from prefect import flow
from prefect.logging import get_run_logger
from prefect.states import State
from prefect.utilities.asyncutils import run_coro_as_sync
from pydantic import BaseModel, Field

from ..blocks.credentials import (
    DEFAULT_CREDENTIALS_BLOCK,
    RunComfyCredentials,
    daily_budget_of,
    resolve_credentials,
    warn_of_signed_urls_in_parameters,
)
from ..client import (
    AspectRatio,
    NanoBananaEditInput,
    OutputFormat,
    RequestResult,
    Resolution,
    RunComfyError,
    WaitTimeoutError,
)
from ..client.pricing import BudgetExceededError, estimate_edit, format_usd
from ..guard.protocol import SubmittedRequest, abandons_request
from ..pipeline import Budget, Job, JobOutcome, Pipeline
from ..stop import Stop
from ..storage import DEFAULT_ARCHIVE_URI
from ..storage.budget import DAILY_BUDGET_NAME, DailyBudget
from ..tasks import cancel_recorded_requests, withdraw_if_queued
from ..tasks.guard import default_job_key, job_scope
from ..tasks.records import PrefectRecordStore
from ..tasks.requests import RequestObserver, edit_job
from ..tasks.storage import ResolvedLocation, resolve_location
from .stopping import RunStop

Result = TypeVar("Result")


class EditImageResult(BaseModel):
    """What one edit produced, and how it got there."""

    request_id: str = Field(description="The RunComfy request id.")
    job_key: str = Field(description="The key that makes the submit at-most-once.")
    resumed: bool = Field(description="True when an earlier attempt of this run submitted it.")
    statuses: list[str] = Field(description="The statuses seen while waiting, in order.")
    output_urls: list[str] = Field(description="The edited images (data URIs in sync mode).")
    cost: float | None = Field(default=None, description="The cost RunComfy reported.")
    estimated_cost: float | None = Field(
        default=None, description="An estimate from the listed price (with max_cost_usd)."
    )
    submitted_at: datetime | None = Field(default=None, description="When it was submitted.")
    finished_at: datetime | None = Field(default=None, description="When RunComfy finished it.")
    seconds: float | None = Field(
        default=None, description="Seconds from RunComfy accepting the job to finishing it."
    )


def remote_seconds(request: SubmittedRequest, result: RequestResult) -> float | None:
    """Submit to finish, both ends from RunComfy's clock when it reports them: no skew."""
    started = result.created_at or request.submitted_at
    if started is None or result.finished_at is None:
        return None
    return (result.finished_at - started) / timedelta(seconds=1)


def estimate_within_budget(
    credentials: RunComfyCredentials,
    edit: NanoBananaEditInput,
    max_cost_usd: float | None,
    daily_budget_usd: float | None = None,
) -> float | None:
    """With a budget: the listed price, and `BudgetExceededError` before the paid submit when
    the edit's estimate is over `max_cost_usd` or the price cannot be looked up (under
    either cap: without an estimate the daily total could not count the edit)."""
    if max_cost_usd is None and daily_budget_usd is None:
        return None
    info, failure = None, None
    try:
        with credentials.get_client() as client:
            info = client.model_info()
    except RunComfyError as error:
        failure = f"the price lookup failed: {error}"
    estimate = estimate_edit(info, edit, max_cost_usd, lookup_failure=failure)
    if estimate is None:
        assert daily_budget_usd is not None  # under max_cost_usd, no estimate is a refusal
        raise BudgetExceededError(
            None, daily_budget_usd, 1, reason=failure, cap_name=DAILY_BUDGET_NAME
        )
    caps = [
        f"{name}={format_usd(cap)}"
        for name, cap in (("max_cost_usd", max_cost_usd), (DAILY_BUDGET_NAME, daily_budget_usd))
        if cap is not None
    ]
    get_run_logger().info("Cost %s; budget %s", estimate.describe(), ", ".join(caps))
    return estimate.estimate_usd


@contextmanager
def withdrawn_if_abandoned(credentials: RunComfyCredentials, job: Job) -> Iterator[None]:
    """Wrap the run of `job`: if the run ends for good inside (a flow timeout, a cancelled
    task: an exception, not the run's stop), withdraw the job's request.

    A queued request is cancelled at RunComfy; a running one is reported with its
    request id. The exception always propagates: this only tidies up after it. (The
    pipeline lets go of the request itself when its wait times out.)
    """
    try:
        yield
    except BaseException as error:
        if job.request_id and abandons_request(error) and not isinstance(error, WaitTimeoutError):
            log = get_run_logger()
            log.info(
                "The run is stopping (%s); releasing request %s",
                type(error).__name__,
                job.request_id,
            )
            withdraw_if_queued(credentials, job.request_id, log=log)
        raise


# The Cancelled state's message; `RunStop` adds why the run stopped.
STOPPED_MESSAGE = (
    "The edit was stopped: a queued request is withdrawn, a running one stays recorded "
    "for a retry to adopt"
)


def run_edit(
    credentials: RunComfyCredentials,
    job: Job,
    stop: Stop,
    *,
    timeout_seconds: float,
    daily_budget_usd: float | None,
    archive: ResolvedLocation | None,
    aws_credentials: str | None = None,
) -> tuple[JobOutcome, RequestObserver]:
    """Both edit flows' job through the pipeline (`Pipeline.run`), from a sync flow: the
    records in Prefect's result store, the estimate reserved in the daily total right
    before the paid submit, the wait ended by the run's `stop`, the outputs archived
    when there is an archive.

    Args:
        credentials: Who submits and waits.
        job: The edit (`tasks.edit_job`).
        stop: The run's stop (`RunStop.handling`).
        timeout_seconds: How long the job waits for its request.
        daily_budget_usd: The daily cap, kept beside the archive's ledger (the default
            archive's without an archive).
        archive: Where the outputs go; None keeps them in the result.
        aws_credentials: For an S3 archive or daily total.

    Returns:
        How the job ended, and the observer that saw it (its statuses).

    Raises:
        BudgetExceededError: The budget held the job back (nothing was sent).
        Whatever `Pipeline.run` raises.
    """
    shared = []
    if daily_budget_usd is not None:
        daily_at = archive or resolve_location(DEFAULT_ARCHIVE_URI, aws_credentials)
        assert daily_at.location is not None
        shared.append(
            DailyBudget(daily_at.location, daily_budget_usd, s3_client=daily_at.s3_client)
        )
    log = get_run_logger()
    store = PrefectRecordStore()
    observer = RequestObserver(store, log)

    async def run() -> JobOutcome:
        async with credentials.get_async_client() as client:
            pipeline = Pipeline(
                client,
                store,
                archive_uri=archive.location if archive else None,
                stop=stop,
                budget=Budget(shared=shared),
                observer=observer,
                timeout_seconds=timeout_seconds,
                s3_client=archive.s3_client if archive else None,
                log=log,
            )
            try:
                return await pipeline.run(job)
            finally:
                await observer.arecord_outcome()

    with withdrawn_if_abandoned(credentials, job):
        outcome = run_coro_as_sync(run())
    assert outcome is not None
    if outcome.refusal is not None:
        raise outcome.refusal  # held back before its submit: nothing paid
    return outcome, observer


def edit_in_this_run(
    credentials: RunComfyCredentials,
    job: Job,
    result_of: Callable[[JobOutcome, RequestObserver], Result],
    *,
    timeout_seconds: float,
    daily_budget_usd: float | None,
    archive: ResolvedLocation | None,
    aws_credentials: str | None = None,
) -> Result | State[Any] | None:
    """What an edit flow returns: its job run (`run_edit`) while the run's stop is handled
    (`RunStop`), then `result_of` the outcome when the request completed, or the state a
    stopped run ends in.

    Args:
        credentials: Who submits and waits.
        job: The edit.
        result_of: The flow's result, from a completed job's outcome and its observer.
        timeout_seconds: How long the job waits for its request.
        daily_budget_usd: The daily cap (see `run_edit`).
        archive: Where the outputs go; None keeps them in the result.
        aws_credentials: For an S3 archive or daily total.

    Returns:
        The flow's result; its Cancelled state when the run was cancelled; None when a
        signal stopped it (the signal then goes on to Prefect's handler).
    """
    run_stop = RunStop(STOPPED_MESSAGE)
    with run_stop.handling() as stop:
        outcome, observer = run_edit(
            credentials,
            job,
            stop,
            timeout_seconds=timeout_seconds,
            daily_budget_usd=daily_budget_usd,
            archive=archive,
            aws_credentials=aws_credentials,
        )
        run_stop.settle_sync()
    result = result_of(outcome, observer) if outcome.result is not None else None
    return run_stop.end(result)


def _edit_image_result(job: Job, outcome: JobOutcome, observer: RequestObserver) -> EditImageResult:
    request, result = outcome.request, outcome.result
    assert request is not None and result is not None
    ended = observer.trail.outcome(result)
    return EditImageResult(
        request_id=request.request_id,
        job_key=request.job_key,
        resumed=request.resumed,
        statuses=ended.statuses,
        output_urls=ended.output_urls,
        cost=ended.cost,
        estimated_cost=job.estimated_cost,
        submitted_at=request.submitted_at or ended.created_at,
        finished_at=ended.finished_at,
        seconds=remote_seconds(request, result),
    )


@flow(name="nano-banana-edit", on_cancellation=[cancel_recorded_requests])
def edit_image(
    prompt: Annotated[str, Field(min_length=1)],
    image_urls: list[str],
    aspect_ratio: AspectRatio = "auto",
    resolution: Resolution = "1K",
    output_format: OutputFormat = "png",
    num_images: Annotated[int, Field(ge=1, le=4)] = 1,
    sync_mode: bool = False,
    credentials: RunComfyCredentials | str = DEFAULT_CREDENTIALS_BLOCK,
    timeout_seconds: Annotated[float, Field(gt=0)] = 600,
    max_cost_usd: Annotated[float, Field(ge=0)] | None = None,
    daily_budget_usd: Annotated[float, Field(ge=0)] | None = None,
) -> EditImageResult:
    """Edit images with Google's Nano Banana Pro on the RunComfy Model API.

    The inputs are validated before anything is paid for. The submit happens at
    most once per flow run: a retry or a rerun after a crash resumes the same
    request. If the run is cancelled, times out or is killed while the request is
    queued, the request is cancelled at RunComfy.

    Args:
        prompt: The edit instruction.
        image_urls: 1 to 20 image URLs RunComfy can fetch (public or pre-signed).
        aspect_ratio: Output aspect ratio; "auto" follows the input image.
        resolution: Output resolution.
        output_format: Output image format.
        num_images: How many images to produce (1 to 4).
        sync_mode: Return data URIs and keep nothing in RunComfy's request history.
        credentials: A `RunComfyCredentials` block or the name of a saved one. With
            the name "default" and no block saved under it, the environment
            variables RUNCOMFY_API_TOKEN and RUNCOMFY_BASE_URL are used, so a demo
            runs with nothing configured.
        timeout_seconds: How long to wait for the edit before giving up (a queued
            request is then cancelled).
        max_cost_usd: A budget in USD: when the edit's estimate (listed price x images,
            4K double) is over it, or the price cannot be looked up, the flow raises
            `BudgetExceededError` before paying.
        daily_budget_usd: A cap in USD per UTC day shared with every run on the default
            archive (`nanobanana-archive`: this flow archives nothing, so it keeps its
            daily total where the other flows keep theirs by default); overrides the
            credentials block's. Over it, `BudgetExceededError` before paying, naming
            `daily_budget_usd`.

    Returns:
        An `EditImageResult`: the request id, statuses seen, output URLs, cost and
        timings.

    Raises:
        BudgetExceededError: The estimate is over `max_cost_usd` (unpaid).
        SubmitOutcomeUnknownError: The submit may have been billed; never resent.
        JobFailedError: The edit failed at RunComfy.
        WaitTimeoutError: `timeout_seconds` passed; a queued request is cancelled.

    Example:
        ```python
        from prefect_nanobanana import edit_image

        result = edit_image(prompt="Add snow", image_urls=["https://…/photo.png"])
        print(result.output_urls, result.cost)
        ```
    """
    warn_of_signed_urls_in_parameters()
    edit = NanoBananaEditInput(
        prompt=prompt,
        image_urls=image_urls,
        aspect_ratio=aspect_ratio,
        resolution=resolution,
        output_format=output_format,
        num_images=num_images,
        sync_mode=sync_mode,
    )
    resolved = resolve_credentials(credentials)
    daily = daily_budget_of(daily_budget_usd, resolved)
    estimated_cost = estimate_within_budget(resolved, edit, max_cost_usd, daily)
    job = edit_job(edit, default_job_key(edit, job_scope()), estimated_cost=estimated_cost)
    return edit_in_this_run(  # type: ignore[return-value]
        resolved,
        job,
        partial(_edit_image_result, job),
        timeout_seconds=timeout_seconds,
        daily_budget_usd=daily,
        archive=None,
    )
