"""Real images, made cheaply: the outputs a job serves and the check of its inputs.

Downstream code (archiving, checksums, manifests, thumbnails) must meet real
files of the real pixel size and format, so outputs are genuine Pillow images.
They are flat fills with a band of text (prompt and index), which keeps encoding
to milliseconds even at 4K, makes every image of a request different, and lets a
human glancing at the demo's outputs tell them apart.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import struct
import threading
import zlib
from io import BytesIO
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..client.vocabulary import MEDIA_TYPES, OUTPUT_PIXEL_SIZES

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# Fast settings: the emulator must not spend the time budget of a job on compression.
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {
    "png": {"compress_level": 1},
    "jpeg": {"quality": 85},
    "webp": {"quality": 80, "method": 0},
}
_JPEG_MAX_SEGMENT_PAYLOAD = 65533  # a segment length field is 16 bits and counts itself
_RENDER_LOCKS = tuple(threading.Lock() for _ in range(64))


def closest_aspect_ratio(width: int, height: int) -> str:
    """The table ratio nearest to `width:height` (compared in log space, so 2:1 and 1:2 are
    equally far from 1:1); this is what `aspect_ratio="auto"` produces."""
    target = math.log(width / height)

    def distance(ratio: str) -> float:
        across, down = (int(side) for side in ratio.split(":"))
        return abs(math.log(across / down) - target)

    return min(OUTPUT_PIXEL_SIZES, key=distance)


def output_size(
    aspect_ratio: str, resolution: str, first_input_size: tuple[int, int]
) -> tuple[int, int]:
    """The exact pixel size of an output, following the first input when the ratio is auto."""
    if aspect_ratio == "auto":
        aspect_ratio = closest_aspect_ratio(*first_input_size)
    return OUTPUT_PIXEL_SIZES[aspect_ratio][resolution]


def read_image_size(content: bytes) -> tuple[int, int]:
    """The (width, height) of an encoded image; ValueError when it is not an image Pillow reads."""
    try:
        with Image.open(BytesIO(content)) as image:
            size = image.size
            image.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__})") from exc
    return size


def render_output(
    prompt: str, index: int, size: tuple[int, int], output_format: str, min_bytes: int = 0
) -> bytes:
    """The encoded bytes of output `index` of a request, padded to at least `min_bytes`."""
    key = (prompt, index, size[0], size[1], output_format)
    # Single flight per key: jobs submitted together with one prompt render it once, not N times.
    with _RENDER_LOCKS[hash(key) % len(_RENDER_LOCKS)]:
        data = _render(*key)
    missing = min_bytes - len(data)
    if missing <= 0:
        return data
    if output_format == "png":
        return _pad_png(data, missing)
    if output_format == "jpeg":
        return _pad_jpeg(data, missing)
    return _pad_webp(data, missing, size)


def data_uri(data: bytes, output_format: str) -> str:
    """An output inlined as a data URI, the form `sync_mode=true` answers with."""
    return f"data:{MEDIA_TYPES[output_format]};base64,{base64.b64encode(data).decode('ascii')}"


@functools.lru_cache(maxsize=64)
def _render(prompt: str, index: int, width: int, height: int, output_format: str) -> bytes:
    # Cached: benchmarks submit the same prompt many times, and the bytes are immutable.
    digest = hashlib.sha256(f"{index}\0{prompt}".encode()).digest()
    background = (digest[0], digest[1], digest[2])
    band = (255 - digest[0], 255 - digest[1], 255 - digest[2])
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    top, bottom = height * 2 // 5, height * 3 // 5
    draw.rectangle((0, top, width, bottom), fill=band)
    text = f"#{index + 1} {prompt}"[:120]
    draw.text((width // 40, top + height // 30), text, fill=background, font=_font(height // 20))
    buffer = BytesIO()
    image.save(buffer, _PIL_FORMATS[output_format], **_SAVE_OPTIONS[output_format])
    return buffer.getvalue()


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(12, size))


def _pad_png(data: bytes, missing: int) -> bytes:
    """Insert a private ancillary chunk ("paDd": decoders skip it) before IEND."""
    payload = bytes(max(0, missing - 12))
    chunk_type = b"paDd"
    chunk = (
        struct.pack(">I", len(payload))
        + chunk_type
        + payload
        + struct.pack(">I", zlib.crc32(chunk_type + payload))
    )
    iend = len(data) - 12
    return data[:iend] + chunk + data[iend:]


def _pad_jpeg(data: bytes, missing: int) -> bytes:
    """Insert comment (COM) segments right after the SOI marker."""
    segments = bytearray()
    while len(segments) < missing:
        payload = min(_JPEG_MAX_SEGMENT_PAYLOAD, max(0, missing - len(segments) - 4))
        segments += b"\xff\xfe" + struct.pack(">H", payload + 2) + bytes(payload)
    return data[:2] + bytes(segments) + data[2:]


def _pad_webp(data: bytes, missing: int, size: tuple[int, int]) -> bytes:
    """Append an unknown chunk, which the extended (VP8X) WebP format tells readers to skip."""
    chunks = data[12:]
    if chunks[:4] != b"VP8X":
        # Our outputs are opaque RGB without metadata, so every VP8X flag stays clear.
        width, height = size
        chunks = (
            b"VP8X"
            + struct.pack("<I", 10)
            + bytes(4)
            + (width - 1).to_bytes(3, "little")
            + (height - 1).to_bytes(3, "little")
            + chunks
        )
    payload_size = max(0, missing - (len(chunks) - len(data) + 12) - 8)
    payload_size += payload_size % 2  # RIFF chunks are padded to an even size
    chunks += b"PADD" + struct.pack("<I", payload_size) + bytes(payload_size)
    return b"RIFF" + struct.pack("<I", len(chunks) + 4) + b"WEBP" + chunks
