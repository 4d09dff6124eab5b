"""The batch's public models (rows in, rows out) and the plan of one row."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...client import (
    AspectRatio,
    OutputFormat,
    Resolution,
)
from ...errors import NanoBananaError
from ...guard.protocol import Decision, decide
from ...storage import (
    LedgerEntry,
    strip_signature,
)

# adopted: another run submitted (and paid for) the row's request while this one ran;
# this run waited on it and reports its outputs (archived once, by whichever got there).
# over_budget: `max_cost_usd` held the row back before its paid submit; nothing was paid.
RowStatus = Literal["archived", "skipped", "adopted", "failed", "over_budget"]
# What a dry run says it would do with a row.
PlannedAction = Literal["pay", "adopt", "skip", "invalid"]


class BatchJob(BaseModel):
    """One edit of a batch; unset options take the batch's defaults."""

    prompt: str = Field(description="The edit instruction.")
    images: list[str] = Field(
        min_length=1, description="Local files, folders, globs, s3:// or https:// URLs."
    )
    aspect_ratio: AspectRatio | None = Field(default=None, description="Output aspect ratio.")
    resolution: Resolution | None = Field(default=None, description="Output resolution.")
    output_format: OutputFormat | None = Field(default=None, description="Output format.")
    num_images: int | None = Field(default=None, ge=1, le=4, description="Images to produce.")
    id: str | None = Field(default=None, description="A stable id, so reruns find the row.")
    content: str | None = Field(
        default=None,
        description="An identity of the image's bytes, for a row listed from `images_uri` "
        "(part of its job key: a replaced image is a new edit).",
    )


class BatchRowResult(BaseModel):
    """How one row ended; one line of the results manifest."""

    row: int = Field(description="1-based position of the row in the batch.")
    id: str | None = None
    status: RowStatus
    request_id: str | None = None
    prompt: str
    resolution: str | None = None
    sources: list[str] = Field(default_factory=list, description="Inputs, signatures removed.")
    output_locations: list[str] = Field(default_factory=list)
    metadata_location: str | None = None
    cost: float | None = Field(
        default=None, description="What RunComfy billed for the row, whichever run paid it."
    )
    estimated_cost: float | None = Field(
        default=None,
        description="An estimate from the listed price, for a row this run had to pay for; "
        "not a bill.",
    )
    seconds: float | None = None
    error: str | None = None
    new: bool = Field(
        default=False,
        description="The ledger had no record of the row when the run planned it: it needed "
        "a paid submit (not skipped, not adopted from an earlier run).",
    )
    adopted_from: str | None = Field(
        default=None, description="When adopted: the flow run that submitted the request."
    )
    output_thumbnails: list[str | None] = Field(
        default_factory=list,
        exclude=True,
        repr=False,
        description="Thumbnails made while archiving (rows the report previews), so the "
        "report does not download those outputs again.",
    )


class BatchEditResult(BaseModel):
    """What a batch did, for the next step of an ETL: no bucket listing needed."""

    rows: list[BatchRowResult]
    results_manifest: str = Field(description="Where the JSONL results manifest was written.")
    archived: int
    skipped: int
    failed: int
    total_cost: float = Field(description="What the batch's rows cost, whichever run paid.")
    adopted: int = Field(default=0, description="Rows another run submitted meanwhile.")
    paid_cost: float = Field(default=0.0, description="What this run itself paid for.")
    over_budget: int = Field(
        default=0,
        description="Rows a budget (`max_cost_usd`, `daily_budget_usd`) held back, unpaid.",
    )
    new: int = Field(
        default=0,
        description="Rows the ledger did not know when the run planned them (each needed a "
        "paid submit); the others were skipped (archived earlier) or adopted.",
    )
    estimated_cost: float | None = Field(
        default=None,
        description="The estimate, before the run, of the rows it had to pay for (None when "
        "the price could not be looked up).",
    )

    @property
    def output_locations(self) -> list[str]:
        return [location for row in self.rows for location in row.output_locations]


class PlannedRow(BaseModel):
    """What a dry run found for one row."""

    row: int
    id: str | None = None
    action: PlannedAction = Field(
        description="pay: needs a paid submit; adopt: waits on a request submitted earlier; "
        "skip: archived earlier; invalid: would fail before any submit."
    )
    request_id: str | None = None
    estimated_cost: float | None = Field(default=None, description="An estimate, not a bill.")
    error: str | None = None


class BatchDryRun(BaseModel):
    """What `batch_edit(dry_run=True)` found: nothing was submitted."""

    rows: list[PlannedRow]
    rows_to_pay: int
    rows_done: int = Field(description="Rows archived earlier: skipped, nothing to pay.")
    rows_adopted: int = Field(description="Rows whose request was submitted earlier.")
    rows_invalid: int
    base_price_usd: float | None = Field(description="The listed price per image; None: unknown.")
    estimated_cost: float | None = Field(
        description="The estimate of the rows to pay (None when the price is unknown)."
    )
    estimated_by_resolution: dict[str, float] = Field(default_factory=dict)


