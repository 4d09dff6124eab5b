"""The `edit_and_archive` flow: stage inputs → edit → archive outputs.

Its job goes through the pipeline as `edit_image`'s does (`edit.run_edit`), with
the archive as its last step, and it stops the same way (`stopping.RunStop`): a
queued request is withdrawn when the run is cancelled or told to stop, and outputs
already produced are archived before the run ends.
The job key is made from the sources as the user gave them, not from
the staged URLs, whose signatures change every time they are made: a retry of
the flow run restages, and still resumes the same request.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, Field

from .. import previews
from ..blocks.credentials import (
    DEFAULT_CREDENTIALS_BLOCK,
    RunComfyCredentials,
    daily_budget_of,
    resolve_credentials,
    warn_of_signed_urls_in_parameters,
)
from ..client import (
    NANO_BANANA_EDIT_MODEL_ID,
    AspectRatio,
    NanoBananaEditInput,
    OutputFormat,
    Resolution,
)
from ..pipeline import Job, JobOutcome
from ..storage import DEFAULT_ARCHIVE_URI, StagedAsset, job_key_for
from ..storage.backends import open_backend
from ..tasks import cancel_recorded_requests
from ..tasks.guard import job_scope
from ..tasks.requests import RequestObserver, edit_job
from ..tasks.storage import resolve_location, stage_images
from .edit import edit_in_this_run, estimate_within_budget, remote_seconds


class EditAndArchiveResult(BaseModel):
    """Where one edit's outputs were archived, and what it cost."""

    request_id: str = Field(description="The RunComfy request id.")
    output_locations: list[str] = Field(description="The archived images, in output order.")
    metadata_location: str = Field(description="The request's metadata.json.")
    statuses: list[str] = Field(description="The statuses seen while waiting.")
    cost: float | None = Field(default=None, description="The cost RunComfy reported.")
    estimated_cost: float | None = Field(
        default=None, description="An estimate from the listed price (with max_cost_usd)."
    )
    seconds: float | None = Field(default=None, description="Submit to finish, in seconds.")
    resumed: bool = Field(description="True when an earlier attempt of this run submitted it.")


