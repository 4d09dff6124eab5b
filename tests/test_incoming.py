"""A location as the batch, incremental reruns, and one daily cap every run shares.

`batch_edit(images_uri=...)` on a local folder and on a prefix of moto's S3 server:
a rerun after two images landed pays for exactly those two. Three runs at once on
one archive under one `daily_budget_usd`, billed at twice the listed price, stay
within the cap plus the estimates in flight, and a fourth run that day pays nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from PIL import Image

from prefect_nanobanana.storage import daily_totals
from prefect_nanobanana.storage.backends import make_s3_client

pytestmark = pytest.mark.usefixtures("prefect_harness")

TIME_SCALE = 0.005
PRICE = 0.15  # the emulator's listed 1K price: every row's estimate


def _image(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), (shade, 80, 160)).save(path)


def _manifest_lines(result) -> list[dict]:
    return [json.loads(line) for line in Path(result.results_manifest).read_text().splitlines()]


def test_exactly_one_source_of_rows_is_given() -> None:
    from prefect_nanobanana.flows.batch.flow import check_batch_sources

    with pytest.raises(ValueError, match="exactly one of `jobs`, `manifest_uri` or `images_uri`"):
        check_batch_sources(None, None, None, None, None, None)
    with pytest.raises(ValueError, match=r"\(got manifest_uri, images_uri\)"):
        check_batch_sources(None, "m.jsonl", "in/", "p", None, None)
    with pytest.raises(ValueError, match="needs a `prompt`"):
        check_batch_sources(None, None, "in/", "  ", None, None)
    with pytest.raises(ValueError, match="`prompt`, `include` go with `images_uri` only"):
        check_batch_sources(None, "m.jsonl", None, "p", ["*.png"], None)
    check_batch_sources(None, None, "in/", "p", ["*.png"], ["thumbs/**"])


async def test_a_folder_as_the_batch_pays_only_for_the_new_images_on_rerun(
    emulator_factory, use_emulator, tmp_path
):
    from prefect_nanobanana.flows import batch_edit

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    incoming = tmp_path / "incoming"
    for index, name in enumerate(["a.png", "shoes/b.png", "shoes/c.jpg"]):
        _image(incoming / name, 40 * index)
    (incoming / "notes.txt").write_text("not an image")
    _image(incoming / "skip" / "d.png", 200)
    options = {
        "images_uri": str(incoming),
        "prompt": "put it on a white background",
        "exclude": ["skip/**"],
        "archive_uri": str(tmp_path / "archive"),
        "concurrency_limit_name": "test-incoming-local",
        "preview_rows": 0,
    }
    first = await batch_edit(**options)
    assert (first.archived, first.new, first.skipped) == (3, 3, 0)
    assert [row.id for row in first.rows] == ["a.png", "shoes/b.png", "shoes/c.jpg"]
    assert emulator.stats.submits_accepted == 3

    _image(incoming / "shoes/e.png", 10)
    _image(incoming / "z.png", 20)
    second = await batch_edit(**options)
    # Exactly the two new images were paid for; the three archived earlier were skipped.
    assert emulator.stats.submits_accepted == 5
    assert (second.new, second.archived, second.skipped, second.adopted) == (2, 2, 3, 0)
    lines = _manifest_lines(second)
    assert sorted(line["id"] for line in lines if line["new"]) == ["shoes/e.png", "z.png"]
    assert {line["id"]: line["status"] for line in lines}["a.png"] == "skipped"

    # An image replaced under the same name is a new edit, not one the ledger holds.
    _image(incoming / "a.png", 250)
    third = await batch_edit(**options)
    assert emulator.stats.submits_accepted == 6
    assert [row.id for row in third.rows if row.new] == ["a.png"]


async def test_a_listed_batch_pays_for_its_first_images_while_the_rest_are_being_listed(
    emulator_factory, use_emulator, tmp_path, monkeypatch
):
    """A prefix of thousands takes many pages to list: its rows start as the pages come, so
    the first submit does not wait for the last page (nor the planning of every row)."""
    from prefect_nanobanana.flows import batch_edit
    from prefect_nanobanana.flows.batch import sources

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    incoming = tmp_path / "incoming"
    for index in range(24):
        _image(incoming / f"img-{index:02d}.png", 10 * index)
    list_images = sources.list_images
    paid_while_listing: list[int] = []

    def listing_held_after_twenty(*args: Any, **kwargs: Any) -> Any:
        # Stands for a listing whose later pages are slow to come: the last images are
        # listed once a row has been paid for, or after 20 s when none is.
        for number, image in enumerate(list_images(*args, **kwargs)):
            if number == 20:
                deadline = time.monotonic() + 20
                while not emulator.stats.submits_accepted and time.monotonic() < deadline:
                    time.sleep(0.02)
                paid_while_listing.append(emulator.stats.submits_accepted)
            yield image

    monkeypatch.setattr(sources, "list_images", listing_held_after_twenty)
    result = await batch_edit(
        images_uri=str(incoming),
        prompt="put it on a white background",
        archive_uri=str(tmp_path / "archive"),
        concurrency_limit_name="test-incoming-streamed",
        preview_rows=0,
        max_concurrency=2,
    )
    assert paid_while_listing and paid_while_listing[0] >= 1, paid_while_listing
    assert (result.archived, result.new) == (24, 24), [row.error for row in result.rows]
    assert [row.id for row in result.rows] == [f"img-{index:02d}.png" for index in range(24)]
    assert emulator.stats.submits_accepted == 24


async def test_a_listed_batch_without_a_price_is_refused_under_a_daily_cap_and_warned_without(
    emulator_factory, use_emulator, tmp_path, monkeypatch
):
    """Its rows are estimated as they are listed, from one price looked up first: without a
    price a daily cap cannot hold, so the run is refused before anything is listed or paid."""
    from prefect_nanobanana import BudgetExceededError, RetryPolicy, batch_edit
    from prefect_nanobanana.flows.batch import sources

    fast = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02)
    monkeypatch.setattr("prefect_nanobanana.client.client.RetryPolicy", lambda: fast)
    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE, faults="model:server_error"))
    incoming = tmp_path / "incoming"
    for index in range(2):
        _image(incoming / f"img-{index}.png", 60 * index)
    listings: list[str] = []
    list_images = sources.list_images

    def counted(location: Any, **kwargs: Any) -> Any:
        listings.append(str(location))
        return list_images(location, **kwargs)

    monkeypatch.setattr(sources, "list_images", counted)
    options = {
        "images_uri": str(incoming),
        "prompt": "make it a watercolour",
        "archive_uri": str(tmp_path / "archive"),
        "concurrency_limit_name": "test-incoming-no-price",
        "preview_rows": 0,
    }
    with pytest.raises(BudgetExceededError, match="daily_budget_usd=") as refused:
        await batch_edit(**options, daily_budget_usd=5.0)
    assert "price lookup failed" in str(refused.value)
    assert emulator.stats.calls["submit"] == 0 and listings == []
    result = await batch_edit(**options)
    assert result.archived == 2 and result.estimated_cost is None
    assert emulator.stats.calls["submit"] == 2


async def test_an_s3_prefix_as_the_batch_pays_only_for_the_new_objects_on_rerun(
    emulator_factory, use_emulator, s3_client, s3_bucket, tmp_path
):
    from prefect_nanobanana.flows import batch_edit

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))

    def put(key: str, shade: int) -> None:
        _image(tmp_path / "upload.png", shade)
        s3_client.upload_file(str(tmp_path / "upload.png"), s3_bucket, f"incoming/{key}")

    for index, key in enumerate(["a.png", "b.png", "sub/c.png"]):
        put(key, 30 * index)
    options = {
        "images_uri": f"s3://{s3_bucket}/incoming",
        "prompt": "make it a pencil sketch",
        "archive_uri": f"s3://{s3_bucket}/archive",
        "concurrency_limit_name": "test-incoming-s3",
        "preview_rows": 0,
        "max_concurrency": 1,
    }
    # Listed objects are not checked one by one before the first submit (5,000 HEADs took
    # minutes): each row's input is read, if at all, right before its own submit.
    before_first_submit: list[str] = []

    def note(request: Any, **_: Any) -> None:
        path = urlsplit(request.url).path
        if "/incoming/" in path and emulator.stats.submits_accepted == 0:
            before_first_submit.append(f"{request.method} {path}")

    s3 = make_s3_client()  # the process's shared client, which the flow uses too
    s3.meta.events.register("before-send.s3", note)
    try:
        first = await batch_edit(**options)
    finally:
        s3.meta.events.unregister("before-send.s3", note)
    assert (first.archived, first.new) == (3, 3), [row.error for row in first.rows]
    assert emulator.stats.submits_accepted == 3
    # Only the first row's own object (its HEAD and first bytes) was read before it.
    objects = {request.split(" ", 1)[1] for request in before_first_submit}
    assert len(objects) <= 1, before_first_submit
    put("d.png", 200)
    put("sub/e.png", 220)
    second = await batch_edit(**options)
    assert emulator.stats.submits_accepted == 5
    assert (second.new, second.archived, second.skipped) == (2, 2, 3)
    assert sorted(row.id for row in second.rows if row.status == "archived") == [
        "d.png",
        "sub/e.png",
    ]


async def test_three_runs_at_once_and_a_fourth_share_one_daily_cap(
    emulator_factory, use_emulator, tmp_path
):
    """Billed at twice the listed price, three runs of six rows each (two in flight per
    run) under a daily cap of eight rows' estimates: together they stay within the cap
    plus the estimates in flight, hold back the rest `over_budget` naming the cap, and
    a fourth run the same day submits nothing."""
    from prefect_nanobanana.flows import batch_edit

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE, bill_multiplier=2.0))
    images = tmp_path / "images"
    for index in range(6):
        _image(images / f"{index}.png", 30 * index)
    archive = tmp_path / "archive"
    cap, lanes, runs = 8 * PRICE, 2, 3

    def run(name: str):
        return batch_edit(
            images_uri=str(images),
            prompt=f"edit for {name}",  # each run its own edits: nothing adopted
            archive_uri=str(archive),
            daily_budget_usd=cap,
            max_concurrency=lanes,
            concurrency_limit_name=f"test-daily-{name}",
            allow_partial=True,
            preview_rows=0,
        )

    results = await asyncio.gather(*(run(name) for name in ("nightly", "alice", "bob")))
    billed = sum(result.paid_cost for result in results)
    assert emulator.stats.submits_accepted == sum(result.archived for result in results)
    # Every reservation fit the cap when made; only the rows in flight can bill past it.
    assert billed <= cap + runs * lanes * PRICE + 1e-9, billed
    held = [row for result in results for row in result.rows if row.status == "over_budget"]
    assert held and all("daily_budget_usd" in (row.error or "") for row in held)
    assert sum(result.archived + result.over_budget for result in results) == 18
    # The stored total says what was billed, with nothing left in flight.
    (total,) = daily_totals(archive).values()
    assert total.in_flight == 0 and total.spent_usd == pytest.approx(billed)
    assert total.day == dt.datetime.now(dt.timezone.utc).date()

    paid = emulator.stats.submits_accepted
    fourth = await run("carol")
    assert emulator.stats.submits_accepted == paid  # nothing submitted
    assert fourth.over_budget == 6 and fourth.paid_cost == 0


def test_cli_batch_over_a_folder_pays_only_for_the_new_images_on_rerun(
    emulator_factory, use_emulator, tmp_path, capsys
):
    from prefect_nanobanana.cli import EXIT_BAD_INPUT, EXIT_OK, main

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    incoming = tmp_path / "incoming"
    for index in range(3):
        _image(incoming / f"{index}.png", 50 * index)
    _image(incoming / "thumbs" / "t.png", 5)
    archive = str(tmp_path / "archive")
    argv = ["batch", "--images", str(incoming), "--prompt", "studio light", "--archive", archive]
    argv += ["--exclude", "thumbs/**"]

    assert main(["batch", "--images", str(incoming), "--archive", archive]) == EXIT_BAD_INPUT
    assert "--images needs --prompt" in capsys.readouterr().err
    assert main(["batch", "m.jsonl", "--images", str(incoming), "--archive", archive]) == (
        EXIT_BAD_INPUT
    )
    assert "exactly one" in capsys.readouterr().err

    assert main(argv) == EXIT_OK
    assert "3 new; 3 archived, 0 skipped" in capsys.readouterr().out
    assert emulator.stats.submits_accepted == 3
    _image(incoming / "3.png", 210)
    _image(incoming / "4.png", 230)
    assert main(argv) == EXIT_OK
    out = capsys.readouterr().out
    assert "2 new; 2 archived, 3 skipped" in out
    assert emulator.stats.submits_accepted == 5


def test_cli_daily_budget_holds_rows_back_and_spend_shows_the_cap(
    emulator_factory, use_emulator, tmp_path, capsys
):
    from prefect_nanobanana.cli import EXIT_OK, EXIT_OVER_BUDGET, main

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    incoming = tmp_path / "incoming"
    for index in range(4):
        _image(incoming / f"{index}.png", 50 * index)
    archive = str(tmp_path / "archive")
    argv = ["batch", "--images", str(incoming), "--prompt", "p", "--archive", archive]
    code = main([*argv, "--daily-budget", str(2 * PRICE), "--max-concurrency", "1"])
    out = capsys.readouterr().out
    assert code == EXIT_OVER_BUDGET
    assert emulator.stats.submits_accepted == 2
    assert "2 over budget" in out and "daily_budget_usd $0.30 reached" in out
    assert main(["spend", "--archive", archive]) == EXIT_OK
    assert "$0.30 of $0.30" in capsys.readouterr().out


def test_single_edits_draw_from_the_archives_daily_cap(
    emulator_factory, use_emulator, image_server, tmp_path, monkeypatch, capsys
):
    """`edit_and_archive` reserves in its archive's daily total, `edit_image` (which archives
    nothing) in the default archive's, the CLI's `edit --archive` in its archive's; the
    parameter overrides the credentials block's field."""
    from prefect_nanobanana import BudgetExceededError, RunComfyCredentials, edit_and_archive
    from prefect_nanobanana.cli import EXIT_OK, EXIT_OVER_BUDGET, main
    from prefect_nanobanana.flows import edit_image

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    monkeypatch.chdir(tmp_path)  # the default archive, nanobanana-archive, lands here
    url = image_server.url_for("wide.png")
    archive = str(tmp_path / "archive")
    capped = RunComfyCredentials(daily_budget_usd=2 * PRICE)
    for _ in range(2):
        edit_and_archive(prompt="teal", images=[url], archive_uri=archive, credentials=capped)
    with pytest.raises(BudgetExceededError, match=r"daily_budget_usd \$0\.30 reached"):
        edit_and_archive(prompt="teal", images=[url], archive_uri=archive, credentials=capped)
    assert emulator.stats.submits_accepted == 2
    # The parameter overrides the block's field.
    edit_and_archive(
        prompt="teal", images=[url], archive_uri=archive, credentials=capped, daily_budget_usd=1.0
    )
    assert emulator.stats.submits_accepted == 3
    (total,) = daily_totals(archive).values()
    assert total.spent_usd == pytest.approx(3 * PRICE) and total.in_flight == 0

    edit_image(prompt="teal", image_urls=[url], daily_budget_usd=PRICE)
    with pytest.raises(BudgetExceededError, match="daily_budget_usd"):
        edit_image(prompt="teal", image_urls=[url], daily_budget_usd=PRICE)
    assert emulator.stats.submits_accepted == 4
    (default_total,) = daily_totals(tmp_path / "nanobanana-archive").values()
    assert default_total.spent_usd == pytest.approx(PRICE)

    argv = ["edit", "--prompt", "teal", "--image", url, "--archive", archive]
    assert main([*argv, "--daily-budget", str(4 * PRICE)]) == EXIT_OK
    assert main([*argv, "--daily-budget", str(4 * PRICE)]) == EXIT_OVER_BUDGET
    assert "daily_budget_usd" in capsys.readouterr().err
    assert emulator.stats.submits_accepted == 5
