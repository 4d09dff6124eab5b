"""Image checks before anything is paid: what a file *is*, how big it is, how many pixels.

Files named ``.jpg`` are regularly PNGs (and worse); the API rejects what it
cannot decode only after the request has been billed, so the type is decided
from the first bytes before anything is uploaded. The provider's caps (pixels,
inline bytes, URL bytes) are checked here too, from headers only: staging (URL
inputs) and inline data-URI sending both call these functions.
"""

from __future__ import annotations

import io
import mimetypes
import os
import warnings
from dataclasses import dataclass
from typing import IO

from PIL import Image

from .errors import StagingError

# Enough bytes for every signature below (the longest is the ISO-BMFF brand at 8..12).
SNIFF_BYTES = 32

# HEIF family brands (ISO/IEC 23008-12): HEVC-coded ones are HEIC, the generic ones HEIF.
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"})
_HEIF_BRANDS = frozenset({b"mif1", b"msf1", b"heif"})

_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/heic": ".heic",
    "image/heif": ".heif",
    "image/avif": ".avif",
    "image/bmp": ".bmp",
    "image/tiff": ".tiff",
}


def sniff_image_type(head: bytes) -> str | None:
    """The image content type the leading bytes announce, or None when they are no image we accept.

    Accepted: PNG, JPEG, WebP, GIF, HEIC/HEIF — the formats the API documents or
    phones produce.
    """
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIC_BRANDS:
            return "image/heic"
        if brand in _HEIF_BRANDS:
            return "image/heif"
    return None


def extension_for(content_type: str) -> str:
    """The file extension (with dot) archives and staged keys use for a content type."""
    base = content_type.split(";", 1)[0].strip().lower()
    return _EXTENSIONS.get(base) or mimetypes.guess_extension(base) or ".bin"


# -- inline (data: URI) inputs: the caps the provider's own clients apply -----------------
# Observed in the provider's ComfyUI nodes (see the API notes): an input image may be sent
# inline as a data: URI of at most 6 MiB (the URI as sent, base64 included), at most
# 32 megapixels, and a whole request body of at most 64 MiB.
MIB = 1024 * 1024
INLINE_MAX_ENCODED_BYTES = 6 * MIB
INLINE_MAX_REQUEST_BYTES = 64 * MIB
MAX_INPUT_PIXELS = 32_000_000


