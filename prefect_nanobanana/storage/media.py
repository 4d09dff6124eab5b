"""Image types by magic bytes: what a file *is*, never what its name claims.

Files named ``.jpg`` are regularly PNGs (and worse); the API rejects what it
cannot decode only after the request has been billed, so the type is decided
from the first bytes before anything is uploaded.
"""

from __future__ import annotations

import mimetypes
import os
import warnings

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


def image_pixel_count(path: os.PathLike[str] | str) -> int | None:
    """Width times height from the image's header (no pixels decoded); None when Pillow cannot
    read the format (HEIC without a plugin), so the caller decides without guessing.

    An image so large that Pillow refuses to open it (a decompression bomb, over
    twice `Image.MAX_IMAGE_PIXELS`) counts as that many pixels plus one: at least.
    """
    from PIL import Image, UnidentifiedImageError  # imported here: most callers never need it

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we judge it
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        return 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    return width * height


def format_mib(size_bytes: int) -> str:
    """A byte count for people: "4.2 MiB" (or bytes when small)."""
    if size_bytes < 100 * 1024:
        return f"{size_bytes} bytes"
    return f"{size_bytes / MIB:.1f} MiB"
