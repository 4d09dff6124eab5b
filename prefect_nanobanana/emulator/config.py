"""How an emulator behaves: tokens, capacity, clock, money, retention and faults.

One frozen value, so a test can build a variant with `dataclasses.replace` and
the server never has to guard against settings changing under a running job
(faults are the exception: they change at runtime through `set_faults`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .faults import FaultPlan, plan_of

# Resellers' prices for Nano Banana Pro edits (the contract's "observed" figures).
DEFAULT_PRICE_PER_IMAGE_USD: Mapping[str, float] = {"1K": 0.15, "2K": 0.15, "4K": 0.30}
# The largest request body the provider's clients send (observed: 64 MiB, inline images included).
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class EmulatorConfig:
    """Settings of one emulator; every default mirrors the real service's behaviour.

    `time_scale` shrinks the drawn job durations so tests and demos do not wait
    a minute per image; `fixed_duration_seconds` replaces the draw entirely (in
    real seconds, not scaled) when a test needs exact timing. `max_request_bytes`
    refuses larger bodies (HTTP 413) without reading them: inline `data:` inputs
    make submits big, and the provider's clients stop at 64 MiB.
    """

    api_tokens: tuple[str, ...] = ("test-token",)
    workers: int = 4
    time_scale: float = 1.0
    fixed_duration_seconds: float | None = None
    seed: int | None = None
    balance_usd: float | None = None
    price_per_image_usd: Mapping[str, float] = field(
        default_factory=lambda: dict(DEFAULT_PRICE_PER_IMAGE_USD)
    )
    # The listed price is no guaranteed minimum: a bill above it (2.0 bills twice
    # the listed price) lets tests check that a budget counts billed cost, not list.
    bill_multiplier: float = 1.0
    output_ttl_seconds: float | None = None
    output_min_bytes: int = 0
    auth_errors_as_http_200: bool = False
    input_fetch_timeout_seconds: float = 10.0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    faults: FaultPlan = field(default_factory=FaultPlan)

    def __post_init__(self) -> None:
        # Callers easily pass a list; store a tuple so the frozen value cannot change later.
        object.__setattr__(self, "api_tokens", tuple(self.api_tokens))
        # A spec string or a list of faults is accepted too, as in `EmulatorServer.set_faults`.
        object.__setattr__(self, "faults", plan_of(self.faults))
        if not self.api_tokens or not all(token.strip() for token in self.api_tokens):
            raise ValueError("api_tokens must hold at least one non-blank token")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.time_scale < 0:
            raise ValueError("time_scale must not be negative")
        if self.fixed_duration_seconds is not None and self.fixed_duration_seconds < 0:
            raise ValueError("fixed_duration_seconds must not be negative")
        if self.output_ttl_seconds is not None and self.output_ttl_seconds < 0:
            raise ValueError("output_ttl_seconds must not be negative")
        if self.max_request_bytes < 1:
            raise ValueError("max_request_bytes must be at least 1")
        if self.output_min_bytes < 0:
            raise ValueError("output_min_bytes must not be negative")
        if self.bill_multiplier < 0:
            raise ValueError("bill_multiplier must not be negative")
        missing = {"1K", "2K", "4K"} - set(self.price_per_image_usd)
        if missing:
            raise ValueError(f"price_per_image_usd lacks {sorted(missing)}")

    def cost_usd(self, resolution: str, num_images: int) -> float:
        """What a request is billed: the listed per-image price of its resolution times the
        count, times `bill_multiplier`."""
        return round(self.price_per_image_usd[resolution] * num_images * self.bill_multiplier, 6)
