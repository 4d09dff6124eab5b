"""Cost safety without Prefect: an estimate before the first submit, a budget during a run.

Every submit is billed and the API has no idempotency key, so the only way to stay
within a budget is to decide before each paid submit. The listed price
(`GET /v1/models/{model_id}`) is no guaranteed minimum: an estimate starts from it,
and the billed `cost` of each finished request replaces that request's estimate
as soon as it is known.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import NanoBananaError

if TYPE_CHECKING:  # light at runtime: the CLI's exit-code table imports this module
    from .models import ModelInfo, NanoBananaEditInput

# Third-party prices are about $0.15 an image at 1K and 2K and $0.30 at 4K, while the
# API lists one base price: 4K counts double unless the caller knows better.
DEFAULT_RESOLUTION_FACTORS: Mapping[str, float] = {"1K": 1.0, "2K": 1.0, "4K": 2.0}
# A hair of tolerance in comparisons: twelve additions of 0.15 are not exactly 1.80.
BUDGET_TOLERANCE_USD = 1e-9


def format_usd(amount: float) -> str:
    """Money as people read it on a bill: `$1.80`."""
    return f"${amount:,.2f}"


def row_estimate_usd(
    base_price_usd: float,
    *,
    resolution: str = "1K",
    num_images: int = 1,
    resolution_factors: Mapping[str, float] | None = None,
) -> float:
    """The estimate of one paid submit: base price * images * the resolution's factor."""
    factors = {**DEFAULT_RESOLUTION_FACTORS, **(resolution_factors or {})}
    return round(base_price_usd * num_images * factors.get(resolution, 1.0), 6)


@dataclass(frozen=True)
class CostEstimate:
    """The estimate of the rows that still need a paid submit (done rows cost nothing)."""

    base_price_usd: float
    rows_to_pay: int
    images: int
    estimate_usd: float
    by_resolution: Mapping[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        """The estimate in a few words, for messages.

        Returns:
            E.g. `estimated $1.80 for 12 rows to pay`.
        """
        return f"estimated {format_usd(self.estimate_usd)} for {self.rows_to_pay} rows to pay"


def estimate_cost(
    base_price_usd: float,
    rows: Iterable[tuple[str, int]],
    *,
    resolution_factors: Mapping[str, float] | None = None,
) -> CostEstimate:
    """Sum the estimates of the rows still to pay.

    Args:
        base_price_usd: The listed price of one image (`ModelInfo.base_price_usd`).
        rows: A `(resolution, num_images)` pair per row that needs a paid submit.
        resolution_factors: Multipliers per resolution over the defaults (4K: 2.0).

    Returns:
        The `CostEstimate`: rows, images, the total and the total by resolution.

    Example:
        ```python
        estimate_cost(0.15, [("1K", 1), ("4K", 2)]).estimate_usd  # 0.15 + 0.6 = 0.75
        ```
    """
    by_resolution: dict[str, float] = {}
    rows_to_pay = images = 0
    for resolution, num_images in rows:
        rows_to_pay += 1
        images += num_images
        estimate = row_estimate_usd(
            base_price_usd,
            resolution=resolution,
            num_images=num_images,
            resolution_factors=resolution_factors,
        )
        by_resolution[resolution] = by_resolution.get(resolution, 0.0) + estimate
    return CostEstimate(
        base_price_usd=base_price_usd,
        rows_to_pay=rows_to_pay,
        images=images,
        estimate_usd=round(sum(by_resolution.values()), 6),
        by_resolution={key: round(value, 6) for key, value in sorted(by_resolution.items())},
    )


class BudgetExceededError(NanoBananaError):
    """A submit would cost more than `max_cost_usd` (or the price to tell is unknown).

    Raised before anything is paid: before a run's first submit, the message names
    the estimate, the budget and how many rows were to be paid for; during a batch
    (`spent_usd` given), it names what was spent so far and the held-back row's
    estimate. `estimate_usd` is None when the price lookup failed, since under a
    budget an unknown price refuses just like a high one. A cap shared beyond the
    run (`daily_budget_usd`, a chunked batch's `max_cost_usd`) names itself in
    `cap_name` and says its own `message` (the stored total's refusal).
    """

    def __init__(
        self,
        estimate_usd: float | None,
        max_cost_usd: float,
        rows_to_pay: int,
        reason: str | None = None,
        spent_usd: float | None = None,
        *,
        cap_name: str = "max_cost_usd",
        message: str | None = None,
    ) -> None:
        self.estimate_usd = estimate_usd
        self.max_cost_usd = max_cost_usd
        self.rows_to_pay = rows_to_pay
        self.reason = reason
        self.spent_usd = spent_usd
        self.cap_name = cap_name
        budget = f"{cap_name}={format_usd(max_cost_usd)}"
        if message is None and estimate_usd is None:
            message = (
                f"No estimate for {rows_to_pay} rows to pay ({reason or 'the price is unknown'}), "
                f"so the budget {budget} cannot be checked; nothing was submitted"
            )
        elif message is None and spent_usd is not None:
            message = (
                f"held back by the budget: spent {format_usd(spent_usd)} (billed, plus estimates "
                f"of requests in flight) and the next submit's estimated "
                f"{format_usd(estimate_usd)} would pass {budget}; nothing was submitted for it"
            )
        elif message is None:
            message = (
                f"The estimated cost {format_usd(estimate_usd)} of {rows_to_pay} rows to pay is "
                f"over the budget {budget}; nothing was submitted"
            )
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect pickles a failed flow's exception (a deployment's run): keep the figures.
        figures = (self.estimate_usd, self.max_cost_usd, self.rows_to_pay)
        named = {"cap_name": self.cap_name, "message": self.message}
        return (_rebuild_error, (type(self), (*figures, self.reason, self.spent_usd), named))


