"""Typed shapes of the RunComfy Model API for google/nano-banana/pro/edit.

The input model validates everything the API documents, so a bad request fails
here, before a billed submit. Response models keep unknown fields: the server
may add some, and dropping them would hide information from users.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

from .vocabulary import AspectRatio, OutputFormat, Resolution

TERMINAL_STATES: frozenset[str] = frozenset({"completed", "cancelled", "failed"})

# The API documents no prompt limit. 20,000 characters is about 5,000 tokens, ten
# times the longest edit instruction a person writes and far inside the model's
# input window even beside 20 images; past it, a prompt is a pasted file or a
# template bug, and is refused before it is paid for.
MAX_PROMPT_CHARS = 20_000

# A request id goes into URL paths, archive folder names, ledger keys and labels.
# The provider issues UUIDs; anything outside this charset and length is refused.
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# Aliases seen in the provider's own clients.
_STATUS_ALIASES = {"succeeded": "completed", "canceled": "cancelled"}


def check_request_id(request_id: object) -> str:
    """Check that a request id is safe to use in a URL path and a file name.

    Letters, digits, `.`, `_` and `-`, starting with a letter or digit (so never
    `.` or `..`), at most `MAX_REQUEST_ID_CHARS` characters.

    Args:
        request_id: What a server or a user gave as a request id.

    Returns:
        The request id, unchanged.

    Raises:
        ValueError: It is not a request id; the message quotes at most its first
            40 characters.
    """
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request id is missing or not a string ({type(request_id).__name__})")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise ValueError(
            f"request id is {len(request_id)} characters long "
            f"(at most {MAX_REQUEST_ID_CHARS}): {request_id[:40]!r}…"
        )
    if not _REQUEST_ID_RE.fullmatch(request_id):
        raise ValueError(
            f"request id {request_id!r} is not a request id "
            "(letters, digits, '.', '_' and '-', starting with a letter or digit)"
        )
    return request_id


def normalize_status(status: str | None) -> str:
    """Map the provider's spelling variants onto the documented status names."""
    value = (status or "").strip().lower()
    return _STATUS_ALIASES.get(value, value)


class _ServerModel(BaseModel):
    """Base for responses: unknown server fields are kept, never rejected."""

    model_config = ConfigDict(extra="allow")


class NanoBananaEditInput(BaseModel):
    """The documented input of google/nano-banana/pro/edit, checked before a paid submit.

    Validation errors do not quote the input: an image URL may be pre-signed.
    """

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description=f"The edit instruction (at most {MAX_PROMPT_CHARS:,} characters).",
    )
    image_urls: list[str] = Field(
        min_length=1, max_length=20, description="1 to 20 publicly fetchable image URLs."
    )
    aspect_ratio: AspectRatio = Field(default="auto", description="Output aspect ratio.")
    resolution: Resolution = Field(default="1K", description="Output resolution.")
    output_format: OutputFormat = Field(default="png", description="Output image format.")
    num_images: int = Field(default=1, ge=1, le=4, description="How many images to produce.")
    sync_mode: bool = Field(
        default=False, description="Return data URIs and keep nothing in request history."
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must not be blank")
        return prompt

    @field_validator("image_urls")
    @classmethod
    def _urls_not_blank(cls, image_urls: list[str]) -> list[str]:
        for url in image_urls:
            if not url or not url.strip():
                raise ValueError("image_urls must not contain empty strings")
        return image_urls


class RequestHandle(_ServerModel):
    """What a submit returns: the request id and where to follow it."""

    request_id: str
    status_url: str | None = None
    result_url: str | None = None
    cancel_url: str | None = None


class RequestStatus(_ServerModel):
    """A status poll; `status` is normalised (succeeded→completed, canceled→cancelled)."""

    request_id: str
    status: str
    queue_position: int | None = None

    @field_validator("status", mode="before")
    @classmethod
    def _normalize(cls, status: Any) -> str:
        return normalize_status(status)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATES


def collect_output_urls(output: Any) -> list[str]:
    """Every media URL of an output in order: image, images, video, videos."""
    if not isinstance(output, dict):
        return []
    urls: list[str] = []
    for key in ("image", "images", "video", "videos"):
        value = output.get(key)
        if isinstance(value, str):
            urls.append(value)
        elif isinstance(value, list):
            urls.extend(item for item in value if isinstance(item, str))
    return urls


class RequestResult(_ServerModel):
    """A result fetch: the raw `output` plus the media URLs pulled out of it."""

    request_id: str
    status: str
    output: dict[str, Any] | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    cost: float | None = None
    error: Any = None

    @field_validator("status", mode="before")
    @classmethod
    def _normalize(cls, status: Any) -> str:
        return normalize_status(status)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def output_urls(self) -> list[str]:
        return collect_output_urls(self.output)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATES


class ModelInfo(_ServerModel):
    """A model's listed price (`GET /v1/models/{model_id}`, observed, not documented).

    The listed base price is what an estimate starts from, not a guaranteed
    minimum: the billed `cost` of a result is the truth.
    """

    model_id: str
    base_price_usd: float | None = None
    price_unit: str | None = None
    pricing_note: str | None = None


class CancelResult(_ServerModel):
    """A cancel answer: `outcome` says whether the job was still queued."""

    request_id: str
    status: str | None = None
    outcome: Literal["cancelled", "not_cancellable"]

    @field_validator("status", mode="before")
    @classmethod
    def _normalize(cls, status: Any) -> str | None:
        return None if status is None else normalize_status(status)
