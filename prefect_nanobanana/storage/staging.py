"""Staging: turn users' assets into URLs the Model API can fetch.

The API fetches inputs itself, from publicly reachable URLs, and bills the
submit whatever it then finds. So every source is checked *before* anything is
uploaded (and long before anything is paid): the file exists, is an image by its
bytes, is within the 50 MB limit. Only when all sources pass are local files
uploaded, under content-addressed keys so staging the same photo twice uploads it
once, and handed over as pre-signed GET URLs.

Sources: local files, folders (the images inside, sorted, non-recursive), globs,
``s3://`` objects (HEAD + ranged GET, then a pre-signed URL), ``https://`` URLs
(passed through untouched) and loopback ``http://`` URLs (tests, demo).
Targets for local files: ``s3://bucket/prefix`` or a loopback object store
(:class:`prefect_nanobanana.emulator.LoopbackObjectStore`, the offline stand-in for S3).
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import httpx
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict

from .backends import S3Backend, make_s3_client
from .errors import StagingError, StorageError
from .locations import (
    HttpLocation,
    LocalLocation,
    S3Location,
    join_key,
    parse_location,
    redact_text,
    strip_signature,
)
from .media import SNIFF_BYTES, extension_for, read_image_facts, sniff_image_type

MAX_INPUT_BYTES = 50 * 1024 * 1024
DEFAULT_EXPIRES_IN = 6 * 3600
# The loopback object store's protocol (served by `prefect_nanobanana.emulator.object_store`).
STAGING_TOKEN_ENV = "NANOBANANA_STAGING_TOKEN"
MAX_URL_EXPIRES_IN = 7 * 24 * 3600  # S3's own limit for SigV4 pre-signed URLs
_GLOB_CHARS = frozenset("*?[")
_HASH_CHUNK = 1024 * 1024
_ACCEPTED = "PNG, JPEG, WebP, GIF or HEIC/HEIF"


class StagedAsset(BaseModel):
    """One input ready for the API.

    ``url`` is what the API fetches and may carry a signature; ``repr``/``str``
    show it signature-stripped so logging an asset never leaks a credential.
    ``uploaded`` is True only when this call uploaded the bytes; a local file
    whose content was already in the staging target has a ``key`` but
    ``uploaded=False`` (content addressing at work).
    """

    model_config = ConfigDict(frozen=True)

    source: str
    url: str
    sha256: str | None = None
    content_type: str | None = None
    size_bytes: int | None = None
    key: str | None = None
    uploaded: bool = False

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, strip_signature(value) if name == "url" else value


@dataclass(frozen=True)
class _LocalFile:
    """A local source that passed every check, with what the upload needs."""

    path: Path
    sha256: str
    content_type: str
    size_bytes: int


@dataclass(frozen=True)
class _S3Object:
    location: S3Location
    content_type: str
    size_bytes: int


_Planned = _LocalFile | _S3Object | StagedAsset


class _Target(Protocol):
    """Where local files go: answers signed URLs for content-addressed keys under ``prefix``."""

    prefix: str

    def check(self) -> None:
        """Fail now (bucket missing, token wrong, store down) rather than mid-upload."""
        ...

    def existing_url(self, key: str) -> str | None:
        """A signed GET URL if ``key`` is already stored, else None."""
        ...

    def upload(self, path: Path, key: str, content_type: str) -> str:
        """Upload the file to ``key``; returns a signed GET URL."""
        ...


class _S3Target:
    def __init__(self, backend: S3Backend, prefix: str, expires_in: int) -> None:
        self.backend = backend
        self.prefix = prefix
        self.expires_in = expires_in

    def check(self) -> None:
        self.backend.check()

    def existing_url(self, key: str) -> str | None:
        if self.backend.head(key) is None:
            return None
        return self.backend.presign_get(key, self.expires_in)

    def upload(self, path: Path, key: str, content_type: str) -> str:
        self.backend.put_file(path, key, content_type)
        return self.backend.presign_get(key, self.expires_in)


class _LoopbackTarget:
    """A loopback object store (`prefect_nanobanana.emulator.LoopbackObjectStore`) as target."""

    def __init__(self, base_url: str, prefix: str, token: str, expires_in: int) -> None:
        self.base_url = base_url
        self.prefix = prefix
        self.expires_in = expires_in
        # trust_env=False: proxies from the environment must not see loopback uploads.
        self.http = httpx.Client(
            headers={"Authorization": f"Bearer {token}"}, timeout=60.0, trust_env=False
        )

    def close(self) -> None:
        self.http.close()

    def _url(self, key: str) -> str:
        return f"{self.base_url}/objects/{quote(key)}?expires_in={self.expires_in}"

    def check(self) -> None:
        try:
            response = self.http.get(f"{self.base_url}/")
        except httpx.HTTPError as exc:
            raise StagingError(f"staging store {self.base_url} is not reachable: {exc}") from exc
        if response.status_code == 401:
            raise StagingError(
                f"staging store {self.base_url} refused the upload token "
                f"(set {STAGING_TOKEN_ENV} or pass upload_token)"
            )
        if response.status_code != 200:
            raise StagingError(
                f"staging store {self.base_url} answered HTTP {response.status_code}"
            )

    def existing_url(self, key: str) -> str | None:
        response = self.http.head(self._url(key))
        if response.status_code == 404:
            return None
        self._raise_for(response, key)
        return response.headers["X-Signed-Url"]

    def upload(self, path: Path, key: str, content_type: str) -> str:
        with path.open("rb") as body:
            response = self.http.put(
                self._url(key),
                content=body,
                headers={
                    "Content-Type": content_type,
                    "Content-Length": str(path.stat().st_size),
                },
            )
        self._raise_for(response, key)
        return response.json()["url"]

    def _raise_for(self, response: httpx.Response, key: str) -> None:
        if response.is_success:
            return
        raise StagingError(
            f"staging store {self.base_url} answered HTTP {response.status_code} for {key}"
        )


def stage_assets(
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    staging_uri: str | None = None,
    *,
    s3_client: Any = None,
    expires_in: int = DEFAULT_EXPIRES_IN,
    upload_token: str | None = None,
) -> list[StagedAsset]:
    """Validate every source, then upload local files and return one fetchable URL per image.

    Folders and globs expand in place (sorted). ``staging_uri`` is ``s3://bucket/prefix``
    or the base URL of a loopback object store (its token from ``upload_token`` or
    ``NANOBANANA_STAGING_TOKEN``); it is needed only when there are local files.
    Raises :class:`StagingError` before any upload if any source is unusable.
    """
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    if not sources:
        raise StagingError("no sources given")
    if not 1 <= expires_in <= MAX_URL_EXPIRES_IN:
        raise StagingError(f"expires_in must be between 1 and {MAX_URL_EXPIRES_IN} seconds")

    clients = _S3Clients(s3_client)
    planned = [item for source in sources for item in _plan_source(source, clients)]
    target = None
    if any(isinstance(item, _LocalFile) for item in planned):
        target = _open_target(staging_uri, clients, expires_in, upload_token)
    try:
        if target is not None:
            target.check()
        return _execute(planned, target, clients, expires_in)
    except StagingError:
        raise
    except StorageError as exc:  # e.g. the bucket is missing: its message says so
        raise StagingError(str(exc)) from exc
    except (BotoCoreError, httpx.HTTPError) as exc:
        raise StagingError(f"staging failed: {redact_text(str(exc))}") from exc
    finally:
        if isinstance(target, _LoopbackTarget):
            target.close()


class _S3Clients:
    """One S3 client for the whole call, created only if some source or target needs it."""

    def __init__(self, s3_client: Any) -> None:
        self._client = s3_client

    def backend(self, bucket: str) -> S3Backend:
        if self._client is None:
            self._client = make_s3_client()
        return S3Backend(self._client, bucket)


def _execute(
    planned: list[_Planned], target: _Target | None, clients: _S3Clients, expires_in: int
) -> list[StagedAsset]:
    """Phase two: uploads and signatures. Everything here has already been validated."""
    staged: list[StagedAsset] = []
    urls: dict[str, str] = {}  # key -> signed URL, for duplicates within this call
    for item in planned:
        if isinstance(item, StagedAsset):
            staged.append(item)
        elif isinstance(item, _S3Object):
            backend = clients.backend(item.location.bucket)
            staged.append(
                StagedAsset(
                    source=str(item.location),
                    url=backend.presign_get(item.location.key, expires_in),
                    content_type=item.content_type,
                    size_bytes=item.size_bytes,
                )
            )
        else:
            assert target is not None  # guaranteed by stage_assets
            key = join_key(target.prefix, f"{item.sha256}{extension_for(item.content_type)}")
            uploaded = False
            url = urls.get(key) or target.existing_url(key)
            if url is None:
                url = target.upload(item.path, key, item.content_type)
                uploaded = True
            urls[key] = url
            staged.append(
                StagedAsset(
                    source=str(item.path),
                    url=url,
                    sha256=item.sha256,
                    content_type=item.content_type,
                    size_bytes=item.size_bytes,
                    key=key,
                    uploaded=uploaded,
                )
            )
    return staged


def _open_target(
    staging_uri: str | None, clients: _S3Clients, expires_in: int, upload_token: str | None
) -> _Target:
    if not staging_uri:
        raise StagingError(
            "local files need a staging_uri (s3://bucket/prefix or a loopback store URL) "
            "to be uploaded to, so the API can fetch them"
        )
    location = _parse(staging_uri)
    if isinstance(location, S3Location):
        return _S3Target(clients.backend(location.bucket), location.key, expires_in)
    if isinstance(location, HttpLocation):
        token = upload_token or os.environ.get(STAGING_TOKEN_ENV)
        if not token:
            raise StagingError(
                f"staging store {location} needs an upload token: "
                f"set {STAGING_TOKEN_ENV} or pass upload_token"
            )
        parts = urlsplit(location.url)
        base_url = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        return _LoopbackTarget(base_url, parts.path.strip("/"), token, expires_in)
    raise StagingError(
        f"staging_uri {staging_uri!r} is a local folder; the API cannot fetch from it — "
        "use s3://bucket/prefix or a loopback store URL"
    )


def _parse(value: str | os.PathLike[str]) -> LocalLocation | S3Location | HttpLocation:
    try:
        return parse_location(value)
    except StorageError as exc:
        raise StagingError(str(exc)) from exc


def _plan_source(source: str | os.PathLike[str], clients: _S3Clients) -> list[_Planned]:
    """Phase one for one source: expand and validate it; no writes anywhere."""
    location = _parse(source)
    if isinstance(location, HttpLocation):
        # The API fetches https URLs itself; fetching them here would only cost time.
        return [StagedAsset(source=str(location), url=location.url)]
    if isinstance(location, S3Location):
        return [_inspect_s3(location, clients)]
    return [_inspect_local(path) for path in _expand_local(location)]


def _expand_local(location: LocalLocation) -> list[Path]:
    path = location.path
    if path.is_dir():
        images = [
            entry
            for entry in sorted(path.iterdir())
            if entry.is_file() and not entry.name.startswith(".") and _looks_like_image(entry)
        ]
        if not images:
            raise StagingError(f"{path}: folder contains no images ({_ACCEPTED})")
        return images
    if not path.exists() and _GLOB_CHARS & set(str(path)):
        matches = [Path(match) for match in sorted(glob.glob(str(path))) if Path(match).is_file()]
        if not matches:
            raise StagingError(f"{path}: no files match this pattern")
        return matches
    return [path]


def _looks_like_image(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return sniff_image_type(handle.read(SNIFF_BYTES)) is not None
    except OSError:
        return False


def _inspect_local(path: Path) -> _LocalFile:
    """Check one local file against every rule; hash it while we read it anyway."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise StagingError(f"{path}: file not found") from None
    except OSError as exc:
        raise StagingError(f"{path}: cannot read file: {exc.strerror}") from exc
    if not path.is_file():
        raise StagingError(f"{path}: not a regular file")
    _check_size(str(path), stat.st_size)
    hasher = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            head = handle.read(SNIFF_BYTES)
            content_type = sniff_image_type(head)
            if content_type is None:
                raise StagingError(_not_an_image(str(path)))
            hasher.update(head)
            while chunk := handle.read(_HASH_CHUNK):
                hasher.update(chunk)
    except OSError as exc:
        raise StagingError(f"{path}: cannot read file: {exc.strerror}") from exc
    read_image_facts(path, str(path))  # the header's pixel count: no pixel bombs
    return _LocalFile(path, hasher.hexdigest(), content_type, stat.st_size)


