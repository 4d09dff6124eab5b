"""Image types by magic bytes: what a file *is*, never what its name claims.

Files named ``.jpg`` are regularly PNGs (and worse); the API rejects what it
cannot decode only after the request has been billed, so the type is decided
from the first bytes before anything is uploaded.
"""

from __future__ import annotations

import mimetypes

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
