"""The `edit_image` flow: one Nano Banana Pro edit, submitted at most once and followed to its end.

The remote job follows the Prefect run. A run asked to stop (cancelled from the
UI or the API, SIGTERM from a worker or Kubernetes, Ctrl-C) handles it as a state,
the way a batch does (`stopping.RunStop`): the wait ends, a request still queued
at RunComfy is withdrawn through the guard (nothing is billed, and its record says
so, so a retry submits it again), and a running one stays recorded for a retry to
adopt. The run then ends Cancelled when it was cancelled, else as Prefect ends a
terminated run. Two more ways cover what the run's own process cannot see:

- an ending that is an exception (a flow timeout, a cancelled task) withdraws a
  queued request as it leaves the wait (`withdrawn_if_abandoned`);
- the `on_cancellation` hook, which Prefect's runner may call in its own process
  after killing the flow's, reads the request ids the run recorded in its labels
  from the API and does the same.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Annotated

from prefect import flow
from prefect.logging import get_run_logger
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
    JobCancelledError,
    NanoBananaEditInput,
    OutputFormat,
    Resolution,
    RunComfyError,
)
from ..client.pricing import BudgetExceededError, estimate_edit, format_usd
from ..pipeline import Budget, bill_after
from ..stop import Stop
from ..storage import DEFAULT_ARCHIVE_URI
from ..storage.budget import DAILY_BUDGET_NAME, DailyBudget
from ..tasks import (
    RequestOutcome,
    SubmittedRequest,
    abandons_request,
    cancel_recorded_requests,
    let_go_of_request,
    submit_edit,
    wait_for_request,
    withdraw_if_queued,
)
from ..tasks.storage import resolve_location
from .stopping import RunStop, direct_flow_run_id


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


def remote_seconds(submitted: SubmittedRequest, outcome: RequestOutcome) -> float | None:
    """Submit to finish, both ends from RunComfy's clock when it reports them: no skew."""
    started = outcome.created_at or submitted.submitted_at
    if started is None or outcome.finished_at is None:
        return None
    return (outcome.finished_at - started) / timedelta(seconds=1)


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


class DailyHold:
    """An edit's reservation in the archive's daily total; `bill` is what it settles to."""

    def __init__(self) -> None:
        self.bill: float | None = None  # unknown until told: the estimate keeps counting


@contextmanager
def held_in_daily_budget(
    daily_budget_usd: float | None,
    archive_uri: str,
    aws_credentials: str | None,
    estimate_usd: float | None,
) -> Iterator[DailyHold]:
    """Reserve one edit's estimate in the archive's daily total before its submit, and
    settle it to the bill when the block ends (`DailyHold.bill`), or release it.

    The same `Budget` a batch row reserves in (`pipeline.Budget`), so edits and batches
    on one archive draw from one total.

    Raises:
        BudgetExceededError: The day's total plus the estimate would pass the cap (its
            message names `daily_budget_usd`); nothing was submitted.
    """
    held = DailyHold()
    if daily_budget_usd is None:
        yield held
        return
    location, s3_client = resolve_location(archive_uri, aws_credentials)
    assert location is not None
    budget = Budget(shared=[DailyBudget(location, daily_budget_usd, s3_client=s3_client)])
    label = f"flow run {direct_flow_run_id() or '?'}"
    run_coro_as_sync(budget.reserve(_ONE_EDIT, estimate_usd, label=label))
    try:
        yield held
    except BaseException as error:
        if held.bill is None:
            held.bill = bill_after(error)
        raise
    finally:
        run_coro_as_sync(budget.end(_ONE_EDIT, held.bill))


_ONE_EDIT = "edit"  # the one job of a single-edit run's Budget