@flow(name="nano-banana-edit-and-archive", on_cancellation=[cancel_recorded_requests])
def edit_and_archive(
    prompt: Annotated[str, Field(min_length=1)],
    images: list[str],
    archive_uri: Annotated[str, Field(min_length=1)] = DEFAULT_ARCHIVE_URI,
    staging_uri: str | None = None,
    aspect_ratio: AspectRatio = "auto",
    resolution: Resolution = "1K",
    output_format: OutputFormat = "png",
    num_images: Annotated[int, Field(ge=1, le=4)] = 1,
    credentials: RunComfyCredentials | str = DEFAULT_CREDENTIALS_BLOCK,
    aws_credentials: str | None = None,
    timeout_seconds: Annotated[float, Field(gt=0)] = 600,
    max_cost_usd: Annotated[float, Field(ge=0)] | None = None,
    daily_budget_usd: Annotated[float, Field(ge=0)] | None = None,
) -> EditAndArchiveResult:
    """Stage images, edit them with Nano Banana Pro, and archive the outputs with metadata.

    Args:
        prompt: The edit instruction.
        images: Local files, folders, globs, s3:// objects or https:// URLs (1 to 20 images).
        archive_uri: A local folder (default), s3://bucket/prefix or s3-bucket://BLOCK/prefix.
        staging_uri: Where local inputs are uploaded for RunComfy to fetch: s3://…,
            s3-bucket://…, or a loopback object store's URL. Without one, local images
            are sent inline as data: URIs (up to 6 MiB each, 64 MiB in all).
        aspect_ratio: Output aspect ratio; "auto" follows the input image.
        resolution: Output resolution.
        output_format: Output image format.
        num_images: How many images to produce (1 to 4).
        credentials: A `RunComfyCredentials` block or its name ("default" falls back
            to the RUNCOMFY_* environment variables).
        aws_credentials: The name of a prefect-aws `AwsCredentials` block for S3;
            None uses boto3's standard chain and AWS_ENDPOINT_URL.
        timeout_seconds: How long to wait for the edit (a queued request is then cancelled).
        max_cost_usd: A budget in USD: when the edit's estimate (listed price x images,
            4K double) is over it, or the price cannot be looked up, the flow raises
            `BudgetExceededError` before staging or paying.
        daily_budget_usd: A cap in USD per UTC day shared by every run, chunk and
            machine using `archive_uri` (its total is kept beside the ledger); overrides
            the credentials block's. Over it, `BudgetExceededError` before paying,
            naming `daily_budget_usd`.

    Returns:
        An `EditAndArchiveResult`: the request id, where each output and its
        `metadata.json` were archived, the statuses seen, the cost.

    Raises:
        StagingError: An input is missing, is not an image or is over a cap (unpaid).
        BudgetExceededError: The estimate is over `max_cost_usd`, or the day's total
            would pass `daily_budget_usd` (unpaid).
        JobFailedError: The edit failed at RunComfy.
        WaitTimeoutError: `timeout_seconds` passed; a queued request is cancelled.
        ArchiveError: An output could not be archived; it names the request.

    Example:
        ```python
        from prefect_nanobanana import edit_and_archive

        result = edit_and_archive(
            prompt="Add a lighthouse", images=["photo.png"], archive_uri="s3://bucket/edited"
        )
        print(result.output_locations, result.metadata_location)
        ```
    """
    warn_of_signed_urls_in_parameters()
    options = {
        "aspect_ratio": aspect_ratio,
        "resolution": resolution,
        "output_format": output_format,
        "num_images": num_images,
    }
    # Options and counts are checked before anything is uploaded or paid for.
    checked = NanoBananaEditInput(prompt=prompt, image_urls=images, **options)
    resolved = resolve_credentials(credentials)
    daily = daily_budget_of(daily_budget_usd, resolved)
    estimated_cost = estimate_within_budget(resolved, checked, max_cost_usd, daily)
    archive = resolve_location(archive_uri, aws_credentials)
    assert archive.location is not None
    # The archive must take the outputs before the edit is paid for.
    open_backend(archive.location, archive.s3_client).check()
    staged = stage_images(images, staging_uri, aws_credentials)
    edit = NanoBananaEditInput(prompt=prompt, image_urls=[asset.url for asset in staged], **options)
    # The sources as given, not the staged URLs (new signatures on every retry).
    job = edit_job(
        edit,
        job_key_for(prompt, images, options, scope=job_scope()),
        options=options,
        sources=[asset.provenance for asset in staged],
        estimated_cost=estimated_cost,
    )
    return edit_in_this_run(  # type: ignore[return-value]
        resolved,
        job,
        lambda outcome, observer: _archived(
            outcome, observer, job, staged, archive_uri, aws_credentials
        ),
        timeout_seconds=timeout_seconds,
        daily_budget_usd=daily,
        archive=archive,
        aws_credentials=aws_credentials,
    )


def _archived(
    outcome: JobOutcome,
    observer: RequestObserver,
    job: Job,
    staged: list[StagedAsset],
    archive_uri: str,
    aws_credentials: str | None,
) -> EditAndArchiveResult:
    """Where the job's outputs went, shown in the run (when this run archived them)."""
    request, result = outcome.request, outcome.result
    assert request is not None and result is not None
    archived = outcome.record or outcome.archived_elsewhere
    assert archived is not None and archived.metadata_location is not None
    if outcome.record is not None:
        sources = [asset.source for asset in staged]
        previews.announce_archived(
            get_run_logger(),
            "Edit",
            outcome.record,
            sources=sources,
            model_id=NANO_BANANA_EDIT_MODEL_ID,
            prompt=job.prompt,
            cost=result.cost,
            resolution=job.options["resolution"],
        )
        previews.show_edit(
            outcome.record,
            sources=sources,
            prompt=job.prompt,
            cost=result.cost,
            archive_uri=archive_uri,
            aws_credentials=aws_credentials,
        )
    return EditAndArchiveResult(
        request_id=request.request_id,
        output_locations=archived.output_locations,
        metadata_location=archived.metadata_location,
        statuses=observer.trail.outcome(result).statuses,
        cost=outcome.cost,
        estimated_cost=job.estimated_cost,
        seconds=remote_seconds(request, result),
        resumed=request.resumed,
    )
