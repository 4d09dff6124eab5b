"""Previews: thumbnails small whatever the original, a report bounded however large the batch."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from prefect_nanobanana.previews import ShownRow, preview_markdown
from prefect_nanobanana.storage import location_link, location_uri, thumbnail_data_uri


def _noisy(path: Path, size: tuple[int, int]) -> Path:
    # Noise compresses worst: the upper bound of a thumbnail's size.
    Image.effect_noise(size, 64).convert("RGB").save(path)
    return path


def test_a_thumbnail_is_a_small_jpeg_whatever_the_original(tmp_path: Path) -> None:
    original = _noisy(tmp_path / "2k.png", (2048, 1152))
    uri = thumbnail_data_uri(original)
    assert uri is not None and uri.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as image:
        assert image.format == "JPEG" and max(image.size) == 128
    assert len(uri) < 12_000 < original.stat().st_size


def test_nothing_is_fetched_or_guessed_for_a_preview(tmp_path: Path) -> None:
    assert thumbnail_data_uri("https://example.com/a.png?X-Amz-Signature=s") is None
    assert thumbnail_data_uri(tmp_path / "missing.png") is None
    (tmp_path / "notes.txt").write_text("not an image")
    assert thumbnail_data_uri(tmp_path / "notes.txt") is None


def test_an_s3_thumbnail_is_read_with_the_archives_client(s3_client, s3_bucket, tmp_path):
    image = _noisy(tmp_path / "out.png", (300, 200))
    s3_client.upload_file(str(image), s3_bucket, "edited/0.png")
    uri = thumbnail_data_uri(f"s3://{s3_bucket}/edited/0.png", s3_client)
    assert uri is not None and uri.startswith("data:image/jpeg;base64,")


def test_locations_link_where_a_browser_can_go() -> None:
    assert location_link("s3://my-bucket/edited/2026-12-01/r/0.png") == (
        "https://s3.console.aws.amazon.com/s3/object/my-bucket?prefix=edited%2F2026-12-01%2Fr%2F0.png"
    )
    assert location_link("/srv/archive/0.png") is None  # its absolute path is what is shown
    assert location_uri("/srv/archive/0.png") == "file:///srv/archive/0.png"
    assert location_uri("s3://my-bucket/k.png") == "s3://my-bucket/k.png"


@pytest.mark.parametrize("rows", [5, 200])
def test_the_report_shows_images_for_the_first_rows_only(tmp_path: Path, rows: int) -> None:
    before = _noisy(tmp_path / "in.png", (1024, 768))
    after = _noisy(tmp_path / "out.png", (1024, 1024))
    shown = [
        ShownRow(
            label=f"row-{index}",
            status="archived",
            request_id=f"r-{index}",
            sources=[str(before), "https://example.com/b.png?X-Amz-Signature=secret"],
            output_locations=[str(after)],
            metadata_location=str(tmp_path / f"{index}" / "metadata.json"),
        )
        for index in range(rows)
    ]
    markdown = preview_markdown("batch", shown, preview_rows=20)
    thumbnails = markdown.count("data:image/jpeg;base64,")
    assert thumbnails == 2 * min(rows, 20)
    assert "secret" not in markdown and "https://example.com/b.png" in markdown
    # In the table, a source shown by name only, so no cell outgrows the page; its
    # whole name is in the list under the table.
    table_rows = [line for line in markdown.splitlines() if line.startswith("| row-")]
    assert table_rows and all("https://" not in line and "`b.png`" in line for line in table_rows)
    assert "input: `https://example.com/b.png`" in markdown
    assert str(tmp_path / "0" / "metadata.json") in markdown
    # Bounded: at most 20 rows of images, a few kilobytes each.
    assert len(markdown) < 20 * 2 * 12_000 + 20 * 1_000
    print(f"{rows} rows, 20 previewed: {len(markdown)} characters")


def test_a_failed_rows_long_paths_are_named_by_file_in_the_table(tmp_path: Path) -> None:
    deep = "/srv/nightly/2026-12-01/incoming/customer-uploads/batch-0042/photo-7.png"
    error = f"InvalidInputError: cannot read {deep}: no such file"
    shown = [
        ShownRow(label="row-1", status="failed", request_id=None, sources=[deep], error=error),
        ShownRow(
            label="row-2", status="failed", request_id=None, sources=[], error="quota: 429 x3"
        ),
    ]
    markdown = preview_markdown("batch", shown)
    failed_row, short_row = (line for line in markdown.splitlines() if line.startswith("| row-"))
    # Prefect's UI wraps no cell: the error in short lines, no whole path in the table.
    after = failed_row.rstrip(" |").rsplit(" | ", 1)[1]
    assert deep not in failed_row and all(len(line) <= 40 for line in after.split("<br>"))
    assert "cannot read …/photo-7.png: no such file" in after.replace("<br>", " ")
    assert f"error: {error}" in markdown.split("## Where it went", 1)[1]
    # A short error is in the table as it is, and not said twice.
    assert "quota: 429 x3" in short_row and markdown.count("quota: 429 x3") == 1
