"""Real images, made cheaply: the outputs a job serves and the check of its inputs.

Downstream code (archiving, checksums, manifests, thumbnails) must meet real
files of the real pixel size and format, and a person reviewing a before/after
pair must see that the output came from *that* input. So an output is the first
input image, cropped to the output's ratio, changed visibly by an effect the
prompt picks (a hash of the prompt: tint, posterise, mirror, invert, sepia or
solarise, always the same for the same prompt), captioned with the prompt and
the image's index, at the exact pixel size of the ratio/resolution table.

Cheap on purpose (the benchmarks run hundreds of jobs): the input is decoded
once at a small working size, the effect runs there, a single resize brings it
to the output size, and the rendered bytes are cached per (input, prompt,
index, size, format).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import math
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

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
# The long side of the image the effect works on; the output is one resize away from it.
_WORKING_SIDE = 640
_WORKING_CACHE_SIZE = 32
_CAPTION_MAX_LINES = 3


@dataclass(frozen=True)
class InputImage:
    """One decoded input: its pixel size and a digest naming its bytes (the render cache key).

    Only the first input of a job is kept as pixels (`working`, at most
    `_WORKING_SIDE` on its long side); the others are checked and measured.
    """

    size: tuple[int, int]
    digest: str
    # Not compared or hashed: the digest names the bytes, and a Pillow image is unhashable.
    working: Image.Image | None = field(default=None, compare=False, repr=False)


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
    return read_input_image(content).size


def read_input_image(content: bytes, *, keep_pixels: bool = False) -> InputImage:
    """Check that `content` is an image Pillow reads; with `keep_pixels`, decode it small.

    ValueError when it is not an image. The working copy of a first input is
    cached by digest, so a benchmark sending one picture a thousand times decodes
    it once.
    """
    digest = hashlib.sha256(content).hexdigest()
    if keep_pixels:
        cached = _cached_working(digest)
        if cached is not None:
            return cached
    try:
        with Image.open(BytesIO(content)) as image:
            size = image.size
            if not keep_pixels:
                image.verify()
                return InputImage(size, digest)
            image.draft("RGB", (_WORKING_SIDE, _WORKING_SIDE))  # JPEG: decode at a fraction
            working = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__})") from exc
    working.thumbnail((_WORKING_SIDE, _WORKING_SIDE), Image.Resampling.BILINEAR)
    decoded = InputImage(size, digest, working)
    _store_working(decoded)
    return decoded


def decode_data_uri(uri: str) -> tuple[str, bytes]:
    """(media type, bytes) of a base64 `data:` URI; ValueError when it is not one.

    The provider's own clients send local images this way in `image_urls`, so the
    emulator accepts them as the real service does.
    """
    header, comma, payload = uri.partition(",")
    if not header.startswith("data:") or not comma:
        raise ValueError("not a data: URI")
    media_type, *parameters = header[len("data:") :].split(";")
    if "base64" not in parameters:
        raise ValueError("only base64 data: URIs are supported")
    try:
        return media_type or "text/plain", base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the data: URI's payload is not valid base64") from None


def describe_data_uri(uri: str) -> str:
    """A data URI as a short line for logs and stats: media type and length, never the payload."""
    return f"{uri.partition(',')[0]},... ({len(uri)} characters)"


def render_output(
    prompt: str,
    index: int,
    size: tuple[int, int],
    output_format: str,
    min_bytes: int = 0,
    *,
    source: InputImage | None = None,
) -> bytes:
    """The encoded bytes of output `index` of a request, padded to at least `min_bytes`.

    `source` is the job's first input (decoded with `keep_pixels`); without one
    (benchmarks that only need bytes) the picture is a neutral gradient.
    """
    key = (prompt, index, size[0], size[1], output_format, source)
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


def effect_for(prompt: str) -> str:
    """The name of the visible change a prompt makes (deterministic: a hash of the prompt)."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return _EFFECT_NAMES[digest[0] % len(_EFFECT_NAMES)]


_working_lock = threading.Lock()
_working_images: OrderedDict[str, InputImage] = OrderedDict()


