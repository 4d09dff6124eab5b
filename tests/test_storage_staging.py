"""Staging against moto's S3 server and the loopback store, over real HTTP."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from prefect_nanobanana.emulator import LoopbackObjectStore
from prefect_nanobanana.storage import (
    MAX_INPUT_BYTES,
    StagedAsset,
    StagingError,
    check_sources,
    stage_assets,
)

pytestmark = pytest.mark.s3


def _object_count(s3_client: Any, bucket: str) -> int:
    return s3_client.list_objects_v2(Bucket=bucket).get("KeyCount", 0)


def _assert_fetchable(asset: StagedAsset, expected: Path) -> None:
    response = httpx.get(asset.url)
    assert response.status_code == 200
    assert response.content == expected.read_bytes()
    assert response.headers["content-type"] == asset.content_type


def test_folder_to_s3_gives_working_presigned_urls(
    sample_images: Path, s3_client: Any, s3_bucket: str
) -> None:
    assets = stage_assets([str(sample_images)], f"s3://{s3_bucket}/inputs")

    assert [Path(asset.source).name for asset in assets] == ["a.png", "b.jpg", "c.webp"]
    assert [asset.content_type for asset in assets] == ["image/png", "image/jpeg", "image/webp"]
    for asset in assets:
        path = Path(asset.source)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert asset.sha256 == digest
        assert asset.size_bytes == path.stat().st_size
        assert asset.key is not None and asset.key.startswith(f"inputs/{digest}.")
        assert asset.uploaded
        _assert_fetchable(asset, path)


def test_glob_selects_matching_files(sample_images: Path, s3_bucket: str) -> None:
    assets = stage_assets([f"{sample_images}/*.jpg"], f"s3://{s3_bucket}")
    assert [Path(asset.source).name for asset in assets] == ["b.jpg"]
    assert assets[0].key is not None and "/" not in assets[0].key


def test_content_addressing_uploads_each_content_once(
    sample_images: Path, s3_client: Any, s3_bucket: str
) -> None:
    renamed = sample_images.parent / "same-bytes-other-name.jpg"
    shutil.copy(sample_images / "a.png", renamed)  # PNG bytes under a .jpg name

    first = stage_assets([str(sample_images / "a.png"), str(renamed)], f"s3://{s3_bucket}/in")
    second = stage_assets([str(sample_images)], f"s3://{s3_bucket}/in")

    assert [asset.uploaded for asset in first] == [True, False]
    assert first[0].key == first[1].key and first[1].key.endswith(".png")
    assert [asset.uploaded for asset in second] == [False, True, True]
    assert _object_count(s3_client, s3_bucket) == 3
    _assert_fetchable(second[0], sample_images / "a.png")


def test_repr_and_str_hide_the_signature(sample_images: Path, s3_bucket: str) -> None:
    (asset,) = stage_assets([str(sample_images / "a.png")], f"s3://{s3_bucket}")
    assert "?" in asset.url
    for text in (repr(asset), str(asset)):
        assert "Signature" not in text and "?" not in text
        assert asset.url.split("?")[0] in text


def test_https_and_loopback_urls_pass_through_untouched() -> None:
    signed = "https://cdn.example.com/a.png?sig=abc"
    assets = stage_assets([signed, "http://127.0.0.1:9/b.png"])
    assert [asset.url for asset in assets] == [signed, "http://127.0.0.1:9/b.png"]
    assert assets[0].source == "https://cdn.example.com/a.png"
    assert assets[0].sha256 is None and not assets[0].uploaded


def test_s3_sources_are_checked_then_presigned(
    sample_images: Path, s3_client: Any, s3_bucket: str
) -> None:
    s3_client.upload_file(str(sample_images / "b.jpg"), s3_bucket, "src/b.jpg")
    s3_client.put_object(Bucket=s3_bucket, Key="src/readme.txt", Body=b"hello world")

    (asset,) = stage_assets([f"s3://{s3_bucket}/src/b.jpg"])
    assert asset.content_type == "image/jpeg"
    assert asset.size_bytes == (sample_images / "b.jpg").stat().st_size
    assert asset.source == f"s3://{s3_bucket}/src/b.jpg"
    assert httpx.get(asset.url).content == (sample_images / "b.jpg").read_bytes()

    with pytest.raises(StagingError, match="not an image"):
        stage_assets([f"s3://{s3_bucket}/src/readme.txt"])
    with pytest.raises(StagingError, match="does not exist"):
        stage_assets([f"s3://{s3_bucket}/src/missing.png"])


def test_an_s3_pixel_bomb_is_refused_from_its_header_alone(
    tmp_path: Path, s3_client: Any, s3_bucket: str
) -> None:
    """An S3 input's header is read by the ranged GET that sniffs its type: a PNG that
    claims 30000x30000 pixels is refused before anything is signed or paid, and an
    image over the cap by a row is refused by its exact size."""
    from tests.test_hostile_server import write_pixel_bomb
    from tests.test_storage_inline import _heic

    refusals = {
        "bomb": (30_000, 30_000, "image has far more than 32,000,000 pixels"),
        "over": (8000, 4001, "8000x4001 is 32,008,000 pixels, over"),
    }
    for name, (width, height, refusal) in refusals.items():
        bomb = write_pixel_bomb(tmp_path / f"{name}.png", width, height)
        s3_client.upload_file(str(bomb), s3_bucket, f"src/{name}.png")
        with pytest.raises(StagingError, match=rf"^s3://{s3_bucket}/src/{name}.png: {refusal}"):
            stage_assets([f"s3://{s3_bucket}/src/{name}.png"])
    heic = _heic(tmp_path / "bomb.heic", (30_000, 30_000))  # no Pillow reads: its boxes
    s3_client.upload_file(str(heic), s3_bucket, "src/bomb.heic")
    with pytest.raises(StagingError, match=r"bomb.heic: 30000x30000 is 900,000,000 pixels"):
        stage_assets([f"s3://{s3_bucket}/src/bomb.heic"])
    fine = write_pixel_bomb(tmp_path / "fine.png", 8000, 4000)  # 32,000,000: at the cap
    s3_client.upload_file(str(fine), s3_bucket, "src/fine.png")
    (asset,) = stage_assets([f"s3://{s3_bucket}/src/fine.png"])
    assert asset.content_type == "image/png"


def test_an_https_pixel_bomb_is_refused_from_its_header_alone(tmp_path: Path) -> None:
    """An http(s) input went to the API as given, whatever its header claimed: the API
    refused it only after the submit was billed. Now a ranged GET of its header checks
    the pixel cap, as for S3 (the tests serve "https" inputs over loopback http)."""
    from tests.fixtures.emulator import ImageServer
    from tests.test_hostile_server import write_pixel_bomb
    from tests.test_storage_inline import _heic

    write_pixel_bomb(tmp_path / "bomb.png")
    write_pixel_bomb(tmp_path / "over.png", 8000, 4001)
    write_pixel_bomb(tmp_path / "fine.png", 8000, 4000)  # 32,000,000: at the cap
    _heic(tmp_path / "bomb.heic", (30_000, 30_000))
    server = ImageServer(tmp_path).start()
    try:
        refusals = {
            "bomb.png": "image has far more than 32,000,000 pixels",
            "over.png": "8000x4001 is 32,008,000 pixels, over",
            "bomb.heic": "30000x30000 is 900,000,000 pixels",
            "redirect/over.png": "8000x4001 is 32,008,000 pixels, over",
        }
        for name, refusal in refusals.items():
            url = server.url_for(name, query="X-Amz-Signature=secret")
            shown = server.url_for(name)
            with pytest.raises(StagingError, match=rf"^{shown}: {refusal}") as refused:
                stage_assets([url])
            assert "secret" not in str(refused.value)
            with pytest.raises(StagingError, match=refusal):  # the pre-flight's check too
                check_sources([url])
        fine = server.url_for("fine.png", query="sig=abc")
        assert [asset.url for asset in stage_assets([fine])] == [fine]
        assert "/fine.png?sig=abc" in server._server.requested_paths
    finally:
        server.stop()


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    """A 60 MB "PNG", sparse: only the header is really written."""
    path = tmp_path / "huge.png"
    with path.open("wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.truncate(60 * 1024 * 1024)
    return path


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("missing.png", "missing.png: file not found"),
        ("notes.txt", "notes.txt: not an image"),
        ("fake.png", "fake.png: not an image"),
        ("BIG", f"huge.png: {60 * 1024 * 1024} bytes exceeds the input limit of {MAX_INPUT_BYTES}"),
        ("http://example.com/a.png?sig=secret", "refusing non-HTTPS URL http://example.com/a.png"),
        ("nothing-*.png", "no files match"),
    ],
)
def test_a_bad_fifth_source_fails_before_any_upload(
    bad: str,
    message: str,
    sample_images: Path,
    big_file: Path,
    s3_client: Any,
    s3_bucket: str,
) -> None:
    (sample_images / "fake.png").write_text("<html>not a png</html>")
    good = [str(sample_images / name) for name in ("a.png", "b.jpg", "c.webp", "a.png")]
    if bad == "BIG":
        bad_source = str(big_file)
    elif bad.startswith("http"):
        bad_source = bad
    else:
        bad_source = str(sample_images / bad)

    with pytest.raises(StagingError) as caught:
        stage_assets([*good, bad_source], f"s3://{s3_bucket}/in")

    assert message in str(caught.value)
    assert "secret" not in str(caught.value)
    assert _object_count(s3_client, s3_bucket) == 0


def test_unknown_bucket_fails_clearly_before_upload(sample_images: Path) -> None:
    with pytest.raises(StagingError, match="bucket no-such-bucket-here does not exist"):
        stage_assets([str(sample_images)], "s3://no-such-bucket-here/in")


def test_folder_without_images_is_an_error(tmp_path: Path, s3_bucket: str) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(StagingError, match="folder contains no images"):
        stage_assets([str(tmp_path)], f"s3://{s3_bucket}")


def test_staging_to_the_loopback_store(
    sample_images: Path, loopback_store: LoopbackObjectStore
) -> None:
    assets = stage_assets(
        [str(sample_images)], loopback_store.base_url, upload_token=loopback_store.upload_token
    )
    again = stage_assets(
        [str(sample_images / "a.png")],
        loopback_store.base_url,
        upload_token=loopback_store.upload_token,
    )

    assert [asset.uploaded for asset in assets] == [True, True, True]
    assert not again[0].uploaded and again[0].key == assets[0].key
    for asset in [*assets, *again]:
        assert "signature=" in asset.url
        _assert_fetchable(asset, Path(asset.source))


def test_loopback_token_from_environment_and_refusals(
    sample_images: Path, loopback_store: LoopbackObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = [str(sample_images / "b.jpg")]
    monkeypatch.delenv("NANOBANANA_STAGING_TOKEN", raising=False)
    with pytest.raises(StagingError, match="needs an upload token"):
        stage_assets(source, loopback_store.base_url)
    with pytest.raises(StagingError, match="refused the upload token"):
        stage_assets(source, loopback_store.base_url, upload_token="wrong")

    monkeypatch.setenv("NANOBANANA_STAGING_TOKEN", loopback_store.upload_token)
    (asset,) = stage_assets(source, loopback_store.base_url)
    _assert_fetchable(asset, sample_images / "b.jpg")