def data_uri_length(size_bytes: int, content_type: str) -> int:
    """How long the data: URI of a file of `size_bytes` is (`data:<type>;base64,` + base64)."""
    return len(f"data:{content_type};base64,") + 4 * ((size_bytes + 2) // 3)


def format_mib(size_bytes: int) -> str:
    """A byte count for people: "4.2 MiB" (or bytes when small)."""
    if size_bytes < 100 * 1024:
        return f"{size_bytes} bytes"
    return f"{size_bytes / MIB:.1f} MiB"


# The documented cap for an image behind a URL (see ../shared/runcomfy-model-api.md);
# the pixel and inline caps are above.
MAX_INLINE_BYTES = INLINE_MAX_ENCODED_BYTES
MAX_URL_INPUT_BYTES = 50 * 1024 * 1024


@dataclass(frozen=True)
class ImageFacts:
    """What an image's header says, read without decoding a single pixel.

    ``width`` and ``height`` are None only for a HEIC/HEIF whose first
    :data:`HEADER_BYTES` declare no size (Pillow reads none without a plugin; see
    :func:`heif_size`): its pixel count is then not checked here.
    """

    content_type: str
    width: int | None
    height: int | None

    @property
    def pixels(self) -> int | None:
        if self.width is None or self.height is None:
            return None
        return self.width * self.height


_UNREADABLE_BY_PILLOW = frozenset({"image/heic", "image/heif"})


def read_image_facts(source: str | os.PathLike[str] | IO[bytes], name: str) -> ImageFacts:
    """Type (by magic bytes) and pixel size (Pillow's lazy open); refuses a pixel bomb.

    A 30000x30000 PNG is 109 KB on disk and 2.7 GB decoded: the byte caps cannot
    see it, the header can. Raises :class:`StagingError` (named by ``name``) when
    the bytes are no image we accept, the header cannot be read, or the image has
    more than :data:`MAX_INPUT_PIXELS` pixels — all before anything is uploaded or
    paid. A file object is read from its current position and left there.
    """
    if isinstance(source, str | os.PathLike):
        try:
            with open(source, "rb") as handle:
                return read_image_facts(handle, name)
        except OSError as exc:
            raise StagingError(f"{name}: cannot read file: {exc.strerror}") from None
    start = source.tell()
    content_type = sniff_image_type(source.read(SNIFF_BYTES))
    source.seek(start)
    if content_type is None:
        raise StagingError(f"{name}: not an image (judged by its bytes)")
    try:
        width, height = _header_size(source, name)
    except StagingError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        if content_type not in _UNREADABLE_BY_PILLOW:
            raise UnreadableHeaderError(f"{name}: cannot read the image header ({exc})") from None
        source.seek(start)
        width, height = heif_size(source.read(HEADER_BYTES)) or (None, None)
    finally:
        source.seek(start)
    facts = ImageFacts(content_type, width, height)
    check_pixels(name, facts)
    return facts


# How much of a remote image a ranged read takes to find its header: a PNG's or
# WebP's size is in its first 30 bytes, a JPEG's after its EXIF and ICC segments.
HEADER_BYTES = 64 * 1024


class UnreadableHeaderError(StagingError):
    """The bytes announce an image whose header cannot be read (from them)."""


def header_facts(head: bytes, name: str) -> ImageFacts | None:
    """`read_image_facts` of an image of which only its first bytes were read (a ranged
    GET of an S3 object); None when its header lies past them or Pillow cannot read it.

    It refuses a pixel bomb (a HEIC's too) as the local check does; an unreadable
    header is not held against the image here: it may only be cut short, and the API
    reads all of it.
    """
    try:
        return read_image_facts(io.BytesIO(head), name)
    except UnreadableHeaderError:
        return None


def heif_size(head: bytes) -> tuple[int, int] | None:
    """The largest image size a HEIC/HEIF file declares (its ``ispe`` properties), from its
    first bytes; None when they hold none.

    Pillow reads no HEIF without a plugin, and a phone's HEIC declares its size in
    ``meta`` → ``iprp`` → ``ipco`` → ``ispe`` boxes, near the start. The largest is the
    primary image (a grid of tiles is larger than any tile, a thumbnail smaller): the
    one the cap is about.
    """
    sizes: list[tuple[int, int]] = []

    def walk(start: int, end: int, path: tuple[bytes, ...]) -> None:
        offset = start
        while offset + 8 <= end:
            size = int.from_bytes(head[offset : offset + 4], "big")
            kind = head[offset + 4 : offset + 8]
            header = 8
            if size == 1 and offset + 16 <= end:
                size, header = int.from_bytes(head[offset + 8 : offset + 16], "big"), 16
            elif size == 0:
                size = end - offset
            if size < header:
                return
            body, box_end = offset + header, min(offset + size, end)
            if kind == b"meta" and not path:
                walk(body + 4, box_end, (kind,))  # a full box: version and flags first
            elif kind in (b"iprp", b"ipco") and path and path[-1] in (b"meta", b"iprp"):
                walk(body, box_end, (*path, kind))
            elif kind == b"ispe" and path[-1:] == (b"ipco",) and body + 12 <= box_end:
                width = int.from_bytes(head[body + 4 : body + 8], "big")
                height = int.from_bytes(head[body + 8 : body + 12], "big")
                sizes.append((width, height))
            offset += size

    walk(0, len(head), ())
    return max(sizes, key=lambda size: size[0] * size[1], default=None)


def _header_size(source: IO[bytes], name: str) -> tuple[int, int]:
    """The size Pillow's lazy open reads from the header, no pixel decoded."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past twice its own limit raises) on huge images; our
            # lower cap decides, and says so in words.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source).size
    except Image.DecompressionBombError:
        raise StagingError(
            f"{name}: image has far more than {MAX_INPUT_PIXELS:,} pixels "
            f"(the API's limit is {MAX_INPUT_PIXELS // 1_000_000} megapixels)"
        ) from None


def check_pixels(name: str, facts: ImageFacts) -> None:
    """Refuse an image over the API's 32-megapixel cap."""
    if facts.pixels is not None and facts.pixels > MAX_INPUT_PIXELS:
        raise StagingError(
            f"{name}: {facts.width}x{facts.height} is {facts.pixels:,} pixels, over the "
            f"API's limit of {MAX_INPUT_PIXELS // 1_000_000} megapixels ({MAX_INPUT_PIXELS:,})"
        )


def check_inline_size(name: str, raw_bytes: int, content_type: str) -> None:
    """Refuse an image whose data URI would pass the API's 6 MiB inline cap."""
    encoded = data_uri_length(raw_bytes, content_type)
    if encoded > MAX_INLINE_BYTES:
        raise StagingError(
            f"{name}: {raw_bytes:,} bytes become a {encoded:,}-byte data URI, over the "
            f"API's inline limit of {MAX_INLINE_BYTES:,} bytes (6 MiB); stage it to a URL instead"
        )


def check_url_input_size(name: str, size: int) -> None:
    """Refuse an empty image, or one over the 50 MB the API documents for URL inputs."""
    if size == 0:
        raise StagingError(f"{name}: file is empty")
    if size > MAX_URL_INPUT_BYTES:
        raise StagingError(
            f"{name}: {size} bytes exceeds the input limit of {MAX_URL_INPUT_BYTES} bytes (50 MB)"
        )
