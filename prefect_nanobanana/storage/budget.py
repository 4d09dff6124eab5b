"""Spend totals shared by every run of one archive: a daily cap, or one budget across chunks.

A run's `max_cost_usd` knows only that run. Three deployments, a nightly batch and
two people at the UI can each spend their whole budget on the same day, so the
running total lives with the archive, beside the ledger, where every run, chunk
and machine that uses the archive reads and writes it:
``{archive}/_budget/daily/{YYYY-MM-DD}.json`` (a UTC day), and for a budget shared
by the chunks of one batch ``{archive}/_budget/shared/{name}.json``.

Each paid submit *reserves* its estimate first (refused when the total would pass
the cap), then *settles* to what was billed, or *releases* the reservation when
nothing was submitted. The total counts settled bills plus reservations in
flight, so it can pass the cap only by what in-flight requests bill beyond their
estimates. A reservation whose process died stays in the total at its estimate
(its submit may have been paid) until its day ends.

Every change is a conditional write of the one record (``IfMatch`` on S3, an
atomic replace under a lock locally; see `backends`), retried on a lost race, so
no two writers ever both spend the same slack. Amounts are kept in whole
micro-dollars, so sums stay exact and a cap is not passed by rounding.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from .backends import Backend, open_backend
from .errors import StorageError
from .locations import join_key

__all__ = [
    "DAILY_BUDGET_NAME",
    "BudgetRefusal",
    "BudgetTotal",
    "DailyBudget",
    "Reservation",
    "SharedBudget",
    "daily_totals",
]

BUDGET_PREFIX = "_budget"
DAILY_PREFIX = join_key(BUDGET_PREFIX, "daily")
SHARED_PREFIX = join_key(BUDGET_PREFIX, "shared")
# The public name of the daily cap: refusals say it, so a held row's reason names it.
DAILY_BUDGET_NAME = "daily_budget_usd"
_MICRO = 1_000_000
_JSON = "application/json"
# A lost race re-reads and retries at once, then backs off with jitter; so many lost in a
# row means the store is not settling (or a writer is looping), not bad luck.
_MAX_ATTEMPTS = 200
_MAX_BACKOFF_SECONDS = 0.25


def _micro(usd: float) -> int:
    return round(usd * _MICRO)


def _usd(micro: int) -> float:
    return round(micro / _MICRO, 6)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class _Held(BaseModel):
    """One reservation in flight, as stored."""

    micro_usd: int
    at: dt.datetime
    host: str
    pid: int
    label: str | None = None


class _Record(BaseModel):
    """The stored running total of one budget (one UTC day, or one shared budget)."""

    spent_micro_usd: int = 0
    settled: int = 0
    cap_usd: float | None = Field(default=None, description="The cap the last reservation used.")
    reservations: dict[str, _Held] = Field(default_factory=dict)
    updated_at: dt.datetime | None = None

    @property
    def in_flight_micro_usd(self) -> int:
        return sum(held.micro_usd for held in self.reservations.values())


class Reservation(BaseModel):
    """A granted reservation: settle it to the bill, or release it when nothing was paid."""

    key: str = Field(description="The record it is held in, e.g. `daily/2026-12-07`.")
    id: str = Field(description="Unique among the record's reservations.")
    estimate_usd: float = Field(description="What was reserved.")
    cap_name: str = Field(description="The cap's public name, e.g. `daily_budget_usd`.")
    cap_usd: float = Field(description="The cap it was granted under.")
    total_usd: float = Field(
        description="The record's total (settled plus in flight) with this reservation in it."
    )


class BudgetRefusal(BaseModel):
    """A reservation refused: the total plus the estimate would pass the cap."""

    key: str = Field(description="The record that refused, e.g. `daily/2026-12-07`.")
    cap_name: str = Field(description="The cap's public name, e.g. `daily_budget_usd`.")
    cap_usd: float = Field(description="The cap.")
    total_usd: float = Field(description="Settled plus in flight when refused.")
    estimate_usd: float = Field(description="What was asked for.")

    @property
    def reason(self) -> str:
        """One line for a held row's error: names the cap, the total and the estimate."""
        where = self.key.removeprefix("daily/").removeprefix("shared/")
        day = " for the UTC day" if self.key.startswith("daily/") else ""
        return (
            f"{self.cap_name} ${self.cap_usd:.2f} reached{day} {where}: ${self.total_usd:.2f} "
            f"spent or in flight, the next submit's estimate ${self.estimate_usd:.2f} would pass it"
        )


