"""Location parsing, signature stripping and the image sniffer (pure functions, no I/O)."""

from __future__ import annotations

import io
from datetime import date
from pathlib import Path

import pytest
from PIL import Image

from prefect_nanobanana.storage import (
    HttpLocation,
    LocalLocation,
    LocationError,
    S3Location,
    parse_location,
    redact,
    sniff_image_type,
    strip_signature,
)

SIGNED = "https://bucket.s3.amazonaws.com/in/a.png?X-Amz-Signature=abc123&X-Amz-Expires=60#frag"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("photos/a.png", LocalLocation(Path("photos/a.png"))),
        ("/abs/a.png", LocalLocation(Path("/abs/a.png"))),
        ("~/a.png", LocalLocation(Path("~/a.png").expanduser())),
        ("file:///tmp/a%20b.png", LocalLocation(Path("/tmp/a b.png"))),
        ("s3://my-bucket/in/a.png", S3Location("my-bucket", "in/a.png")),
        ("s3://my-bucket", S3Location("my-bucket", "")),
        ("s3://my-bucket/odd?#key", S3Location("my-bucket", "odd?#key")),
        ("https://example.com/a.png?sig=1", HttpLocation("https://example.com/a.png?sig=1")),
        ("http://127.0.0.1:8000/a.png", HttpLocation("http://127.0.0.1:8000/a.png")),
        ("http://127.9.9.9/a.png", HttpLocation("http://127.9.9.9/a.png")),
        ("http://localhost/a.png", HttpLocation("http://localhost/a.png")),
        ("http://[::1]:9000/a.png", HttpLocation("http://[::1]:9000/a.png")),
    ],
)
def test_parse_location(value: str, expected: object) -> None:
    assert parse_location(value) == expected


def test_path_objects_are_local() -> None:
    assert parse_location(Path("x.png")) == LocalLocation(Path("x.png"))


@pytest.mark.parametrize(
    "value", ["http://example.com/a.png?sig=secret", "http://10.0.0.1/a.png?sig=secret"]
)
def test_plain_http_to_remote_hosts_is_refused_without_leaking_the_query(value: str) -> None:
    with pytest.raises(LocationError, match="refusing non-HTTPS URL") as caught:
        parse_location(value)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("value", ["", "ftp://host/a.png", "s3://BAD_bucket/a", "https:///a"])
def test_unusable_locations(value: str) -> None:
    with pytest.raises(LocationError):
        parse_location(value)


def test_strip_signature() -> None:
    assert strip_signature(SIGNED) == "https://bucket.s3.amazonaws.com/in/a.png"
    assert strip_signature("https://user:pw@host/a.png?x=1") == "https://host/a.png"
    assert strip_signature("data:image/png;base64,iVBORw0KGgo=") == "data:image/png"
    assert strip_signature("s3://b/k") == "s3://b/k"
    assert strip_signature("photos/a.png") == "photos/a.png"


def test_redact_walks_metadata_and_scrubs_urls_everywhere() -> None:
    metadata = {
        "sources": [SIGNED, "photos/a.png"],
        "nested": {"error": f"fetch of {SIGNED} failed", "when": date(2024, 5, 1)},
        "inline": "data:image/png;base64,AAAA",
        "count": 3,
        "tags": ("a", "b"),
    }
    redacted = redact(metadata)
    assert redacted == {
        "sources": ["https://bucket.s3.amazonaws.com/in/a.png", "photos/a.png"],
        "nested": {
            "error": "fetch of https://bucket.s3.amazonaws.com/in/a.png failed",
            "when": "2024-05-01",
        },
        "inline": "data:image/png",
        "count": 3,
        "tags": ["a", "b"],
    }


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")],
)
def test_sniffer_recognises_real_images(fmt: str, content_type: str) -> None:
    assert sniff_image_type(_encoded(fmt)[:32]) == content_type


def test_sniffer_heif_brands_and_rejects() -> None:
    assert sniff_image_type(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00") == "image/heic"
    assert sniff_image_type(b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00") == "image/heif"
    assert sniff_image_type(b"\x00\x00\x00\x18ftypisom\x00\x00\x00\x00") is None  # an MP4
    assert sniff_image_type(b"<html>") is None
    assert sniff_image_type(b"") is None
