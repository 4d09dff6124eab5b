"""A Nano Banana Pro edit as a Prefect job block, configured once in the UI and triggered."""

from __future__ import annotations

from datetime import datetime

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.blocks.abstract import JobBlock, JobRun
from prefect.utilities.asyncutils import run_coro_as_sync
from pydantic import BaseModel, Field

from ..client import (
    DEFAULT_WAIT_TIMEOUT,
    AspectRatio,
    CancelResult,
    NanoBananaEditInput,
    OutputFormat,
    RequestResult,
    Resolution,
)
from ..guard.protocol import log_cancel_outcome
from ..stop import signals_deferred
from ..tasks.requests import asubmit_through_pipeline
from .credentials import RunComfyCredentials


class NanoBananaEditJobRun(BaseModel, JobRun[RequestResult]):
    """One submitted edit: wait for it, fetch its result, or cancel it while queued.

    Methods have async twins (`await_for_completion`, `afetch_result`, `acancel`);
    the plain names dispatch to them when called from async code, as Prefect's own
    blocks do.
    """

    request_id: str = Field(description="The RunComfy request id.")
    credentials: RunComfyCredentials = Field(description="Credentials that submitted it.")
    resolution: str | None = Field(
        default=None, description="The edit's resolution, so polling can expect its run time."
    )
    timeout_seconds: float | None = Field(
        default=DEFAULT_WAIT_TIMEOUT,
        description=(
            "How long `wait_for_completion` waits before giving up (30 minutes by "
            "default); empty waits without limit."
        ),
    )
    result_url: str | None = Field(default=None, description="Where its result can be fetched.")
    submitted_at: datetime | None = Field(
        default=None, description="When it was submitted, so a later wait polls accordingly."
    )
    job_key: str | None = Field(default=None, description="The job key it was submitted under.")
    adopted: bool = Field(
        default=False, description="True when an earlier trigger with the job key submitted it."
    )

    async def await_for_completion(self) -> RequestResult:
        """Poll until the request ends, and return its completed result.

        Returns:
            The completed `RequestResult`: output URLs, cost, times.

        Raises:
            JobFailedError: The job failed at RunComfy.
            JobCancelledError: The job was cancelled.
            WaitTimeoutError: `timeout_seconds` passed first; the job may still finish.
            RunComfyError: The API refused or could not be reached (after retries).
        """
        async with self.credentials.get_async_client() as client:
            return await client.wait(
                self.request_id,
                self.timeout_seconds,
                resolution=self.resolution,
                submitted_at=self.submitted_at,
            )

    @async_dispatch(await_for_completion)
    def wait_for_completion(self) -> RequestResult:
        """Poll until the request ends, and return its completed result.

        Returns:
            The completed `RequestResult`: output URLs, cost, times.

        Raises:
            JobFailedError: The job failed at RunComfy.
            JobCancelledError: The job was cancelled.
            WaitTimeoutError: `timeout_seconds` passed first; the job may still finish.
            RunComfyError: The API refused or could not be reached (after retries).
        """
        return run_coro_as_sync(self.await_for_completion())

    async def afetch_result(self) -> RequestResult:
        """The request's result as it stands.

        Returns:
            The `RequestResult`: outputs and cost once completed, else the current status.

        Raises:
            NotFoundError: RunComfy knows no such request.
            RunComfyError: The API refused or could not be reached (after retries).
        """
        async with self.credentials.get_async_client() as client:
            return await client.result(self.request_id)

    @async_dispatch(afetch_result)
    def fetch_result(self) -> RequestResult:
        """The request's result as it stands.

        Returns:
            The `RequestResult`: outputs and cost once completed, else the current status.

        Raises:
            NotFoundError: RunComfy knows no such request.
            RunComfyError: The API refused or could not be reached (after retries).
        """
        return run_coro_as_sync(self.afetch_result())

    async def acancel(self) -> CancelResult:
        """Cancel the request while it is queued.

        Returns:
            The `CancelResult`: `outcome` is `cancelled`, or `not_cancellable` for a
            request already running (it runs on, and is billed).

        Raises:
            RunComfyError: The API refused or could not be reached (after retries).
        """
        async with self.credentials.get_async_client() as client:
            result = await client.cancel(self.request_id)
        log_cancel_outcome(self.logger, self.request_id, result.outcome)
        return result

    @async_dispatch(acancel)
    def cancel(self) -> CancelResult:
        """Cancel the request while it is queued.

        Returns:
            The `CancelResult`: `outcome` is `cancelled`, or `not_cancellable` for a
            request already running (it runs on, and is billed).

        Raises:
            RunComfyError: The API refused or could not be reached (after retries).
        """
        return run_coro_as_sync(self.acancel())