def _cached_working(digest: str) -> InputImage | None:
    with _working_lock:
        found = _working_images.get(digest)
        if found is not None:
            _working_images.move_to_end(digest)
        return found


def _store_working(decoded: InputImage) -> None:
    with _working_lock:
        _working_images[decoded.digest] = decoded
        while len(_working_images) > _WORKING_CACHE_SIZE:
            _working_images.popitem(last=False)


def _tint(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    return Image.blend(image, Image.new("RGB", image.size, colour), 0.45)


def _sepia(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    return ImageOps.colorize(ImageOps.grayscale(image), black=(30, 20, 10), white=colour)


_EFFECTS: dict[str, Callable[[Image.Image, tuple[int, int, int]], Image.Image]] = {
    "tint": _tint,
    "posterise": lambda image, _colour: ImageOps.posterize(image, 2),
    "mirror": lambda image, colour: _tint(ImageOps.mirror(image), colour),
    "invert": lambda image, _colour: ImageOps.invert(image),
    "sepia": _sepia,
    "solarise": lambda image, _colour: ImageOps.solarize(image, threshold=110),
}
_EFFECT_NAMES = tuple(_EFFECTS)


def _base_picture(source: InputImage | None, size: tuple[int, int]) -> Image.Image:
    """The first input cropped to the output's ratio, at working size (or a gradient)."""
    width, height = size
    scale = _WORKING_SIDE / max(width, height)
    working_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if source is None or source.working is None:
        gradient = Image.linear_gradient("L").resize(working_size)
        return ImageOps.colorize(gradient, black=(60, 60, 70), white=(200, 200, 190))
    return ImageOps.fit(source.working, working_size, Image.Resampling.BILINEAR)


@functools.lru_cache(maxsize=64)
def _render(
    prompt: str,
    index: int,
    width: int,
    height: int,
    output_format: str,
    source: InputImage | None,
) -> bytes:
    # Cached: benchmarks submit the same prompt and input many times, and the bytes are immutable.
    digest = hashlib.sha256(f"{index}\0{prompt}".encode()).digest()
    colour = (64 + digest[1] % 192, 64 + digest[2] % 192, 64 + digest[3] % 192)
    picture = _EFFECTS[effect_for(prompt)](_base_picture(source, (width, height)), colour)
    image = picture.resize((width, height), Image.Resampling.BILINEAR)
    _caption(image, f"#{index + 1} {prompt}", colour)
    buffer = BytesIO()
    image.save(buffer, _PIL_FORMATS[output_format], **_SAVE_OPTIONS[output_format])
    return buffer.getvalue()


def _caption(image: Image.Image, text: str, colour: tuple[int, int, int]) -> None:
    """The prompt, wrapped to the width, on a dark band along the bottom edge."""
    width, height = image.size
    font = _font(max(12, min(width, height) // 24))
    margin = max(4, width // 60)
    lines = _wrap(text, font, width - 2 * margin)
    line_height = round(font.size * 1.25) if isinstance(font, ImageFont.FreeTypeFont) else 14
    band_top = height - len(lines) * line_height - 2 * margin
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, band_top, width, height), fill=(20, 20, 24))
    for number, line in enumerate(lines):
        top = band_top + margin + number * line_height
        draw.text((margin, top), line, fill=(245, 245, 240), font=font)


def _wrap(
    text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, max_width: int
) -> list[str]:
    """Greedy word wrap to `max_width` pixels, at most `_CAPTION_MAX_LINES` lines (then "...")."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if current and font.getlength(candidate) > max_width:
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    if len(lines) > _CAPTION_MAX_LINES:
        lines = [*lines[: _CAPTION_MAX_LINES - 1], lines[_CAPTION_MAX_LINES - 1] + " ..."]
    return [
        line if font.getlength(line) <= max_width else _clip(line, font, max_width)
        for line in lines
    ]


def _clip(line: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, max_width: int) -> str:
    """A single word wider than the image, cut to fit."""
    while len(line) > 1 and font.getlength(line + "...") > max_width:
        line = line[:-1]
    return line + "..."


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


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