@contextmanager
def withdrawn_if_abandoned(credentials: RunComfyCredentials, request_id: str) -> Iterator[None]:
    """Wrap the wait for `request_id`: if the run ends for good inside, withdraw the request.

    A queued request is cancelled at RunComfy; a running one is reported with its
    request id. The exception always propagates: this only tidies up after it.
    """
    try:
        yield
    except BaseException as error:
        if abandons_request(error):
            log = get_run_logger()
            log.info(
                "The run is stopping (%s); releasing request %s", type(error).__name__, request_id
            )
            withdraw_if_queued(credentials, request_id, log=log)
        raise


# The Cancelled state's message; `RunStop` adds why the run stopped.
STOPPED_MESSAGE = (
    "The edit was stopped: a queued request is withdrawn, a running one stays recorded "
    "for a retry to adopt"
)


def wait_or_let_go(
    resolved: RunComfyCredentials,
    submitted: SubmittedRequest,
    timeout_seconds: float,
    resolution: str,
    stop: Stop,
) -> tuple[RequestOutcome | None, bool]:
    """Wait for the request until it ends or the run's `stop` is set.

    Returns:
        The outcome (None when the stop came first) and whether the request was
        withdrawn (still queued when the run let go of it: nothing billed).
    """
    with withdrawn_if_abandoned(resolved, submitted.request_id):
        try:
            outcome = wait_for_request(
                submitted.request_id,
                resolved,
                timeout_seconds=timeout_seconds,
                resolution=resolution,
                submitted_at=submitted.submitted_at,
                stop=stop,
            )
        except JobCancelledError:
            if stop.is_set:  # the runner's cancellation hook withdrew it first: not billed
                return None, True
            raise
    if outcome is not None:
        return outcome, False
    return None, let_go_of_request(submitted, stop.description, resolved)


def submit_and_wait(
    resolved: RunComfyCredentials,
    edit: NanoBananaEditInput,
    stop: Stop,
    *,
    job_key: str | None,
    timeout_seconds: float,
    daily_budget_usd: float | None,
    estimated_cost: float | None,
    archive_uri: str,
    aws_credentials: str | None = None,
) -> tuple[SubmittedRequest | None, RequestOutcome | None]:
    """The steps both edit flows take: reserve the estimate in the daily total, submit at
    most once, wait until the request ends or `stop` is set (`wait_or_let_go`), and
    settle the daily total to what was billed.

    Returns:
        The request (None when the run was stopped before its submit: nothing was sent),
        and its outcome (None when the run stopped first).
    """
    with held_in_daily_budget(
        daily_budget_usd, archive_uri, aws_credentials, estimated_cost
    ) as held:
        if stop.is_set:
            held.bill = 0.0
            return None, None
        submitted = submit_edit(edit, resolved, job_key=job_key)
        outcome, withdrawn = wait_or_let_go(
            resolved, submitted, timeout_seconds, edit.resolution, stop
        )
        if submitted.resumed or submitted.adopted or withdrawn:
            held.bill = 0.0  # paid (and counted) by the run that submitted it, or not billed
        else:
            held.bill = outcome.cost if outcome is not None else None  # None: may be billed
    return submitted, outcome


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
    run_stop = RunStop(STOPPED_MESSAGE)
    with run_stop.handling() as stop:
        submitted, outcome = submit_and_wait(
            resolved,
            edit,
            stop,
            job_key=None,
            timeout_seconds=timeout_seconds,
            daily_budget_usd=daily,
            estimated_cost=estimated_cost,
            archive_uri=DEFAULT_ARCHIVE_URI,
        )
        run_stop.settle_sync()
    result = outcome and EditImageResult(
        request_id=submitted.request_id,
        job_key=submitted.job_key,
        resumed=submitted.resumed,
        statuses=outcome.statuses,
        output_urls=outcome.output_urls,
        cost=outcome.cost,
        estimated_cost=estimated_cost,
        submitted_at=submitted.submitted_at or outcome.created_at,
        finished_at=outcome.finished_at,
        seconds=remote_seconds(submitted, outcome),
    )
    return run_stop.end(result)  # type: ignore[return-value]
