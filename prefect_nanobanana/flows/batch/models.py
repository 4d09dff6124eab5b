"""The batch's public models (rows in, rows out) and the plan of one row."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from ...client import (
    AspectRatio,
    OutputFormat,
    Resolution,
)
from ...storage import (
    LedgerEntry,
    strip_signature,
)

# adopted: another run submitted (and paid for) the row's request while this one ran;
# this run waited on it and reports its outputs (archived once, by whichever got there).
RowStatus = Literal["archived", "skipped", "adopted", "failed"]


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


class BatchRowResult(BaseModel):
    """How one row ended; one line of the results manifest."""

    row: int = Field(description="1-based position of the row in the batch.")
    id: str | None = None
    status: RowStatus
    request_id: str | None = None
    prompt: str
    sources: list[str] = Field(default_factory=list, description="Inputs, signatures removed.")
    output_locations: list[str] = Field(default_factory=list)
    metadata_location: str | None = None
    cost: float | None = Field(
        default=None, description="What RunComfy billed for the row, whichever run paid it."
    )
    seconds: float | None = None
    error: str | None = None
    adopted_from: str | None = Field(
        default=None, description="When adopted: the flow run that submitted the request."
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

    @property
    def output_locations(self) -> list[str]:
        return [location for row in self.rows for location in row.output_locations]


class BatchFailedError(RuntimeError):
    """Some rows failed (and `allow_partial` was off); `result` has every row."""

    def __init__(self, message: str, result: BatchEditResult | None = None) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect pickles a failed flow's exception; keep the rows with it.
        return (type(self), (str(self), self.result))


class _RowPlan(BaseModel):
    """A row made ready: validated edit options, its job key, what the ledger knows."""

    row: int
    job: BatchJob
    options: dict[str, Any]
    job_key: str | None = None
    entry: LedgerEntry | None = None
    version: str | None = Field(default=None, description="The entry's version, as read.")
    image_urls: list[str] = Field(default_factory=list)
    error: str | None = None

    def result(self, status: RowStatus, **facts: Any) -> BatchRowResult:
        return BatchRowResult(
            row=self.row,
            id=self.job.id,
            status=status,
            prompt=self.job.prompt,
            sources=[strip_signature(source) for source in self.job.images],
            **facts,
        )
