"""Archiving outputs served over loopback HTTP and as data: URIs, to a folder and to S3."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from collections.abc import Iterator
from datetime import date, datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from prefect_nanobanana.emulator import LoopbackObjectStore
from prefect_nanobanana.storage import (
    ArchiveError,
    LocationError,
    archive_layout,
    archive_outputs,
    load_archive_record,
)

DAY = date(2024, 5, 1)


def _image_bytes(fmt: str, size: tuple[int, int], noisy: bool = False) -> bytes:
    image = Image.effect_noise(size, 80).convert("RGB") if noisy else Image.new("RGB", size, "red")
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _serve(store: LoopbackObjectStore, key: str, data: bytes, content_type: str) -> str:
    response = httpx.put(
        f"{store.base_url}/objects/{key}",
        content=data,
        headers={"Authorization": f"Bearer {store.upload_token}", "Content-Type": content_type},
    )
    response.raise_for_status()
    return response.json()["url"]


def _data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def outputs(loopback_store: LoopbackObjectStore) -> list[str]:
    """Three outputs: PNG 64x48 and JPEG 30x20 behind signed URLs, WebP 16x9 as a data URI."""
    return [
        _serve(loopback_store, "out/0.png", _image_bytes("PNG", (64, 48)), "image/png"),
        _serve(loopback_store, "out/1", _image_bytes("JPEG", (30, 20)), "image/jpeg"),
        _data_uri(_image_bytes("WEBP", (16, 9)), "image/webp"),
    ]


def test_archive_to_a_local_folder(tmp_path: Path, outputs: list[str]) -> None:
    root = tmp_path / "archive"
    record = archive_outputs(
        "req-1",
        outputs,
        date=DAY,
        archive_uri=str(root),
        metadata={"prompt": "make it blue", "sources": [outputs[0]], "cost": 0.15},
    )

    folder = root / "2024-05-01" / "req-1"
    assert record.output_locations == [str(folder / name) for name in ("0.png", "1.jpg", "2.webp")]
    assert record.metadata_location == str(folder / "metadata.json")
    assert not record.already_archived
    assert [(o.width, o.height) for o in record.outputs] == [(64, 48), (30, 20), (16, 9)]
    assert sorted(path.name for path in folder.iterdir()) == [
        "0.png",
        "1.jpg",
        "2.webp",
        "metadata.json",
    ]

    text = (folder / "metadata.json").read_text()
    assert "signature" not in text and "?" not in text and "base64" not in text
    metadata = json.loads(text)
    assert metadata["prompt"] == "make it blue" and metadata["cost"] == 0.15
    assert metadata["sources"] == [outputs[0].split("?")[0]]
    assert metadata["request_id"] == "req-1" and metadata["archive_date"] == "2024-05-01"
    first, _, third = metadata["outputs"]
    assert first["source_url"] == outputs[0].split("?")[0]
    assert third["source_url"] == "data:image/webp"
    assert first["bytes"] == (folder / "0.png").stat().st_size
    assert set(first) == {
        "index",
        "location",
        "sha256",
        "bytes",
        "content_type",
        "width",
        "height",
        "source_url",
    }


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_archived_files_get_the_modes_the_umask_gives(
    tmp_path: Path, outputs: list[str], umask: int, mode: int
) -> None:
    """Written by way of mkstemp, every output, metadata.json and ledger entry was 0600."""
    from prefect_nanobanana.storage import Ledger, LedgerEntry

    archive = tmp_path / "archive"
    previous = os.umask(umask)
    try:
        archive_outputs("req-1", outputs, date=DAY, archive_uri=str(archive))
        now = datetime.now(timezone.utc)
        Ledger(archive).create(
            LedgerEntry(job_key="job-1", status="submitting", submitted_at=now, updated_at=now)
        )
    finally:
        os.umask(previous)
    written = [path for path in archive.rglob("*") if path.is_file()]
    assert len(written) == 5  # three outputs, metadata.json, the ledger entry
    assert {path.name: path.stat().st_mode & 0o777 for path in written} == dict.fromkeys(
        (path.name for path in written), mode
    )


def test_second_run_writes_nothing_and_fetches_nothing(tmp_path: Path, outputs: list[str]) -> None:
    first = archive_outputs("req-2", outputs, date=DAY, archive_uri=str(tmp_path))
    snapshot = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")}

    dead_urls = ["https://nowhere.invalid/x.png"] * len(outputs)
    again = archive_outputs(
        "req-2",
        dead_urls,
        date=datetime(2024, 5, 1, 23, 0, tzinfo=timezone.utc),
        archive_uri=str(tmp_path),
    )

    assert again.already_archived
    assert again.outputs == first.outputs
    assert again.metadata_location == first.metadata_location
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")} == snapshot
    assert load_archive_record("req-2", DAY, str(tmp_path)) == again


@pytest.mark.s3
def test_archive_to_s3(outputs: list[str], s3_client: Any, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/archive"
    record = archive_outputs(
        "req-3",
        outputs,
        date=DAY,
        archive_uri=uri,
        metadata={"model": "google/nano-banana/pro/edit"},
    )

    prefix = "archive/2024-05-01/req-3"
    assert record.output_locations == [
        f"s3://{s3_bucket}/{prefix}/{name}" for name in ("0.png", "1.jpg", "2.webp")
    ]
    head = s3_client.head_object(Bucket=s3_bucket, Key=f"{prefix}/1.jpg")
    assert head["ContentType"] == "image/jpeg"
    assert head["ContentLength"] == record.outputs[1].bytes
    body = s3_client.get_object(Bucket=s3_bucket, Key=f"{prefix}/metadata.json")["Body"].read()
    metadata = json.loads(body)
    assert metadata["model"] == "google/nano-banana/pro/edit"
    assert [o["width"] for o in metadata["outputs"]] == [64, 30, 16]
    assert b"signature" not in body

    keys_before = s3_client.list_objects_v2(Bucket=s3_bucket)["KeyCount"]
    again = archive_outputs("req-3", outputs, date=DAY, archive_uri=uri)
    assert again.already_archived and again.outputs == record.outputs
    assert s3_client.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == keys_before


@pytest.mark.s3
def test_unknown_bucket_fails_before_fetching(outputs: list[str], moto_server: str) -> None:
    with pytest.raises(LocationError, match="bucket no-such-archive does not exist"):
        archive_outputs("req-4", outputs, date=DAY, archive_uri="s3://no-such-archive/x")


def test_failed_outputs_are_reported_after_the_others_are_kept(
    tmp_path: Path, loopback_store: LoopbackObjectStore
) -> None:
    good = _serve(loopback_store, "good.png", _image_bytes("PNG", (8, 8)), "image/png")
    big = _serve(loopback_store, "big.png", _image_bytes("PNG", (300, 300), True), "image/png")
    html = _serve(loopback_store, "page", b"<html>oops</html>", "text/html")
    big_inline = _data_uri(_image_bytes("PNG", (300, 300), True), "image/png")
    remote_http = "http://example.com/out.png?sig=secret"
    urls = [good, big, html, big_inline, remote_http]

    with pytest.raises(ArchiveError) as caught:
        archive_outputs(
            "req-5", urls, date=DAY, archive_uri=str(tmp_path), max_bytes=50_000, backoff=0.01
        )

    error = caught.value
    assert error.request_id == "req-5"
    assert (error.index, error.url) == (1, big.split("?")[0])
    assert [failure.index for failure in error.failures] == [1, 2, 3, 4]
    assert "larger than the 50000-byte limit" in error.failures[0].reason
    assert "not an image" in error.failures[1].reason
    assert "refusing non-HTTPS URL" in error.failures[3].reason
    assert "req-5" in str(error) and "signature" not in str(error) and "secret" not in str(error)
    kept = error.partial_record
    assert [o.index for o in kept.outputs] == [0] and kept.metadata_location is None
    folder = tmp_path / "2024-05-01" / "req-5"
    assert sorted(path.name for path in folder.iterdir()) == ["0.png"]  # no metadata, no temp


class _FlakyHandler(BaseHTTPRequestHandler):
    """Answers 503 to the first ``failures`` GETs, then a PNG."""

    url = ""
    failures = 0
    calls = 0
    body = _image_bytes("PNG", (5, 7))

    def do_GET(self) -> None:
        type(self).calls += 1
        if type(self).calls <= self.failures:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")  # bytes decide the type
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def flaky_url() -> Iterator[type[_FlakyHandler]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    _FlakyHandler.url = f"http://127.0.0.1:{server.server_address[1]}/out.png?token=abc"
    _FlakyHandler.calls = 0
    try:
        yield _FlakyHandler
    finally:
        server.shutdown()
        server.server_close()


def test_transient_failures_are_retried(tmp_path: Path, flaky_url: Any) -> None:
    flaky_url.failures = 2
    record = archive_outputs(
        "req-6", [flaky_url.url], date=DAY, archive_uri=str(tmp_path), backoff=0.01
    )
    assert flaky_url.calls == 3
    assert record.outputs[0].content_type == "image/png"
    assert (record.outputs[0].width, record.outputs[0].height) == (5, 7)


def test_retries_are_bounded(tmp_path: Path, flaky_url: Any) -> None:
    flaky_url.failures = 10
    with pytest.raises(ArchiveError, match="gave up after 2 attempts"):
        archive_outputs(
            "req-7", [flaky_url.url], date=DAY, archive_uri=str(tmp_path), retries=1, backoff=0.01
        )
    assert flaky_url.calls == 2


def test_layout_is_one_function() -> None:
    layout = archive_layout("abc-123", datetime(2024, 12, 31, 23, 59))
    assert layout.folder == "2024-12-31/abc-123"
    assert layout.output_key(2, "image/jpeg") == "2024-12-31/abc-123/2.jpg"
    assert layout.metadata_key == "2024-12-31/abc-123/metadata.json"
    for bad in ("../x", "a/b", "", ".."):
        with pytest.raises(ValueError):
            archive_layout(bad, DAY)


def test_caller_metadata_cannot_overwrite_archive_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outputs"):
        archive_outputs("req-8", [], date=DAY, archive_uri=str(tmp_path), metadata={"outputs": []})


def test_unknown_date_files_under_today_utc(tmp_path: Path) -> None:
    inline = _data_uri(_image_bytes("PNG", (3, 2)), "image/png")
    record = archive_outputs("req-9", [inline], date=None, archive_uri=str(tmp_path))
    assert record.archive_date == datetime.now(timezone.utc).date()
    assert (record.outputs[0].width, record.outputs[0].height) == (3, 2)


def test_flat_layout_puts_the_files_named_by_the_request_in_the_folder(
    tmp_path: Path, outputs: list[str]
) -> None:
    out = tmp_path / "out"
    several = archive_outputs("req-9", outputs, date=DAY, archive_uri=str(out), flat=True)
    single = archive_outputs("req-10", outputs[:1], date=DAY, archive_uri=str(out), flat=True)
    again = archive_outputs("req-10", outputs[:1], date=DAY, archive_uri=str(out), flat=True)

    assert sorted(path.name for path in out.iterdir()) == [
        "req-10.metadata.json",
        "req-10.png",
        "req-9-1.png",
        "req-9-2.jpg",
        "req-9-3.webp",
        "req-9.metadata.json",
    ]
    assert several.metadata_location == str(out / "req-9.metadata.json")
    assert single.output_locations == [str(out / "req-10.png")]
    assert again.already_archived and again.output_locations == single.output_locations
    assert json.loads((out / "req-10.metadata.json").read_text())["request_id"] == "req-10"
