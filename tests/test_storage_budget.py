"""Spend totals shared by every run of one archive: the daily cap and shared budgets."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from prefect_nanobanana.storage import (
    BudgetRefusal,
    DailyBudget,
    Reservation,
    SharedBudget,
    StorageError,
    daily_totals,
)

DAY = dt.datetime(2026, 12, 7, 23, 59, tzinfo=dt.timezone.utc)


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def test_reserve_settle_release_against_the_daily_cap(tmp_path: Path) -> None:
    budget = DailyBudget(tmp_path / "archive", cap_usd=1.0, clock=Clock(DAY))
    first = budget.reserve(0.4, label="row 1")
    second = budget.reserve(0.4, label="row 2")
    assert isinstance(first, Reservation) and isinstance(second, Reservation)
    assert (first.total_usd, second.total_usd) == (0.4, 0.8)
    refused = budget.reserve(0.3)
    assert isinstance(refused, BudgetRefusal)
    assert "daily_budget_usd $1.00 reached for the UTC day 2026-12-07" in refused.reason
    assert "$0.80 spent or in flight" in refused.reason
    # Nothing submitted: the reservation goes back, and the slack with it.
    budget.release(second)
    assert isinstance(budget.reserve(0.3), Reservation)
    # Billed more than estimated: the total follows the bill.
    budget.settle(first, 0.5)
    budget.settle(first, 0.5)  # once only
    total = budget.total()
    assert (total.spent_usd, total.in_flight_usd, total.in_flight, total.settled) == (
        0.5,
        0.3,
        1,
        1,
    )
    assert total.total_usd == 0.8 and total.cap_usd == 1.0 and total.day == DAY.date()
    assert isinstance(budget.reserve(0.21), BudgetRefusal)
    assert isinstance(budget.reserve(0.2), Reservation)  # exactly up to the cap


def test_a_submit_without_a_bill_keeps_its_estimate(tmp_path: Path) -> None:
    budget = DailyBudget(tmp_path, cap_usd=1.0, clock=Clock(DAY))
    held = budget.reserve(0.25)
    assert isinstance(held, Reservation)
    budget.settle(held, None)
    assert (budget.total().spent_usd, budget.total().in_flight) == (0.25, 0)


def test_a_reservation_settles_on_its_own_day(tmp_path: Path) -> None:
    clock = Clock(DAY)
    budget = DailyBudget(tmp_path, cap_usd=1.0, clock=clock)
    held = budget.reserve(0.9)
    assert isinstance(held, Reservation)
    clock.now = DAY + dt.timedelta(minutes=2)  # the next UTC day: a fresh cap
    assert isinstance(budget.reserve(0.9), Reservation)
    budget.settle(held, 0.8)
    totals = daily_totals(tmp_path)
    assert list(totals) == [dt.date(2026, 12, 7), dt.date(2026, 12, 8)]
    assert totals[dt.date(2026, 12, 7)].spent_usd == 0.8
    assert totals[dt.date(2026, 12, 8)].in_flight_usd == 0.9
    assert list(daily_totals(tmp_path, since=dt.date(2026, 12, 8))) == [dt.date(2026, 12, 8)]


def test_everyone_on_one_archive_shares_the_total(tmp_path: Path) -> None:
    # Two runs with their own objects (other processes, other machines): one record.
    mine = DailyBudget(tmp_path, cap_usd=1.0, clock=Clock(DAY))
    theirs = DailyBudget(str(tmp_path), cap_usd=1.0, clock=Clock(DAY))
    assert isinstance(mine.reserve(0.6), Reservation)
    assert isinstance(theirs.reserve(0.6), BudgetRefusal)
    elsewhere = DailyBudget(tmp_path / "other-archive", cap_usd=1.0, clock=Clock(DAY))
    assert isinstance(elsewhere.reserve(0.6), Reservation)


def test_shared_budget_names_its_cap(tmp_path: Path) -> None:
    budget = SharedBudget(tmp_path, "flow-run-1234", 0.5, cap_name="max_cost_usd")
    assert isinstance(budget.reserve(0.5), Reservation)
    refused = budget.reserve(0.01)
    assert isinstance(refused, BudgetRefusal)
    assert refused.reason.startswith("max_cost_usd $0.50 reached flow-run-1234:")
    assert budget.read().in_flight_usd == 0.5
    with pytest.raises(ValueError, match="budget name"):
        SharedBudget(tmp_path, "../escape", 1.0)
    with pytest.raises(ValueError, match="budget name"):
        SharedBudget(tmp_path, "..", 1.0)
    with pytest.raises(ValueError, match="0 or more"):
        budget.reserve(-1)


def test_an_unreadable_record_stops_spending(tmp_path: Path) -> None:
    budget = DailyBudget(tmp_path, cap_usd=1.0, clock=Clock(DAY))
    record = tmp_path / "_budget" / "daily" / "2026-12-07.json"
    record.parent.mkdir(parents=True)
    record.write_text("{not json")
    # Read as zero, it would grant a fresh day's cap on top of what was spent.
    with pytest.raises(StorageError, match="unreadable"):
        budget.reserve(0.1)


# --- concurrency: many writers never pass the cap plus what is in flight ---------------

CAP = 2.0
ESTIMATE = 0.05
BILLED = 0.10  # twice the listed price: settling pushes the total past the estimates


def _spend_until_refused(budget: Any, grants: list[float], billed: list[float]) -> None:
    """Reserve, settle at twice the estimate, until refused: one paying lane."""
    while True:
        held = budget.reserve(ESTIMATE, label=threading.current_thread().name)
        if isinstance(held, BudgetRefusal):
            return
        grants.append(held.total_usd)
        budget.settle(held, BILLED)
        billed.append(BILLED)


def _check_the_total(budget: Any, grants: list[float], billed: list[float], lanes: int) -> None:
    total = budget.total()
    # No lost update: every bill is in the total, exactly.
    assert total.spent_usd == pytest.approx(sum(billed)) and total.in_flight == 0
    assert total.settled == len(billed) == len(grants)
    # Each grant saw settled plus in flight within the cap ...
    assert max(grants) <= CAP + 1e-9
    # ... so the bills pass it only by what was in flight beyond the estimates.
    assert total.spent_usd <= CAP + lanes * (BILLED - ESTIMATE) + 1e-9
    assert total.spent_usd > CAP - BILLED  # and the lanes did use the cap


def _run_lanes(budget: Any, lanes: int) -> tuple[list[float], list[float]]:
    grants: list[float] = []
    billed: list[float] = []
    with ThreadPoolExecutor(lanes) as pool:
        for future in [
            pool.submit(_spend_until_refused, budget, grants, billed) for _ in range(lanes)
        ]:
            future.result()
    return grants, billed


def test_threads_on_one_folder_stay_within_the_cap(tmp_path: Path) -> None:
    budget = DailyBudget(tmp_path, cap_usd=CAP, clock=Clock(DAY))
    grants, billed = _run_lanes(budget, 12)
    _check_the_total(budget, grants, billed, 12)


def _process_lanes(archive: str, lanes: int, queue: Any) -> None:
    budget = DailyBudget(archive, cap_usd=CAP, clock=Clock(DAY))
    grants, billed = _run_lanes(budget, lanes)
    queue.put((grants, billed))


def test_processes_on_one_folder_stay_within_the_cap(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=_process_lanes, args=(str(tmp_path), 3, queue)) for _ in range(4)
    ]
    for process in processes:
        process.start()
    answers = [queue.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    grants = [grant for answer in answers for grant in answer[0]]
    billed = [bill for answer in answers for bill in answer[1]]
    _check_the_total(DailyBudget(tmp_path, cap_usd=CAP, clock=Clock(DAY)), grants, billed, 12)


@pytest.fixture
def atomic_conditional_puts() -> Iterator[None]:
    """moto checks a PUT's If-Match / If-None-Match and then writes, unlocked: two racing
    PUTs can both pass, which S3 itself never allows. Serialize moto's PUTs (its server
    runs in this process), so the test judges our writes, not moto's race."""
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    original = S3Response.put_object

    def put_object(self: Any) -> Any:
        with lock:
            return original(self)

    S3Response.put_object = put_object  # type: ignore[method-assign]
    try:
        yield
    finally:
        S3Response.put_object = original  # type: ignore[method-assign]


