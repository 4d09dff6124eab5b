"""Cost safety outside Prefect: the price lookup, the estimate, the budget, the emulator's bill."""

from __future__ import annotations

import datetime as dt
import pickle
import subprocess
import sys

import httpx
import pytest

from prefect_nanobanana import (
    AsyncRunComfyClient,
    BudgetExceededError,
    CostBudget,
    InvalidRequestError,
    ModelInfo,
    RetryPolicy,
    RunComfyClient,
    estimate_cost,
)
from prefect_nanobanana.client.pricing import (
    daily_spend,
    format_usd,
    row_estimate_usd,
    spend_by_resolution,
)
from prefect_nanobanana.emulator.__main__ import parse_prices

FAST_RETRIES = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05)


def make_client(emulator, token: str) -> RunComfyClient:
    return RunComfyClient(api_token=token, base_url=emulator.base_url, retry_policy=FAST_RETRIES)


# -- price lookup ---------------------------------------------------------------------


def test_model_info_reads_the_listed_price(emulator_factory, emulator_token):
    emulator = emulator_factory(price_per_image_usd={"1K": 0.2, "2K": 0.25, "4K": 0.5})
    with make_client(emulator, emulator_token) as client:
        info = client.model_info()
    assert isinstance(info, ModelInfo)
    assert info.model_id == "google/nano-banana/pro/edit"
    assert info.base_price_usd == 0.2
    assert info.price_unit == "image"
    assert "$0.50 at 4K" in (info.pricing_note or "")


async def test_async_model_info_is_retried_like_a_read(emulator_factory, emulator_token):
    emulator = emulator_factory(faults="model:server_error@1,model:rate_limit@2:retry_after=0")
    async with AsyncRunComfyClient(
        api_token=emulator_token, base_url=emulator.base_url, retry_policy=FAST_RETRIES
    ) as client:
        info = await client.model_info()
    assert info.base_price_usd == 0.15
    assert emulator.stats.calls["model"] == 3


def test_model_info_of_an_unknown_model_is_refused(emulator, emulator_token):
    with make_client(emulator, emulator_token) as client, pytest.raises(InvalidRequestError):
        client.model_info("acme/other")
    assert emulator.stats.calls["model"] == 1


def test_model_info_keeps_unknown_fields():
    info = ModelInfo.model_validate(
        {"model_id": "m", "base_price_usd": 0.1, "price_unit": "image", "currency": "USD"}
    )
    assert info.model_extra == {"currency": "USD"}


# -- the estimate ----------------------------------------------------------------------


def test_estimate_is_base_price_times_images_times_resolution_factor():
    assert row_estimate_usd(0.15) == pytest.approx(0.15)
    assert row_estimate_usd(0.15, resolution="2K", num_images=2) == pytest.approx(0.30)
    assert row_estimate_usd(0.15, resolution="4K", num_images=3) == pytest.approx(0.90)
    assert row_estimate_usd(0.15, resolution="4K", resolution_factors={"4K": 3.0}) == pytest.approx(
        0.45
    )


def test_estimate_sums_rows_to_pay_by_resolution():
    estimate = estimate_cost(0.15, [("1K", 1)] * 10 + [("4K", 1), ("2K", 2)])
    assert estimate.rows_to_pay == 12
    assert estimate.images == 13
    assert estimate.estimate_usd == pytest.approx(1.5 + 0.3 + 0.3)
    assert estimate.by_resolution == pytest.approx({"1K": 1.5, "2K": 0.3, "4K": 0.3})
    assert format_usd(estimate_cost(0.15, [("1K", 1)] * 12).estimate_usd) == "$1.80"
    assert "estimated $2.10 for 12 rows" in estimate.describe()


def test_budget_error_names_the_estimate_the_budget_and_the_rows():
    error = BudgetExceededError(estimate_usd=1.8, max_cost_usd=1.0, rows_to_pay=12)
    assert "$1.80" in str(error) and "$1.00" in str(error) and "12 rows" in str(error)
    unknown = BudgetExceededError(
        estimate_usd=None, max_cost_usd=1.0, rows_to_pay=3, reason="price lookup failed"
    )
    assert "price lookup failed" in str(unknown) and "$1.00" in str(unknown)
    # A failed flow's exception travels pickled (a deployment's run): the figures with it.
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.estimate_usd, copy.max_cost_usd, copy.rows_to_pay) == (1.8, 1.0, 12)
    assert str(copy) == str(error)


