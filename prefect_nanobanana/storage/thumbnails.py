"""What a person needs to see an archived image: a thumbnail, a link, a stable URI.

Prefect's UI renders markdown artifacts in a browser that has no AWS credentials
and no access to the worker's disk, so a preview must travel inside the artifact:
a small JPEG as a `data:` URI, a few kilobytes, whatever the original's size.
Links name where the full image lives: an S3 object's console page (which asks
the person to sign in to AWS, not us to sign the URL) or a local file's absolute
path. Nothing here signs a URL or reads one that carries a signature.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

from .backends import S3Backend, open_object
from .errors import StorageError
from .locations import HttpLocation, LocalLocation, S3Location, parse_location

# Longest side of a thumbnail, in pixels, and its JPEG quality: ~2-6 kB each.
THUMBNAIL_SIDE = 128
THUMBNAIL_QUALITY = 60
# An image larger than this is not read whole for a thumbnail (S3 objects are read into memory).
MAX_PREVIEW_SOURCE_BYTES = 64 * 1024 * 1024


def thumbnail_data_uri(
    location: str | os.PathLike[str], s3_client: Any = None, side: int = THUMBNAIL_SIDE
) -> str | None:
    """A JPEG thumbnail of the image at a local path or `s3://` location, as a data URI.

    None when there is nothing to show safely: an `http(s)://` source (we do not
    fetch what may be a signed URL for a picture), a missing or unreadable file,
    or one too large to read for a preview. A preview never fails a run.
    """
    try:
        parsed = parse_location(str(location))
        if isinstance(parsed, HttpLocation):
            return None
        if isinstance(parsed, LocalLocation):
            path = parsed.path.absolute()
            if not path.is_file() or path.stat().st_size > MAX_PREVIEW_SOURCE_BYTES:
                return None
            with Image.open(path) as image:
                return _thumbnail(image, side)
        backend, key = open_object(str(location), s3_client)
        assert isinstance(backend, S3Backend)
        head = backend.head(key)
        if head is None or head.get("ContentLength", 0) > MAX_PREVIEW_SOURCE_BYTES:
            return None
        data = backend.read_bytes(key)
        if data is None:
            return None
        with Image.open(io.BytesIO(data)) as image:
            return _thumbnail(image, side)
    except (OSError, ValueError, StorageError, Image.DecompressionBombError):
        return None


def _thumbnail(image: Image.Image, side: int) -> str:
    image.draft("RGB", (side, side))  # JPEG: decode at a reduced scale, not in full
    image.thumbnail((side, side))
    rgb = image.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def location_link(location: str) -> str | None:
    """A link a browser can open for an archived object: the S3 console page of an
    `s3://` object, None for a local file (its absolute path is what to show)."""
    parsed = parse_location(location)
    if isinstance(parsed, S3Location) and parsed.key:
        return (
            f"https://s3.console.aws.amazon.com/s3/object/{parsed.bucket}"
            f"?prefix={quote(parsed.key, safe='')}"
        )
    return None


def location_uri(location: str) -> str:
    """The location as a URI: `s3://bucket/key` as it is, a local file as `file:///abs/path`."""
    parsed = parse_location(location)
    if isinstance(parsed, LocalLocation):
        return Path(parsed.path).absolute().as_uri()
    return location