def test_threads_on_one_s3_archive_stay_within_the_cap(
    s3_client: Any, s3_bucket: str, atomic_conditional_puts: None
) -> None:
    archive = f"s3://{s3_bucket}/archive"
    budgets = [
        DailyBudget(archive, cap_usd=CAP, s3_client=s3_client, clock=Clock(DAY)) for _ in range(3)
    ]
    grants: list[float] = []
    billed: list[float] = []
    with ThreadPoolExecutor(12) as pool:
        futures = [
            pool.submit(_spend_until_refused, budgets[lane % 3], grants, billed)
            for lane in range(12)
        ]
        for future in futures:
            future.result()
    _check_the_total(budgets[0], grants, billed, 12)
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["archive/_budget/daily/2026-12-07.json"]
    assert list(daily_totals(archive, s3_client=s3_client)) == [DAY.date()]


def test_spend_shows_each_day_against_the_cap(tmp_path: Path, capsys: Any) -> None:
    import json

    from prefect_nanobanana.cli import main
    from prefect_nanobanana.storage import Ledger, LedgerEntry, job_key_for

    ledger = Ledger(tmp_path)
    key = job_key_for("p", ["s3://shop/in/a.png"])
    ledger.create(
        LedgerEntry(
            job_key=key,
            request_id="req-1",
            status="archived",
            submitted_at=DAY,
            updated_at=DAY,
            cost=0.3,
        )
    )
    budget = DailyBudget(tmp_path, cap_usd=5.0, clock=Clock(DAY))
    settled, in_flight = budget.reserve(0.15), budget.reserve(0.15)
    assert isinstance(settled, Reservation) and isinstance(in_flight, Reservation)
    budget.settle(settled, 0.3)
    tomorrow = DailyBudget(tmp_path, cap_usd=5.0, clock=Clock(DAY + dt.timedelta(days=1)))
    assert isinstance(tomorrow.reserve(1.0), Reservation)

    assert main(["spend", "--archive", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert " ".join(lines[1].split()) == "2026-12-07 $0.30 $0.45 of $5.00 ($0.15 in flight)"
    assert " ".join(lines[2].split()) == "2026-12-08 $0.00 $1.00 of $5.00 ($1.00 in flight)"
    assert main(["spend", "--archive", str(tmp_path), "--json"]) == 0
    days = json.loads(capsys.readouterr().out)["days"]
    assert days[0] == {
        "day": "2026-12-07",
        "billed_usd": 0.3,
        "budget_total_usd": 0.45,
        "budget_in_flight_usd": 0.15,
        "daily_budget_usd": 5.0,
    }
    assert [day["day"] for day in days] == ["2026-12-07", "2026-12-08"]