# -- the budget during a run ------------------------------------------------------------


def test_budget_counts_bills_of_finished_and_estimates_of_in_flight_requests():
    budget = CostBudget(1.0)
    assert [budget.reserve(0.3) for _ in range(4)] == [True, True, True, False]
    budget.settle(0.3, 0.6)  # billed twice the estimate
    assert budget.spent_usd == pytest.approx(1.2)
    assert not budget.reserve(0.3)
    budget.release(0.3)  # a submit the API refused costs nothing
    budget.settle(0.3, 0.0)  # a failed job that was not billed
    assert budget.spent_usd == pytest.approx(0.6)
    assert budget.reserve(0.3)
    budget.settle(0.3, None)  # bill unknown: the estimate counts
    assert budget.billed_usd == pytest.approx(0.9)


def test_twelve_rows_at_fifteen_cents_fit_a_budget_of_exactly_one_eighty():
    budget = CostBudget(1.8)
    assert all(budget.reserve(0.15) for _ in range(12))
    assert not budget.reserve(0.15)


def test_no_budget_holds_nothing_back():
    budget = CostBudget(None)
    assert all(budget.reserve(100.0) for _ in range(5))


# -- the emulator's prices and bill -----------------------------------------------------


def test_emulator_bills_a_multiple_of_the_listed_price(
    emulator_factory, emulator_token, image_server
):
    emulator = emulator_factory(bill_multiplier=2.0)
    with make_client(emulator, emulator_token) as client:
        listed = client.model_info().base_price_usd
        handle = client.submit_edit(
            {"prompt": "teal", "image_urls": [image_server.url_for("wide.png")]}
        )
        result = client.wait(handle.request_id, timeout=10)
    assert listed == 0.15
    assert result.cost == pytest.approx(0.30)
    assert emulator.stats.spent_usd == pytest.approx(0.30)


def test_emulator_price_flags():
    assert parse_prices(["4K=0.5", "1k=0.1"]) == {"1K": 0.1, "2K": 0.15, "4K": 0.5}
    for bad in ("8K=1", "4K", "4K=cheap", "1K=-1"):
        with pytest.raises(ValueError, match="--price"):
            parse_prices([bad])


def test_emulator_command_serves_its_prices_and_bill():
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect_nanobanana.emulator",
            "--port",
            "0",
            "--token",
            "tok",
            "--price",
            "1K=0.2",
            "--bill-multiplier",
            "2",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = list(iter(process.stdout.readline, "Press Ctrl-C to stop.\n"))
        base_url = banner[0].rsplit(" ", 1)[1].strip()
        answer = httpx.get(
            f"{base_url}/v1/models/google/nano-banana/pro/edit",
            headers={"Authorization": "Bearer tok"},
        ).json()
    finally:
        process.kill()
        process.wait(timeout=10)
    assert answer["base_price_usd"] == 0.2
    assert "# bills 2x the listed prices\n" in banner


# -- accounting --------------------------------------------------------------------------


def test_daily_spend_sums_bills_by_utc_day_of_the_submit():
    utc = dt.timezone.utc
    bills = [
        (dt.datetime(2026, 11, 30, 23, 30, tzinfo=utc), 0.15),
        (dt.datetime(2026, 12, 1, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))), 0.30),
        (dt.datetime(2026, 12, 1, 9, 0, tzinfo=utc), 0.30),
        (dt.datetime(2026, 12, 1, 10, 0, tzinfo=utc), None),
    ]
    assert daily_spend(bills) == {
        dt.date(2026, 11, 30): pytest.approx(0.45),
        dt.date(2026, 12, 1): pytest.approx(0.30),
    }
    assert daily_spend(bills, since=dt.date(2026, 12, 1)) == {dt.date(2026, 12, 1): 0.30}


def test_spend_by_resolution_sets_estimates_beside_bills():
    lines = spend_by_resolution([("4K", 0.3, 0.6), ("1K", 0.15, 0.3), ("1K", 0.15, None)])
    assert [(line.resolution, line.rows) for line in lines] == [("1K", 2), ("4K", 1)]
    assert (lines[0].estimated_usd, lines[0].billed_usd) == (0.3, 0.3)
    assert (lines[1].estimated_usd, lines[1].billed_usd) == (0.3, 0.6)