class BudgetTotal(BaseModel):
    """A budget's running total as read: what was billed and what is in flight."""

    key: str = Field(description="The record, e.g. `daily/2026-12-07`.")
    spent_usd: float = Field(description="Settled: billed, or the estimate when no bill came.")
    in_flight_usd: float = Field(description="Reserved by submits not settled yet.")
    in_flight: int = Field(description="How many reservations are in flight.")
    settled: int = Field(description="How many reservations were settled.")
    cap_usd: float | None = Field(description="The cap the last reservation was granted under.")
    updated_at: dt.datetime | None = Field(description="When the record last changed.")

    @property
    def total_usd(self) -> float:
        """Settled plus in flight: what the cap is checked against."""
        return round(self.spent_usd + self.in_flight_usd, 6)

    @property
    def day(self) -> dt.date | None:
        """The UTC day of a daily record; None for a shared budget."""
        if not self.key.startswith("daily/"):
            return None
        return dt.date.fromisoformat(self.key.removeprefix("daily/"))


class _Records:
    """Budget records under ``{archive}/_budget/``, changed by conditional writes only."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def location(self, key: str) -> str:
        return self.backend.location(join_key(BUDGET_PREFIX, f"{key}.json"))

    def read(self, key: str) -> tuple[_Record, str | None]:
        found = self.backend.read_versioned(join_key(BUDGET_PREFIX, f"{key}.json"))
        if found is None:
            return _Record(), None
        raw, version = found
        try:
            return _Record.model_validate_json(raw), version
        except ValidationError as exc:
            # Unreadable must stop spending, not start a fresh total at zero.
            raise StorageError(f"budget record {self.location(key)} is unreadable: {exc}") from exc

    def update(self, key: str, change: Callable[[_Record], Any]) -> Any:
        """Apply ``change`` to the stored record until a conditional write of it wins.

        ``change`` mutates the record it is given and returns a value for the caller;
        when it returns a `_Unchanged` nothing is written. Raises `StorageError` when
        the write keeps losing.
        """
        path = join_key(BUDGET_PREFIX, f"{key}.json")
        for attempt in range(_MAX_ATTEMPTS):
            record, version = self.read(key)
            answer = change(record)
            if isinstance(answer, _Unchanged):
                return answer.value
            record.updated_at = _utcnow()
            data = record.model_dump_json(indent=2).encode()
            if version is None:
                written = self.backend.create_bytes(path, data, _JSON)
            else:
                written = self.backend.replace_bytes(path, data, _JSON, version)
            if written is not None:
                return answer
            if attempt:
                time.sleep(random.uniform(0, min(_MAX_BACKOFF_SECONDS, 0.002 * 2**attempt)))
        raise StorageError(
            f"budget record {self.location(key)}: {_MAX_ATTEMPTS} conditional writes in a row "
            "lost to other writers"
        )


class _Unchanged:
    """What a change returns when the record needs no write."""

    def __init__(self, value: Any) -> None:
        self.value = value


class SharedBudget:
    """A running total under one name, shared by every writer of one archive.

    For a budget several processes draw from at once, e.g. a chunked batch's
    `max_cost_usd` across its chunks (name it after the parent flow run).

    Args:
        archive_uri: The archive (local folder or ``s3://bucket/prefix``) the record lives in.
        name: The budget's name: letters, digits, ``.``, ``_`` or ``-``, not first ``.``.
        cap_usd: The cap in USD; reservations that would pass it are refused.
        cap_name: How refusals name the cap (a parameter's name, e.g. ``max_cost_usd``).
        s3_client: A boto3 S3 client for an ``s3://`` archive; None: boto3's default chain.

    Raises:
        ValueError: The cap is negative or the name is not a plain name.
    """

    def __init__(
        self,
        archive_uri: str | os.PathLike[str],
        name: str,
        cap_usd: float,
        *,
        cap_name: str = "max_cost_usd",
        s3_client: Any = None,
    ) -> None:
        if name[:1] in ("", ".") or not all(char.isalnum() or char in "._-" for char in name):
            raise ValueError(
                f"budget name {name!r} must be letters, digits, '.', '_' or '-' (not first '.')"
            )
        self._init(open_backend(archive_uri, s3_client), cap_usd, cap_name)
        self.key = join_key("shared", name)

    def _init(self, backend: Backend, cap_usd: float, cap_name: str) -> None:
        if cap_usd < 0:
            raise ValueError(f"{cap_name} must be 0 or more, got {cap_usd}")
        self.records = _Records(backend)
        self.cap_usd = cap_usd
        self.cap_name = cap_name

    def _key_now(self) -> str:
        return self.key

    def check(self) -> None:
        """Raise a clear error now if the record cannot be written (e.g. a missing bucket)."""
        self.records.backend.check()

    def reserve(self, estimate_usd: float, label: str | None = None) -> Reservation | BudgetRefusal:
        """Reserve ``estimate_usd`` before a paid submit, if the cap allows it.

        Args:
            estimate_usd: The submit's estimate (0 or more).
            label: Who reserves, for people reading the record (e.g. ``row 3 (shoe.png)``).

        Returns:
            A `Reservation` (settle or release it), or a `BudgetRefusal` when settled
            plus in flight plus ``estimate_usd`` would pass the cap.

        Raises:
            ValueError: A negative estimate.
            StorageError: The record cannot be read or written.
        """
        if estimate_usd < 0:
            raise ValueError(f"an estimate must be 0 or more, got {estimate_usd}")
        key = self._key_now()
        micro, cap = _micro(estimate_usd), _micro(self.cap_usd)
        reservation_id = secrets.token_hex(8)

        def change(record: _Record) -> Reservation | _Unchanged:
            total = record.spent_micro_usd + record.in_flight_micro_usd
            if total + micro > cap:
                return _Unchanged(
                    BudgetRefusal(
                        key=key,
                        cap_name=self.cap_name,
                        cap_usd=self.cap_usd,
                        total_usd=_usd(total),
                        estimate_usd=estimate_usd,
                    )
                )
            record.reservations[reservation_id] = _Held(
                micro_usd=micro,
                at=_utcnow(),
                host=socket.gethostname(),
                pid=os.getpid(),
                label=label,
            )
            record.cap_usd = self.cap_usd
            return Reservation(
                key=key,
                id=reservation_id,
                estimate_usd=estimate_usd,
                cap_name=self.cap_name,
                cap_usd=self.cap_usd,
                total_usd=_usd(total + micro),
            )

        return self.records.update(key, change)

    def settle(self, reservation: Reservation, billed_usd: float | None) -> None:
        """Replace a reservation by what was billed (idempotent: settled once).

        Args:
            reservation: What `reserve` granted (in this process or another).
            billed_usd: The bill; None when the submit was made but no bill is known,
                which keeps the estimate in the total (it may have been paid).

        Raises:
            StorageError: The record cannot be read or written.
        """

        def change(record: _Record) -> _Unchanged | None:
            held = record.reservations.pop(reservation.id, None)
            if held is None:
                return _Unchanged(None)  # settled or released already
            billed = held.micro_usd if billed_usd is None else _micro(billed_usd)
            record.spent_micro_usd += billed
            record.settled += 1
            return None

        self.records.update(reservation.key, change)

    def release(self, reservation: Reservation) -> None:
        """Give a reservation back: nothing was submitted, nothing paid (idempotent).

        Args:
            reservation: What `reserve` granted.

        Raises:
            StorageError: The record cannot be read or written.
        """

        def change(record: _Record) -> _Unchanged | None:
            if record.reservations.pop(reservation.id, None) is None:
                return _Unchanged(None)
            return None

        self.records.update(reservation.key, change)

    def read(self) -> BudgetTotal:
        """The running total now (no write).

        Returns:
            The record's `BudgetTotal`; zeros when nothing was reserved yet.
        """
        return _total(self.records, self._key_now())


class DailyBudget(SharedBudget):
    """The daily spend cap, ``daily_budget_usd``, shared by every run of one archive.

    A reservation is held in the record of the UTC day it was made on, and settles
    there even when the bill comes after midnight.

    Args:
        archive_uri: The archive (local folder or ``s3://bucket/prefix``) the totals live in.
        cap_usd: The cap per UTC day, in USD.
        s3_client: A boto3 S3 client for an ``s3://`` archive; None: boto3's default chain.
        clock: The current time (tests); aware UTC.

    Raises:
        ValueError: A negative cap.

    Example:
        >>> budget = DailyBudget("nanobanana-archive", cap_usd=20.0)  # doctest: +SKIP
        >>> held = budget.reserve(0.15, label="row 3")  # doctest: +SKIP
        >>> if isinstance(held, Reservation):  # doctest: +SKIP
        ...     budget.settle(held, billed_usd=0.15)
    """

    def __init__(
        self,
        archive_uri: str | os.PathLike[str],
        cap_usd: float,
        *,
        s3_client: Any = None,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self._init(open_backend(archive_uri, s3_client), cap_usd, DAILY_BUDGET_NAME)
        self.clock = clock

    def _key_now(self) -> str:
        return _daily_key(self.clock().astimezone(dt.timezone.utc).date())

    def total(self, day: dt.date | None = None) -> BudgetTotal:
        """One UTC day's total (today's when ``day`` is None).

        Args:
            day: The UTC day.

        Returns:
            Its `BudgetTotal`; zeros when nothing was reserved that day.
        """
        return _total(self.records, _daily_key(day) if day else self._key_now())


def _daily_key(day: dt.date) -> str:
    return join_key("daily", day.isoformat())


def _total(records: _Records, key: str) -> BudgetTotal:
    record, _ = records.read(key)
    return BudgetTotal(
        key=key,
        spent_usd=_usd(record.spent_micro_usd),
        in_flight_usd=_usd(record.in_flight_micro_usd),
        in_flight=len(record.reservations),
        settled=record.settled,
        cap_usd=record.cap_usd,
        updated_at=record.updated_at,
    )


def daily_totals(
    archive_uri: str | os.PathLike[str],
    s3_client: Any = None,
    since: dt.date | None = None,
) -> dict[dt.date, BudgetTotal]:
    """Every UTC day's total of the daily cap, for ``nanobanana spend``.

    Args:
        archive_uri: The archive whose totals to read.
        s3_client: A boto3 S3 client for an ``s3://`` archive; None: boto3's default chain.
        since: Only days from this one on.

    Returns:
        The days that have a record, oldest first, each with its `BudgetTotal`.

    Raises:
        StorageError: A record cannot be read.
    """
    records = _Records(open_backend(archive_uri, s3_client))
    days = []
    for key in records.backend.list_keys(DAILY_PREFIX):
        name = key.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            day = dt.date.fromisoformat(name)
        except ValueError:
            continue  # not a day's record (a file someone put there)
        if since is None or day >= since:
            days.append(day)
    return {day: _total(records, _daily_key(day)) for day in sorted(days)}
