"""Local images without a staging location: sent inline as data: URIs, within the caps."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from prefect_nanobanana.storage import StagingError, check_sources, probe_image_url, stage_assets
from prefect_nanobanana.storage.media import MIB, data_uri_length


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def _huge_png_header(path: Path, width: int, height: int) -> Path:
    """A small file whose header claims `width` x `height` pixels (a pixel bomb's shape)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )
    return path


def _png_of_size(path: Path, size_bytes: int) -> Path:
    """A real 8x8 PNG padded to `size_bytes` (decoders stop at IEND; the caps judge bytes)."""
    _huge_png_header(path, 8, 8)
    path.write_bytes(path.read_bytes().ljust(size_bytes, b"\0"))
    return path


def test_a_small_local_image_goes_inline_as_a_data_uri(sample_images: Path) -> None:
    source = sample_images / "a.png"
    (asset,) = stage_assets([str(source)])

    assert asset.inline and not asset.uploaded and asset.key is None
    header, _, payload = asset.url.partition(",")
    assert header == "data:image/png;base64"
    assert base64.b64decode(payload) == source.read_bytes()
    assert asset.provenance == f"inline:a.png sha256={asset.sha256}"
    assert payload[:20] not in repr(asset) and payload[:20] not in str(asset)


def test_a_folder_goes_inline_file_by_file(sample_images: Path) -> None:
    assets = stage_assets([str(sample_images)])
    assert [asset.url.split(";")[0] for asset in assets] == [
        "data:image/png",
        "data:image/jpeg",
        "data:image/webp",
    ]


def test_an_image_over_the_inline_cap_needs_staging_and_says_so(tmp_path: Path) -> None:
    big = _png_of_size(tmp_path / "big.png", 5 * MIB)  # 6.7 MiB once base64-encoded
    with pytest.raises(StagingError) as caught:
        stage_assets([str(big)])
    message = str(caught.value)
    assert f"{big}: 5.0 MiB is too large to send inline (6.7 MiB as a data: URI" in message
    assert "at most 6.0 MiB" in message
    assert "give a staging location" in message and "--staging" in message
    assert "Nothing was submitted" in message


def test_just_under_the_cap_goes_inline(tmp_path: Path) -> None:
    largest = (6 * MIB - len("data:image/png;base64,")) // 4 * 3
    assert data_uri_length(largest, "image/png") <= 6 * MIB
    (asset,) = stage_assets([str(_png_of_size(tmp_path / "edge.png", largest))])
    assert asset.inline and len(asset.url) <= 6 * MIB


def test_a_request_over_64_mib_inline_is_refused_with_the_total(tmp_path: Path) -> None:
    photo = _png_of_size(tmp_path / "photo.png", 4 * MIB)  # 5.3 MiB encoded: within the cap
    with pytest.raises(StagingError, match=r"together the 13 local images are 69\.3 MiB"):
        stage_assets([str(photo)] * 13)
    assert len(stage_assets([str(photo)] * 11)) == 11  # 58.7 MiB: fits


def test_an_image_over_32_megapixels_is_refused_inline(tmp_path: Path) -> None:
    bomb = _huge_png_header(tmp_path / "bomb.png", 8000, 5000)
    with pytest.raises(StagingError, match=r"8000x5000 is 40,000,000 pixels, over the API's"):
        stage_assets([str(bomb)])


def test_every_problem_is_named_at_once(tmp_path: Path) -> None:
    big = _png_of_size(tmp_path / "big.png", 7 * MIB)
    bigger = _png_of_size(tmp_path / "bigger.png", 8 * MIB)
    with pytest.raises(StagingError) as caught:
        check_sources([str(big), str(bigger)])
    assert "big.png: 7.0 MiB" in str(caught.value) and "bigger.png: 8.0 MiB" in str(caught.value)


def test_pillow_reads_our_inline_data_back(sample_images: Path) -> None:
    (asset,) = stage_assets([str(sample_images / "b.jpg")])
    from io import BytesIO

    with Image.open(BytesIO(base64.b64decode(asset.url.partition(",")[2]))) as image:
        assert image.size == (32, 32)


def test_probe_tells_images_from_the_rest(image_server) -> None:
    assert probe_image_url(image_server.url_for("wide.png")) is None
    missing = probe_image_url(image_server.url_for("nope.png", "X-Amz-Signature=secret"))
    not_image = probe_image_url(image_server.url_for("not-an-image.txt"))
    unreachable = probe_image_url("http://127.0.0.1:9/photo.png", timeout=2)

    assert missing == f"{image_server.base_url}/nope.png: HTTP 404 (not found)"
    assert not_image is not None and "not an image (served as text/plain" in not_image
    assert unreachable == "http://127.0.0.1:9/photo.png: not reachable (ConnectError)"


def test_check_sources_uploads_and_encodes_nothing(sample_images: Path, image_server) -> None:
    before = len(image_server.requested_paths)
    check_sources([str(sample_images / "a.png"), image_server.url_for("tall.jpg")])
    with pytest.raises(StagingError, match=r"not-an-image\.txt: not an image"):
        check_sources([image_server.url_for("not-an-image.txt")])
    with pytest.raises(StagingError, match="file not found"):
        check_sources([str(sample_images / "missing.png")])
    # A ranged GET of each http(s) input's header (the pixel cap), and one GET more for the
    # text file, judged by its first bytes when HEAD (not logged by the fixture) names no image.
    assert image_server.requested_paths[before:] == [
        "/tall.jpg",
        "/not-an-image.txt",
        "/not-an-image.txt",
    ]


def _box(kind: bytes, body: bytes, full: bool = False) -> bytes:
    body = (b"\0\0\0\0" if full else b"") + body
    return (8 + len(body)).to_bytes(4, "big") + kind + body


def _heic(path: Path, primary: tuple[int, int], tile: tuple[int, int] = (512, 512)) -> Path:
    """The boxes a phone's HEIC opens with (ISO/IEC 23008-12): ``ftyp``, then ``meta``
    with its handler, primary item and item properties, where ``ispe`` declares the
    size of each image, a tile's and the grid's; then the coded data, here none."""

    def ispe(size: tuple[int, int]) -> bytes:
        return _box(b"ispe", size[0].to_bytes(4, "big") + size[1].to_bytes(4, "big"), full=True)

    ftyp = _box(b"ftyp", b"heic" + b"\0\0\0\0" + b"mif1heic")
    hdlr = _box(b"hdlr", b"\0\0\0\0pict" + b"\0" * 12 + b"\0", full=True)
    pitm = _box(b"pitm", (1).to_bytes(2, "big"), full=True)
    ipco = _box(b"ipco", ispe(tile) + ispe(primary))
    ipma = _box(b"ipma", (1).to_bytes(4, "big") + (1).to_bytes(2, "big") + b"\x01\x82", full=True)
    meta = _box(b"meta", hdlr + pitm + _box(b"iprp", ipco + ipma), full=True)
    path.write_bytes(ftyp + meta + _box(b"mdat", b""))
    return path


def test_a_heic_is_held_to_the_pixel_cap_by_its_declared_size(tmp_path: Path) -> None:
    """Pillow reads no HEIC without a plugin, so a HEIC's size was never checked: now its
    ``ispe`` boxes are, the largest (the primary image, not a tile) against the cap."""
    from prefect_nanobanana.storage.media import heif_size, read_image_facts

    photo = _heic(tmp_path / "photo.heic", (4032, 3024))
    assert heif_size(photo.read_bytes()) == (4032, 3024)
    facts = read_image_facts(photo, "photo.heic")
    assert (facts.content_type, facts.width, facts.height) == ("image/heic", 4032, 3024)
    bomb = _heic(tmp_path / "bomb.heic", (30_000, 30_000))
    with pytest.raises(StagingError, match=r"^bomb.heic: 30000x30000 is 900,000,000 pixels"):
        read_image_facts(bomb, "bomb.heic")
    with pytest.raises(StagingError, match="900,000,000 pixels"):
        stage_assets([str(bomb)])  # inline: refused before anything is encoded
    # No size declared in its first bytes: not refused here, left to the API.
    bare = tmp_path / "bare.heic"
    bare.write_bytes(_box(b"ftyp", b"heic" + b"\0\0\0\0" + b"mif1heic") + _box(b"mdat", b""))
    assert read_image_facts(bare, "bare.heic").pixels is None