def _rebuild_error(cls: type[Exception], args: tuple[Any, ...], named: dict[str, Any]) -> Exception:
    """Unpickle an error whose constructor takes keyword-only arguments."""
    return cls(*args, **named)


def refuse_over_budget(
    estimate: CostEstimate | None,
    max_cost_usd: float | None,
    *,
    rows_to_pay: int,
    lookup_failure: str | None = None,
) -> None:
    """The check before the first submit: raise `BudgetExceededError` when over (or unknown).

    Without a budget nothing is refused: an unknown price only costs the estimate.
    """
    if max_cost_usd is None or rows_to_pay == 0:
        return
    if estimate is None:
        raise BudgetExceededError(
            estimate_usd=None,
            max_cost_usd=max_cost_usd,
            rows_to_pay=rows_to_pay,
            reason=lookup_failure,
        )
    if estimate.estimate_usd > max_cost_usd + BUDGET_TOLERANCE_USD:
        raise BudgetExceededError(
            estimate_usd=estimate.estimate_usd, max_cost_usd=max_cost_usd, rows_to_pay=rows_to_pay
        )


def base_price_of(info: ModelInfo) -> float:
    """The listed base price; a ValueError when the answer has none to estimate from."""
    if info.base_price_usd is None or info.base_price_usd < 0:
        raise ValueError(f"the model {info.model_id!r} lists no usable base_price_usd")
    return info.base_price_usd


def estimate_edit(
    info: ModelInfo | None,
    edit: NanoBananaEditInput,
    max_cost_usd: float | None,
    *,
    lookup_failure: str | None = None,
) -> CostEstimate | None:
    """One edit's estimate from a price lookup's answer, refused when over `max_cost_usd`.

    `info` None means the lookup failed (`lookup_failure` says why): under a budget
    that refuses; without one there is no estimate.
    """
    estimate = None
    if info is not None:
        try:
            estimate = estimate_cost(base_price_of(info), [(edit.resolution, edit.num_images)])
        except ValueError as error:
            lookup_failure = str(error)
    refuse_over_budget(estimate, max_cost_usd, rows_to_pay=1, lookup_failure=lookup_failure)
    return estimate