class BatchFailedError(NanoBananaError, RuntimeError):
    """Some rows failed or were held back by the budget (and `allow_partial` was off);
    `result` has every row."""

    def __init__(self, message: str, result: BatchEditResult | None = None) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect pickles a failed flow's exception; keep the rows with it.
        return (type(self), (str(self), self.result))


# The edit options a row may set for itself; the batch's own are its rows' defaults.
ROW_OPTIONS = frozenset({"aspect_ratio", "resolution", "output_format", "num_images"})


class BatchOptions(BaseModel):
    """One `batch_edit` run's options: the run form's fields, travelling as one value.

    The fields are the flow's parameters of the same names (see `batch_edit` for
    each); the rows, the manifest and the chunking are not among them (a location's
    listing, `images_uri` with its prompt and patterns, is: the parent lists it).
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    archive_uri: str
    staging_uri: str | None = None
    aspect_ratio: AspectRatio = "auto"
    resolution: Resolution = "1K"
    output_format: OutputFormat = "png"
    num_images: int = 1
    max_concurrency: int = 8
    concurrency_limit_name: str
    allow_partial: bool = False
    credentials: Any = Field(description="A `RunComfyCredentials` block or its name.")
    aws_credentials: str | None = None
    timeout_seconds: float = 1800
    results_uri: str | None = None
    preview_rows: int = 0
    max_cost_usd: float | None = None
    daily_budget_usd: float | None = None
    shared_budget_name: str | None = None
    dry_run: bool = False
    resolution_factors: dict[str, float] | None = None
    images_uri: str | None = None
    prompt: str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None

    @property
    def row_defaults(self) -> dict[str, Any]:
        """The edit options of a row that sets none of its own."""
        return self.model_dump(
            include={"aspect_ratio", "resolution", "output_format", "num_images"}
        )

    def chunk_parameters(self, credentials: str) -> dict[str, Any]:
        """The parameters every chunk's child run shares (`credentials`: a block's name).

        A chunk writes its own results manifest and is never a dry run; it draws
        `max_cost_usd` from the budget the parent shares with every chunk
        (`shared_budget_name`); the parent sets those per chunk.
        """
        shared = self.model_dump(
            exclude={
                "credentials",
                "results_uri",
                "shared_budget_name",
                "dry_run",
                # The parent lists the location; its chunks get the rows.
                "images_uri",
                "prompt",
                "include",
                "exclude",
            }
        )
        return {**shared, "credentials": credentials}


class _RowPlan(BaseModel):
    """A row made ready: validated edit options, its job key, what the ledger knows."""

    row: int
    job: BatchJob
    options: dict[str, Any]
    job_key: str | None = None
    entry: LedgerEntry | None = None
    version: str | None = Field(default=None, description="The entry's version, as read.")
    image_urls: list[str] = Field(default_factory=list)
    # Local images are checked when planning, and uploaded to the staging location (or,
    # without one, encoded inline as data: URIs of up to 6 MiB each) only right before
    # the row's submit: a long batch pays for its first rows while later ones wait their
    # turn, and never holds every row's images in memory.
    stage_at_submit: bool = False
    # What the ledger and metadata.json say the inputs were (`StagedAsset.provenance`).
    sources: list[str] = Field(default_factory=list)
    error: str | None = None
    estimated_cost: float | None = None
    new: bool = Field(default=False, description="The ledger had no entry for the row.")

    @property
    def decision(self) -> Decision | None:
        """What the guard says to do with the row's record (`guard.decide`); None: invalid."""
        return None if self.error is not None else decide(self.entry)

    @property
    def needs_paid_submit(self) -> bool:
        """Valid, and neither archived nor owning a request from an earlier run."""
        return self.decision == "pay"

    @property
    def label(self) -> str:
        """How logs and reports name the row: `row 3 (harbour-sunset)`, or `row 3`."""
        return f"row {self.row} ({self.job.id})" if self.job.id else f"row {self.row}"

    @property
    def run_name(self) -> str:
        """The row's task run name: `row-3`, with the row's id when it has one."""
        return f"row-{self.row} {self.job.id}" if self.job.id else f"row-{self.row}"

    def result(self, status: RowStatus, **facts: Any) -> BatchRowResult:
        return BatchRowResult(
            row=self.row,
            id=self.job.id,
            status=status,
            prompt=self.job.prompt,
            resolution=self.options.get("resolution"),
            sources=[strip_signature(source) for source in self.job.images],
            new=self.new,
            **facts,
        )
