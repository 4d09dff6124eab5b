"""A location as a batch: listing folders, globs and S3 prefixes; the listed rows' job keys."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from prefect_nanobanana.storage import ListedImage, LocationError, job_key_for, list_images

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 24


def _tree(root: Path) -> dict[str, bytes]:
    """A small incoming folder: nested images, a sidecar, hidden files, upper-case names."""
    files = {
        "a.png": PNG + b"a",
        "b/c.jpg": b"\xff\xd8\xff" + b"c",
        "b/d/e.WEBP": b"RIFF0000WEBP" + b"e",
        "b.png": PNG + b"b",  # sorts between "a.png" and "b/..." as S3 sorts keys
        "notes.txt": b"not an image",
        ".hidden.png": PNG,
        "b/._c.jpg": b"macOS resource fork",
        ".cache/x.png": PNG,
        "thumbs/t.png": PNG + b"t",
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


EXPECTED_IDS = ["a.png", "b.png", "b/c.jpg", "b/d/e.WEBP", "thumbs/t.png"]


def _ids(images: Any) -> list[str]:
    return [image.id for image in images]


def test_a_folder_lists_its_images_recursively_by_relative_path(tmp_path: Path) -> None:
    files = _tree(tmp_path / "incoming")
    images = list(list_images(tmp_path / "incoming"))
    assert _ids(images) == EXPECTED_IDS
    first = images[0]
    assert first == ListedImage(
        "a.png",
        str((tmp_path / "incoming" / "a.png").absolute()),
        "sha256:" + hashlib.sha256(files["a.png"]).hexdigest(),
        len(files["a.png"]),
    )
    # The same folder named as a string, with a trailing slash, or as file://: same rows.
    assert list(list_images(f"{tmp_path}/incoming/")) == images
    assert list(list_images(f"file://{tmp_path}/incoming")) == images


def test_include_and_exclude_patterns(tmp_path: Path) -> None:
    _tree(tmp_path)
    assert _ids(list_images(tmp_path, exclude=["thumbs/**"])) == EXPECTED_IDS[:-1]
    assert _ids(list_images(tmp_path, exclude=["*.png"])) == ["b/c.jpg", "b/d/e.WEBP"]
    # include decides alone: a sidecar is listed when asked for (its row fails its check).
    assert _ids(list_images(tmp_path, include=["*.txt", "b/*"])) == ["b/c.jpg", "notes.txt"]
    assert _ids(list_images(tmp_path, include=["**/*.jpg"])) == ["b/c.jpg"]
    assert _ids(list_images(tmp_path, include="b/**")) == ["b/c.jpg", "b/d/e.WEBP"]
    assert _ids(list_images(tmp_path, include=["[ab].png"])) == ["a.png", "b.png"]
    assert _ids(list_images(tmp_path, include=["[!a].png"])) == ["b.png", "thumbs/t.png"]
    with pytest.raises(LocationError, match="empty"):
        list_images(tmp_path, include=[""])


def test_local_globs_root_the_ids_where_the_pattern_starts(tmp_path: Path) -> None:
    _tree(tmp_path)
    assert _ids(list_images(f"{tmp_path}/*.png")) == ["a.png", "b.png"]
    assert _ids(list_images(f"{tmp_path}/b/*")) == ["c.jpg"]
    assert _ids(list_images(f"{tmp_path}/**/*.png")) == ["a.png", "b.png", "thumbs/t.png"]
    assert _ids(list_images(f"{tmp_path}/b/**")) == ["c.jpg", "d/e.WEBP"]
    assert _ids(list_images(f"{tmp_path}/nothing-*.png")) == []


def test_one_file_missing_folders_and_urls(tmp_path: Path) -> None:
    _tree(tmp_path)
    assert _ids(list_images(tmp_path / "b" / "c.jpg")) == ["c.jpg"]
    with pytest.raises(LocationError, match="no such folder"):
        next(list_images(tmp_path / "typo"))
    with pytest.raises(LocationError, match="URL"):
        list_images("https://example.com/photos/")


def test_local_content_identity_follows_the_bytes_not_the_clock(tmp_path: Path) -> None:
    _tree(tmp_path)
    before = {image.id: image.content for image in list_images(tmp_path)}
    os.utime(tmp_path / "a.png", (1, 1))  # a restore or a checkout: same bytes, new mtime
    assert {image.id: image.content for image in list_images(tmp_path)} == before
    stat = (tmp_path / "b.png").stat()
    (tmp_path / "b.png").write_bytes(PNG + b"B")  # same size and mtime, other bytes
    os.utime(tmp_path / "b.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = {image.id: image.content for image in list_images(tmp_path)}
    assert after["b.png"] != before["b.png"]
    assert {k: v for k, v in after.items() if k != "b.png"} == {
        k: v for k, v in before.items() if k != "b.png"
    }


def _upload(s3_client: Any, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        s3_client.put_object(Bucket=bucket, Key=f"{prefix}{name}", Body=data)


def test_an_s3_prefix_lists_like_the_same_folder(
    s3_client: Any, s3_bucket: str, tmp_path: Path
) -> None:
    files = _tree(tmp_path)
    _upload(s3_client, s3_bucket, "shop/incoming/", files)
    s3_client.put_object(Bucket=s3_bucket, Key="shop/incoming/empty-folder/", Body=b"")
    s3_client.put_object(Bucket=s3_bucket, Key="shop/incoming-old/z.png", Body=PNG)
    uri = f"s3://{s3_bucket}/shop/incoming"
    images = list(list_images(uri, s3_client=s3_client))
    # The same ids, in the same order, as the folder with the same files.
    assert _ids(images) == _ids(list_images(tmp_path)) == EXPECTED_IDS
    head = s3_client.head_object(Bucket=s3_bucket, Key="shop/incoming/a.png")
    assert images[0] == ListedImage(
        "a.png",
        f"s3://{s3_bucket}/shop/incoming/a.png",
        "etag:" + head["ETag"].strip('"'),
        len(files["a.png"]),
    )
    assert (
        _ids(list_images(uri + "/", exclude=["thumbs/**"], s3_client=s3_client))
        == (EXPECTED_IDS[:-1])
    )
    assert _ids(list_images(f"{uri}/b/*", s3_client=s3_client)) == ["c.jpg"]
    assert _ids(list_images(f"{uri}/**/*.png", s3_client=s3_client)) == [
        "a.png",
        "b.png",
        "thumbs/t.png",
    ]
    assert _ids(list_images(f"s3://{s3_bucket}/shop/incoming/a.png", s3_client=s3_client)) == [
        "a.png"
    ]
    assert _ids(list_images(f"s3://{s3_bucket}/shop/nothing", s3_client=s3_client)) == []


def test_s3_content_identity_is_the_etag(s3_client: Any, s3_bucket: str) -> None:
    _upload(s3_client, s3_bucket, "in/", {"a.png": PNG + b"1", "b.png": PNG + b"2"})
    uri = f"s3://{s3_bucket}/in"
    before = {image.id: image.content for image in list_images(uri, s3_client=s3_client)}
    _upload(s3_client, s3_bucket, "in/", {"a.png": PNG + b"1", "b.png": PNG + b"3"})
    after = {image.id: image.content for image in list_images(uri, s3_client=s3_client)}
    assert after["a.png"] == before["a.png"]  # uploaded again, same bytes: same edit
    assert after["b.png"] != before["b.png"]  # replaced: a new edit


def test_s3_listing_streams_page_by_page(s3_client: Any, s3_bucket: str) -> None:
    _upload(s3_client, s3_bucket, "in/", {f"{n:02d}.png": PNG for n in range(7)})
    calls: list[str] = []

    def count(**_: Any) -> None:
        calls.append("list")

    s3_client.meta.events.register("before-call.s3.ListObjectsV2", count)
    try:
        images = list_images(f"s3://{s3_bucket}/in", s3_client=s3_client, page_size=3)
        assert next(images).id == "00.png"
        assert len(calls) == 1  # the first row before the rest of the prefix is listed
        assert _ids(images) == [f"{n:02d}.png" for n in range(1, 7)]
        assert len(calls) == 3
    finally:
        s3_client.meta.events.unregister("before-call.s3.ListObjectsV2", count)


def test_a_missing_bucket_is_an_error_not_an_empty_batch(s3_client: Any) -> None:
    with pytest.raises(LocationError, match="cannot list"):
        next(list_images("s3://no-such-bucket-here/in", s3_client=s3_client))


def test_the_content_identity_makes_a_changed_image_a_new_job(tmp_path: Path) -> None:
    from prefect_nanobanana.flows.batch.sources import listed_job_key, listed_rows

    _tree(tmp_path)
    options = {"resolution": "1K", "num_images": 1}
    rows = list(listed_rows(str(tmp_path), "make it blue", exclude=["thumbs/**"]))
    assert [row.job.id for row in rows] == EXPECTED_IDS[:-1]
    assert [row.job.images for row in rows] == [
        [str((tmp_path / name).absolute())] for name in EXPECTED_IDS[:-1]
    ]
    assert {row.job.prompt for row in rows} == {"make it blue"}
    keys = {row.job.id: listed_job_key(row, options) for row in rows}
    # A rerun over the same folder finds the same rows.
    again = listed_rows(str(tmp_path), "make it blue", exclude=["thumbs/**"])
    assert {row.job.id: listed_job_key(row, options) for row in again} == keys
    (tmp_path / "a.png").write_bytes(PNG + b"changed")
    changed = listed_rows(str(tmp_path), "make it blue", exclude=["thumbs/**"])
    new_keys = {row.job.id: listed_job_key(row, options) for row in changed}
    assert new_keys["a.png"] != keys["a.png"]
    assert {k: v for k, v in new_keys.items() if k != "a.png"} == {
        k: v for k, v in keys.items() if k != "a.png"
    }


def test_job_keys_without_content_are_unchanged() -> None:
    # Keys made before `content` existed stay the same (the ledger's archived rows are found).
    plain = job_key_for("p", ["s3://shop/in/a.png"], {"resolution": "1K"}, row_id="a.png")
    assert plain == "0eba80e620d3986c8405ca6e3df602232241fe7ac0b9a4c74edce9a0611efa80"
    other = job_key_for("p", ["s3://shop/in/a.png"], {"resolution": "1K"}, "a.png", content="x")
    assert other != plain


def test_listed_rows_are_keyed_against_one_scan_of_the_ledger(
    s3_client: Any, s3_bucket: str, tmp_path: Path
) -> None:
    import datetime as dt

    from prefect_nanobanana.flows.batch.sources import key_listed_rows, listed_rows
    from prefect_nanobanana.storage import Ledger, LedgerEntry

    _upload(s3_client, s3_bucket, "in/", {f"{n}.png": PNG + bytes([n]) for n in range(5)})
    options = {"resolution": "1K", "num_images": 1}
    ledger = Ledger(f"s3://{s3_bucket}/archive", s3_client=s3_client)
    uri = f"s3://{s3_bucket}/in"
    first = list(key_listed_rows(listed_rows(uri, "p"), options, ledger))
    assert [keyed.new for keyed in first] == [True] * 5
    now = dt.datetime.now(dt.timezone.utc)
    for keyed in first[:3]:  # an earlier run archived three of them
        ledger.create(
            LedgerEntry(job_key=keyed.job_key, status="archived", submitted_at=now, updated_at=now)
        )
    calls: list[str] = []

    def count(**_: Any) -> None:
        calls.append("list")

    s3_client.meta.events.register("before-call.s3", count)
    try:
        rerun = list(key_listed_rows(listed_rows(uri, "p"), options, ledger))
    finally:
        s3_client.meta.events.unregister("before-call.s3", count)
    assert [(keyed.row.job.id, keyed.new) for keyed in rerun] == [
        ("0.png", False),
        ("1.png", False),
        ("2.png", False),
        ("3.png", True),
        ("4.png", True),
    ]
    assert [keyed.job_key for keyed in rerun] == [keyed.job_key for keyed in first]
    assert len(calls) == 1  # the ledger's one listing (the prefix went by the default client)


class _SlowLedger:
    """A ledger that knows some keys and answers no read until released."""

    def __init__(self, known: list[str]) -> None:
        self.known = set(known)
        self.released = threading.Event()

    def known_keys(self) -> set[str]:
        return set(self.known)

    def read(self, job_key: str) -> None:
        assert self.released.wait(10), "a read was awaited before the new rows were given"
        return None


def test_new_listed_rows_are_planned_before_the_known_rows_entries_are_read(
    tmp_path: Path,
) -> None:
    """A nightly rerun's few new images, listed last, must not wait for the reads of the
    thousands archived earlier (a read each, to tell archived from failed)."""
    from prefect_nanobanana.flows.batch.plan import plan_keyed_rows
    from prefect_nanobanana.flows.batch.sources import key_listed_rows, listed_job_key, listed_rows

    for index in range(6):
        (tmp_path / f"img-{index}.png").write_bytes(PNG + bytes([index]))
    defaults = {"aspect_ratio": "auto", "resolution": "1K", "output_format": "png", "num_images": 1}
    rows = list(listed_rows(str(tmp_path), "make it blue"))
    ledger = _SlowLedger([listed_job_key(row, defaults) for row in rows[:4]])
    groups = plan_keyed_rows(key_listed_rows(rows, defaults, ledger), defaults, ledger)  # type: ignore[arg-type]
    given: list[int] = []
    while len(given) < 2:
        given += [plan.row for plan in next(groups)]
    assert sorted(given) == [5, 6]  # the new rows, while every read still waits
    ledger.released.set()
    assert sorted(plan.row for group in groups for plan in group) == [1, 2, 3, 4]