def _inspect_s3(location: S3Location, clients: _S3Clients) -> _S3Object:
    """Check an S3 source by HEAD and a ranged GET of its first bytes; nothing downloaded."""
    if not location.key:
        raise StagingError(f"{location}: names a bucket, not an object")
    backend = clients.backend(location.bucket)
    try:
        head = backend.head(location.key)
    except (BotoCoreError, StorageError) as exc:
        raise StagingError(f"{location}: cannot be read: {exc}") from exc
    if head is None:
        raise StagingError(f"{location}: object does not exist or is not accessible")
    size = int(head.get("ContentLength", 0))
    _check_size(str(location), size)
    try:
        content_type = sniff_image_type(backend.read_range(location.key, SNIFF_BYTES))
    except (ClientError, BotoCoreError) as exc:
        raise StagingError(f"{location}: cannot be read: {exc}") from exc
    if content_type is None:
        raise StagingError(_not_an_image(str(location)))
    return _S3Object(location, content_type, size)


def _check_size(name: str, size: int) -> None:
    if size == 0:
        raise StagingError(f"{name}: file is empty")
    if size > MAX_INPUT_BYTES:
        raise StagingError(
            f"{name}: {size} bytes exceeds the input limit of {MAX_INPUT_BYTES} bytes (50 MB)"
        )


def _not_an_image(name: str) -> str:
    return f"{name}: not an image (expected {_ACCEPTED}, judged by the file's bytes)"