class NanoBananaEditJob(JobBlock):
    """
    A Nano Banana Pro image edit on the RunComfy Model API, saved with its settings.

    Save it once (in the UI or in code) and every `trigger()` submits the same
    edit, through the one submit guard: `trigger(job_key="...")` twice (in one
    process or several) submits once, the second call adopting the first's request.

    Example:
        Run a saved edit and wait for its images:
        ```python
        from prefect import flow
        from prefect_nanobanana import NanoBananaEditJob

        @flow
        def edit_once():
            job = NanoBananaEditJob.load("BLOCK_NAME")
            result = job.trigger().wait_for_completion()
            return result.output_urls
        ```
    """

    _block_type_name = "Nano Banana Edit Job"
    _logo_url = RunComfyCredentials._logo_url
    _documentation_url = "https://docs.runcomfy.com/model-apis/quickstart"
    _description = "A Nano Banana Pro image edit on the RunComfy Model API, with its settings."
    _code_example = """
    ```python
    from prefect_nanobanana import NanoBananaEditJob

    nano_banana_edit_job_block = NanoBananaEditJob.load("BLOCK_NAME")
    job_run = nano_banana_edit_job_block.trigger()
    result = job_run.wait_for_completion()
    ```
    """

    credentials: RunComfyCredentials = Field(
        default_factory=RunComfyCredentials,
        description="The RunComfy credentials to submit with.",
    )
    prompt: str = Field(min_length=1, description="The edit instruction.")
    image_urls: list[str] = Field(
        min_length=1,
        max_length=20,
        description="1 to 20 input image URLs that RunComfy can fetch (public or pre-signed).",
    )
    aspect_ratio: AspectRatio = Field(default="auto", description="Output aspect ratio.")
    resolution: Resolution = Field(default="1K", description="Output resolution.")
    output_format: OutputFormat = Field(default="png", description="Output image format.")
    num_images: int = Field(default=1, ge=1, le=4, description="How many images to produce.")
    sync_mode: bool = Field(
        default=False,
        description="Return images as data URIs and keep nothing in the request history.",
    )
    timeout_seconds: float | None = Field(
        default=600.0,
        gt=0,
        description="How long waiting for completion may take; empty waits without limit.",
    )

    def edit_input(self) -> NanoBananaEditInput:
        """The block's settings as the request body, validated before a paid submit.

        Returns:
            The `NanoBananaEditInput` that `trigger` submits.

        Raises:
            pydantic.ValidationError: A setting the API would refuse (checked here, unpaid).
        """
        return NanoBananaEditInput(**self.model_dump(include=set(NanoBananaEditInput.model_fields)))

    async def atrigger(self, job_key: str | None = None) -> NanoBananaEditJobRun:
        """Submit the edit through the submit guard (billed once per job key).

        Args:
            job_key: Names the job. The same key again (another trigger, another
                run, another process; another machine too when `NANOBANANA_LOCK_URL`
                names a Redis) adopts the request instead of paying twice. None: a
                fresh job, scoped to the current flow run when there is one (a retry
                of the run resumes its request).

        Returns:
            A `NanoBananaEditJobRun` to wait on, fetch or cancel; `adopted` is True
            when an earlier trigger with the key had submitted it.

        Raises:
            SubmitOutcomeUnknownError: A submit with this key may have been billed and
                its outcome is unknown (a 5xx, a timeout, a process that died); it is
                never resent.
            AuthenticationError: The API token was refused.
            InsufficientBalanceError: The account balance is too low.
            pydantic.ValidationError: The block's settings are not a valid edit.
        """
        submitted = await asubmit_through_pipeline(
            self.edit_input(), self.credentials, job_key, log=self.logger
        )
        return NanoBananaEditJobRun(
            request_id=submitted.request_id,
            credentials=self.credentials,
            resolution=self.resolution,
            timeout_seconds=self.timeout_seconds,
            result_url=submitted.result_url,
            submitted_at=submitted.submitted_at,
            job_key=submitted.job_key,
            adopted=submitted.adopted or submitted.resumed,
        )

    @async_dispatch(atrigger)
    def trigger(self, job_key: str | None = None) -> NanoBananaEditJobRun:
        """Submit the edit through the submit guard (billed once per job key).

        Args:
            job_key: Names the job. The same key again (another trigger, another
                run, another process of this machine) adopts the request instead of
                paying twice. None: a fresh job, scoped to the current flow run
                when there is one (a retry of the run resumes its request).

        Returns:
            A `NanoBananaEditJobRun` to wait on, fetch or cancel; `adopted` is True
            when an earlier trigger with the key had submitted it.

        Raises:
            SubmitOutcomeUnknownError: A submit with this key may have been billed and
                its outcome is unknown (a 5xx, a timeout, a process that died); it is
                never resent.
            AuthenticationError: The API token was refused.
            InsufficientBalanceError: The account balance is too low.
            pydantic.ValidationError: The block's settings are not a valid edit.
        """
        with signals_deferred():  # a stop takes effect once the request id is recorded
            return run_coro_as_sync(self.atrigger(job_key))