class CostBudget:
    """Spent = billed cost of finished requests + estimates of those in flight.

    `reserve` is asked right before each paid submit and says no once the row's
    estimate would take the spend over the budget, so the overshoot is bounded by
    the bills of the rows already in flight exceeding their estimates. One batch's
    rows share it in one event loop, so a check and its reservation are one step.
    """

    def __init__(self, max_cost_usd: float | None) -> None:
        if max_cost_usd is not None and max_cost_usd < 0:
            raise ValueError("max_cost_usd must not be negative")
        self.max_cost_usd = max_cost_usd
        self.billed_usd = 0.0
        self.in_flight_usd = 0.0

    @property
    def spent_usd(self) -> float:
        """The billed cost of finished requests plus the estimates of those in flight."""
        return self.billed_usd + self.in_flight_usd

    def reserve(self, estimate_usd: float) -> bool:
        """Count a row's estimate as in flight if it still fits the budget.

        Args:
            estimate_usd: The row's estimate, asked right before its paid submit.

        Returns:
            True when it fits (it is now counted as in flight); False holds the row.
        """
        if (
            self.max_cost_usd is not None
            and self.spent_usd + estimate_usd > self.max_cost_usd + BUDGET_TOLERANCE_USD
        ):
            return False
        self.in_flight_usd += estimate_usd
        return True

    def release(self, estimate_usd: float) -> None:
        """Forget a row's estimate: its submit provably cost nothing (refused, never sent).

        Args:
            estimate_usd: The estimate `reserve` counted for the row.
        """
        self.in_flight_usd = max(0.0, self.in_flight_usd - estimate_usd)

    def settle(self, estimate_usd: float, billed_usd: float | None) -> None:
        """A request ended: its bill replaces its estimate.

        Args:
            estimate_usd: The estimate `reserve` counted for the row.
            billed_usd: The billed cost; None counts the estimate instead.
        """
        self.in_flight_usd = max(0.0, self.in_flight_usd - estimate_usd)
        self.billed_usd += estimate_usd if billed_usd is None else billed_usd


def daily_spend(
    bills: Iterable[tuple[dt.datetime, float | None]], *, since: dt.date | None = None
) -> dict[dt.date, float]:
    """Billed cost summed by UTC day of the submit (requests with no bill are left out).

    `since` keeps the days from that date on: the monthly-bill check of a data team.
    """
    by_day: dict[dt.date, float] = {}
    for submitted_at, billed_usd in bills:
        if billed_usd is None:
            continue
        if submitted_at.tzinfo is None:  # a naive time is taken as UTC
            submitted_at = submitted_at.replace(tzinfo=dt.timezone.utc)
        day = submitted_at.astimezone(dt.timezone.utc).date()
        if since is None or day >= since:
            by_day[day] = by_day.get(day, 0.0) + billed_usd
    return {day: round(total, 6) for day, total in sorted(by_day.items())}


@dataclass
class ResolutionSpend:
    """One line of a run's cost summary: what was estimated and what was billed."""

    resolution: str
    rows: int = 0
    estimated_usd: float = 0.0
    billed_usd: float = 0.0


def spend_by_resolution(
    rows: Iterable[tuple[str, float | None, float | None]],
) -> list[ResolutionSpend]:
    """`(resolution, estimate, bill)` per paid row, summed by resolution (sorted)."""
    lines: dict[str, ResolutionSpend] = {}
    for resolution, estimated_usd, billed_usd in rows:
        line = lines.setdefault(resolution, ResolutionSpend(resolution))
        line.rows += 1
        line.estimated_usd = round(line.estimated_usd + (estimated_usd or 0.0), 6)
        line.billed_usd = round(line.billed_usd + (billed_usd or 0.0), 6)
    return [lines[key] for key in sorted(lines)]
