"""A location as a batch: the images under a folder, a glob or an S3 prefix, one by one.

A data team's batch is often "every photo that landed in ``s3://shop/incoming/``",
not a manifest. :func:`list_images` walks such a location and yields each image
with the three facts a batch row needs:

- ``id``: its path relative to the location (``2026/12/shoe.png``), so a rerun over
  the same location finds the same row;
- ``location``: where to read it (an absolute path, or ``s3://bucket/key``);
- ``content``: an identity of its bytes, so an image replaced under the same name
  is a new edit, not one the ledger already holds.

Content identity: on S3 the object's ETag, which ListObjectsV2 returns with every
key, so a prefix of 5,000 objects costs five list requests and no HEAD or GET. A
re-upload of the same bytes keeps its ETag, except when a multipart upload splits
them differently (then the image is paid once more, never skipped wrongly). On a
local folder the sha256 of the bytes: size and mtime would be free, but a copy,
``touch``, checkout or restore changes the mtime of identical bytes (a new paid
edit for nothing), and a same-size replacement within the clock's resolution, or
with its mtime preserved (``cp -p``, ``rsync -t``), would be skipped as done. One
read per local image is what staging spends on it anyway.

The listing streams: S3 pages of up to 1,000 keys (ListObjectsV2), and folders one
directory at a time, in the same order on both (by the id, as S3 sorts keys), so
a batch can start on its first rows while later pages are still being listed.

Which objects count as images: names ending in an image extension (``.png``,
``.jpg``, ``.jpeg``, ``.webp``, ``.gif``, ``.heic``, ``.heif``, any case), unless
``include`` patterns are given, which then decide alone; ``exclude`` patterns
remove what they match. Hidden names (a path segment starting with ``.``, such as
macOS's ``._photo.jpg``) and S3 folder markers (keys ending in ``/``) are never
listed. Whether a listed object really is an image is judged by its bytes when its
row is checked, before anything is paid.

Patterns are globs: ``*`` and ``?`` stay within one path segment, ``**`` spans
segments, ``[abc]`` is a class. A pattern without ``/`` is matched against the
file's name (``*.png`` matches ``a/b/x.png``), one with ``/`` against the whole id.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from .backends import _error_code, is_missing, make_s3_client
from .errors import LocationError
from .locations import HttpLocation, LocalLocation, S3Location, join_key, parse_location

__all__ = ["IMAGE_EXTENSIONS", "ListedImage", "list_images", "matches_pattern"]

# What a folder or prefix holds that counts as an image, when no `include` is given.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".heic", ".heif")
# ListObjectsV2's largest page, and its default.
S3_PAGE_SIZE = 1000
_GLOB_CHARS = frozenset("*?[")
_HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ListedImage:
    """One image found under a location.

    Attributes:
        id: Its path relative to the location, with ``/`` separators.
        location: Where to read it: an absolute local path or ``s3://bucket/key``.
        content: An identity of its bytes: ``etag:<ETag>`` on S3, ``sha256:<hex>`` locally.
        size: Its size in bytes.
    """

    id: str
    location: str
    content: str
    size: int


def list_images(
    images_uri: str | os.PathLike[str],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    s3_client: Any = None,
    page_size: int = S3_PAGE_SIZE,
) -> Iterator[ListedImage]:
    """Yield the images under a folder, a glob or an ``s3://bucket/prefix``, sorted by id.

    Lazy: S3 is listed a page at a time and folders a directory at a time, so the
    first images come before the location has been listed to its end. A malformed
    location or pattern fails at the call; a missing folder or an unreadable bucket
    at the first ``next``.

    Args:
        images_uri: A local folder, a local file, a glob (``/data/in/*.jpg``,
            ``/data/**/*.png``), ``s3://bucket/prefix``, ``s3://bucket/prefix/*.png``
            or one ``s3://bucket/key``. An ``s3-bucket://BLOCK/`` location is resolved
            by the Prefect layer (``tasks.storage.resolve_location``) before it gets here.
        include: Glob patterns an image must match (any of them); None: the image
            extensions of `IMAGE_EXTENSIONS`, in any case.
        exclude: Glob patterns that remove an image (any of them).
        s3_client: A boto3 S3 client; None builds one from boto3's default chain.
        page_size: Keys per ListObjectsV2 request (at most 1,000).

    Returns:
        An iterator of `ListedImage`, sorted by id (the order S3 lists keys in).

    Raises:
        LocationError: The location is an http(s) URL, a local path that does not
            exist, or a bucket that cannot be listed; or a pattern is empty.

    Example:
        >>> for image in list_images("s3://shop/incoming", exclude=["thumbs/**"]):
        ...     print(image.id, image.content)  # doctest: +SKIP
    """
    location = parse_location(images_uri)
    if isinstance(location, HttpLocation):
        raise LocationError(
            f"expected a folder, a glob or s3://bucket/prefix to list, got the URL {location}"
        )
    includes = _compile_all(include)
    excludes = _compile_all(exclude)

    def wanted(image_id: str) -> bool:
        if any(part.startswith(".") for part in image_id.split("/")):
            return False
        if includes is None:
            chosen = image_id.lower().endswith(IMAGE_EXTENSIONS)
        else:
            chosen = any(matches_pattern(image_id, pattern) for pattern in includes)
        return chosen and not any(matches_pattern(image_id, pattern) for pattern in excludes or ())

    if isinstance(location, LocalLocation):
        return _list_local(location.path, wanted)
    return _list_s3(location, wanted, s3_client, page_size)


def matches_pattern(image_id: str, pattern: str) -> bool:
    """Whether ``image_id`` (a ``/``-separated relative path) matches a listing glob.

    Args:
        image_id: A path relative to the listed location.
        pattern: A glob; without ``/`` it is matched against the last segment only.

    Returns:
        True when it matches.
    """
    if "/" not in pattern.strip("/"):
        return _glob_regex(pattern.strip("/")).match(image_id.rsplit("/", 1)[-1]) is not None
    return _glob_regex(pattern.strip("/")).match(image_id) is not None


def _compile_all(patterns: Sequence[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]  # one pattern given as a string: not its characters
    cleaned = [pattern.strip() for pattern in patterns]
    if any(not pattern.strip("/") for pattern in cleaned):
        raise LocationError("an include/exclude pattern is empty")
    for pattern in cleaned:
        _glob_regex(pattern.strip("/"))  # a malformed pattern fails here, before any listing
    return cleaned


def _split_glob(path: str) -> tuple[str, str | None]:
    """``root/of/it/*.png`` as the root (no glob characters) and the pattern under it."""
    parts = path.split("/")
    for index, part in enumerate(parts):
        if _GLOB_CHARS & set(part):
            return "/".join(parts[:index]), "/".join(parts[index:])
    return path, None


@lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as a regex over ``/``-separated paths (``glob.translate`` is Python 3.13+)."""
    segments = pattern.split("/")
    out = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
        else:
            out.append(_segment_regex(segment) + ("" if last else "/"))
    return re.compile("".join(out) + r"\Z")


def _segment_regex(segment: str) -> str:
    out, index = [], 0
    while index < len(segment):
        char = segment[index]
        index += 1
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            # A "]" first in the class (after an optional "!") is one of its characters.
            start = index + 1 if segment[index : index + 1] in ("!", "]") else index
            end = segment.find("]", start)
            if end == -1:
                out.append(re.escape(char))
                continue
            body = segment[index:end]
            index = end + 1
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
        else:
            out.append(re.escape(char))
    return "".join(out)


def _list_local(path: Path, wanted: Any) -> Iterator[ListedImage]:
    root_text, pattern = _split_glob(path.as_posix())
    root = Path(root_text or ("/" if path.is_absolute() else ".")).absolute()
    if pattern is None and root.is_file():
        if wanted(root.name):
            yield _local_image(root.name, root)
        return
    if not root.is_dir():
        raise LocationError(f"{root}: no such folder to list")
    depth = None if pattern is None or "**" in pattern.split("/") else pattern.count("/") + 1
    regex = _glob_regex(pattern) if pattern is not None else None
    for image_id, file in _walk_sorted(root, "", depth):
        if (regex is None or regex.match(image_id)) and wanted(image_id):
            yield _local_image(image_id, file)


def _walk_sorted(folder: Path, prefix: str, depth: int | None) -> Iterator[tuple[str, Path]]:
    """Files under ``folder`` as (id, path), in S3's order: by id, a folder as ``name/``."""
    try:
        with os.scandir(folder) as scan:
            entries = list(scan)
    except OSError as exc:
        raise LocationError(f"{folder}: cannot list: {exc.strerror}") from exc
    keyed = []
    for entry in entries:
        if entry.name.startswith("."):
            continue  # hidden: never listed, nor walked into
        # A linked folder is not walked: a link to a parent would never end.
        if entry.is_dir(follow_symlinks=False):
            keyed.append((entry.name + "/", entry, True))
        elif entry.is_file():
            keyed.append((entry.name, entry, False))
    for name, entry, is_dir in sorted(keyed, key=lambda item: item[0]):
        if is_dir:
            if depth is None or depth > 1:
                deeper = None if depth is None else depth - 1
                yield from _walk_sorted(Path(entry.path), prefix + name, deeper)
        else:
            yield prefix + name, Path(entry.path)


def _local_image(image_id: str, path: Path) -> ListedImage:
    hasher = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise LocationError(f"{path}: cannot read file: {exc.strerror}") from exc
    return ListedImage(image_id, str(path), f"sha256:{hasher.hexdigest()}", size)


def _list_s3(
    location: S3Location, wanted: Any, s3_client: Any, page_size: int
) -> Iterator[ListedImage]:
    s3 = s3_client or make_s3_client()
    root, pattern = _split_glob(location.key)
    root = root.strip("/")
    regex = _glob_regex(pattern) if pattern is not None else None
    # Only keys that can match are listed: the pattern's literal start narrows the prefix.
    literal = re.split(r"[*?\[]", pattern, maxsplit=1)[0] if pattern is not None else ""
    prefix = f"{root}/" if root else ""
    shown = f"s3://{location.bucket}/{prefix}"
    paginator = s3.get_paginator("list_objects_v2")
    pages = paginator.paginate(
        Bucket=location.bucket,
        Prefix=prefix + literal,
        PaginationConfig={"PageSize": max(1, min(page_size, S3_PAGE_SIZE))},
    )
    found = False
    try:
        for page in pages:
            for item in page.get("Contents", []):
                key = item["Key"]
                image_id = key[len(prefix) :]
                if not image_id or key.endswith("/"):
                    continue  # the prefix itself, or a console-made "folder" marker
                found = True
                if (regex is None or regex.match(image_id)) and wanted(image_id):
                    etag = str(item.get("ETag", "")).strip('"')
                    yield ListedImage(
                        image_id,
                        f"s3://{location.bucket}/{key}",
                        f"etag:{etag}",
                        int(item.get("Size", 0)),
                    )
    except ClientError as exc:
        raise LocationError(f"cannot list {shown}: {_error_code(exc)}") from exc
    except BotoCoreError as exc:
        raise LocationError(f"cannot list {shown}: {exc}") from exc
    if not found and root and pattern is None:
        # Nothing under `root/`: `root` may name one object (asked only then: one round trip).
        yield from _one_s3_object(s3, location.bucket, root, wanted)


def _one_s3_object(s3: Any, bucket: str, key: str, wanted: Any) -> Iterator[ListedImage]:
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_missing(exc):
            return
        raise LocationError(f"cannot read s3://{bucket}/{key}: {_error_code(exc)}") from exc
    name = key.rsplit("/", 1)[-1]
    if wanted(name):
        etag = str(head.get("ETag", "")).strip('"')
        yield ListedImage(
            name, f"s3://{bucket}/{join_key(key)}", f"etag:{etag}", int(head["ContentLength"])
        )
