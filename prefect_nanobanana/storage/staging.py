"""Staging: turn users' assets into URLs the Model API can fetch.

The API fetches inputs itself, from publicly reachable URLs, and bills the
submit whatever it then finds. So every source is checked *before* anything is
uploaded (and long before anything is paid): the file exists, is an image by its
bytes, is within the 50 MB limit. Only when all sources pass are local files
uploaded, under content-addressed keys so staging the same photo twice uploads it
once, and handed over as pre-signed GET URLs.

Without a staging location, local files go **inline**: each becomes a ``data:``
URI in ``image_urls``, as the provider's own clients send them, within their
caps (6 MiB per encoded image, 32 megapixels, 64 MiB a request; see
:mod:`.media`). A file over a cap needs a staging location, and the error says
so with the sizes, before anything is paid. :func:`check_sources` runs the same
checks without uploading or encoding anything, and probes http(s) inputs with a
cheap request, for a batch's pre-flight.

Sources: local files, folders (the images inside, sorted, non-recursive), globs,
``s3://`` objects (HEAD + a ranged GET of the header, size and pixels checked, then a
pre-signed URL), ``https://`` URLs
and loopback ``http://`` URLs (tests, demo), passed on as given after a ranged GET of
their header checks the pixel cap.
Targets for local files: ``s3://bucket/prefix`` or a loopback object store
(:class:`prefect_nanobanana.emulator.LoopbackObjectStore`, the offline stand-in for S3).
"""

from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import os
import time
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
    is_loopback_host,
    join_key,
    parse_location,
    redact_text,
    strip_signature,
)
from .media import (
    HEADER_BYTES,
    INLINE_MAX_ENCODED_BYTES,
    INLINE_MAX_REQUEST_BYTES,
    MAX_URL_INPUT_BYTES,
    SNIFF_BYTES,
    check_url_input_size,
    data_uri_length,
    extension_for,
    format_mib,
    header_facts,
    read_image_facts,
    sniff_image_type,
)

MAX_INPUT_BYTES = MAX_URL_INPUT_BYTES  # the documented cap of an input image
DEFAULT_EXPIRES_IN = 6 * 3600
# The loopback object store's protocol (served by `prefect_nanobanana.emulator.object_store`).
STAGING_TOKEN_ENV = "NANOBANANA_STAGING_TOKEN"
MAX_URL_EXPIRES_IN = 7 * 24 * 3600  # S3's own limit for SigV4 pre-signed URLs
_GLOB_CHARS = frozenset("*?[")
_HASH_CHUNK = 1024 * 1024
# Up to this size a staged file goes to S3 as one conditional PUT (it exists already, or
# is created now): asking first would cost a round trip of its own. Larger files are
# asked about first, so a rerun does not upload them again.
_PUT_WITHOUT_ASKING_BYTES = 1024 * 1024
_ACCEPTED = "PNG, JPEG, WebP, GIF or HEIC/HEIF"
# Room left in a request body for everything but the inline images (prompt, options, JSON).
_REQUEST_RESERVE_BYTES = 256 * 1024
DEFAULT_PROBE_TIMEOUT = 5.0
_STAGING_HINT = (
    "give a staging location (staging_uri, or --staging on the command line: "
    "s3://bucket/prefix or a loopback store URL) so it is uploaded and sent as a URL"
)


class StagedAsset(BaseModel):
    """One input ready for the API.

    ``url`` is what the API fetches and may carry a signature; ``repr``/``str``
    show it signature-stripped so logging an asset never leaks a credential.
    ``uploaded`` is True only when this call uploaded the bytes; a local file
    whose content was already in the staging target has a ``key`` but
    ``uploaded=False`` (content addressing at work). ``inline`` is True when
    ``url`` is the file itself as a ``data:`` URI (no staging location given):
    megabytes long, so log and store :attr:`provenance`, never ``url``.
    """

    model_config = ConfigDict(frozen=True)

    source: str
    url: str
    sha256: str | None = None
    content_type: str | None = None
    size_bytes: int | None = None
    key: str | None = None
    uploaded: bool = False
    inline: bool = False

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, strip_signature(value) if name == "url" else value

    @property
    def passed_through(self) -> bool:
        """A URL the user gave, handed to the API as it is (not uploaded, signed or inlined):
        the API fetches it only after the submit is billed, so it is worth a probe first."""
        return self.key is None and not self.inline and self.source.startswith("http")

    @property
    def provenance(self) -> str:
        """What metadata, manifests and logs say this input was: no signature, no payload.

        An inline file is ``inline:<file name> sha256=<hex>``; anything else is its
        source, signature-stripped.
        """
        if self.inline:
            return f"inline:{Path(self.source).name} sha256={self.sha256}"
        return strip_signature(self.source)


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

    def store(self, path: Path, key: str, content_type: str, size_bytes: int) -> tuple[str, bool]:
        """Make sure ``key`` holds the file (content-addressed: the same key, the same bytes);
        a signed GET URL, and whether it was uploaded now."""
        ...


class _S3Target:
    def __init__(self, backend: S3Backend, prefix: str, expires_in: int) -> None:
        self.backend = backend
        self.prefix = prefix
        self.expires_in = expires_in

    def check(self) -> None:
        self.backend.check()

    def store(self, path: Path, key: str, content_type: str, size_bytes: int) -> tuple[str, bool]:
        if size_bytes <= _PUT_WITHOUT_ASKING_BYTES:
            try:
                content = path.read_bytes()
            except OSError as exc:
                raise StagingError(f"{path}: cannot read file: {exc.strerror}") from exc
            uploaded = self.backend.create_bytes(key, content, content_type) is not None
        else:
            uploaded = self.backend.head(key) is None
            if uploaded:
                self.backend.put_file(path, key, content_type)
        return self.backend.presign_get(key, self.expires_in), uploaded


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

    def store(self, path: Path, key: str, content_type: str, size_bytes: int) -> tuple[str, bool]:
        # Loopback: asking first costs nothing worth saving.
        response = self.http.head(self._url(key))
        if response.status_code != 404:
            self._raise_for(response, key)
            return response.headers["X-Signed-Url"], False
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
        return response.json()["url"], True

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
    check_target: bool = True,
    url_timeout: float | None = DEFAULT_PROBE_TIMEOUT,
) -> list[StagedAsset]:
    """Validate every source, then upload local files and return one fetchable URL per image.

    Folders and globs expand in place (sorted). ``staging_uri`` is ``s3://bucket/prefix``
    or the base URL of a loopback object store (its token from ``upload_token`` or
    ``NANOBANANA_STAGING_TOKEN``). Without one, local files are sent inline as
    ``data:`` URIs when they are within the provider's caps. Raises
    :class:`StagingError` before any upload if any source is unusable.
    ``check_target=False`` skips the check that the target is usable (a request on
    S3) for a caller staging many rows that checked it once already. An http(s)
    source's header is read within ``url_timeout`` seconds for the pixel cap; None
    leaves that to a caller that asks each URL once (`url_input_problem`).
    """
    planned = _plan(sources, expires_in, _S3Clients(s3_client), staging_uri, url_timeout)
    clients = planned.clients
    target = None
    if planned.local_files and staging_uri:
        target = _open_target(staging_uri, clients, expires_in, upload_token)
    with _staging_errors(target, "staging failed"):
        if target is not None and check_target:
            target.check()
        return _execute(planned.items, target, clients, expires_in)


@contextlib.contextmanager
def _staging_errors(target: _Target | None, what: str) -> Iterator[None]:
    """Every failure talking to the target as a :class:`StagingError` (redacted), and the
    target closed after, for staging and for the dry run's check alike."""
    try:
        yield
    except StagingError:
        raise
    except StorageError as exc:  # e.g. the bucket is missing: its message says so
        raise StagingError(str(exc)) from exc
    except (BotoCoreError, httpx.HTTPError) as exc:
        raise StagingError(f"{what}: {redact_text(str(exc))}") from exc
    finally:
        if isinstance(target, _LoopbackTarget):
            target.close()


def check_sources(
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    staging_uri: str | None = None,
    *,
    s3_client: Any = None,
    probe_timeout: float | None = DEFAULT_PROBE_TIMEOUT,
) -> None:
    """Every check :func:`stage_assets` makes, with nothing uploaded or encoded: a pre-flight.

    Also asks each http(s) input for its first bytes (HEAD, then a ranged GET;
    ``probe_timeout`` seconds each, ``None`` to skip), because the API fetches
    URLs only after the submit is billed. Raises :class:`StagingError` naming
    every problem.
    """
    planned = _plan(sources, DEFAULT_EXPIRES_IN, _S3Clients(s3_client), staging_uri, probe_timeout)
    if probe_timeout is not None:
        check_urls([item for item in planned.items if isinstance(item, StagedAsset)], probe_timeout)


def check_urls(assets: Sequence[StagedAsset], timeout: float = DEFAULT_PROBE_TIMEOUT) -> None:
    """Probe every URL among ``assets`` that the API will fetch as the user gave it;
    :class:`StagingError` naming each one that does not answer with an image."""
    problems = [
        problem
        for asset in assets
        if asset.passed_through
        and (problem := probe_image_url(asset.url, timeout=timeout)) is not None
    ]
    if problems:
        raise StagingError("; ".join(problems))


def probe_image_url(url: str, *, timeout: float = DEFAULT_PROBE_TIMEOUT) -> str | None:
    """Whether ``url`` answers with an image, asked cheaply; None if so, else the problem.

    HEAD first; when the server refuses HEAD (pre-signed S3 URLs are signed for
    GET) or names no image type, a GET of the first bytes, judged by the bytes.
    The problem text names the URL without its signature.
    """
    shown = strip_signature(url)
    host = urlsplit(url).hostname or ""
    try:
        # A loopback URL must not go through a proxy from the environment.
        with httpx.Client(
            follow_redirects=True, timeout=timeout, trust_env=not is_loopback_host(host)
        ) as http:
            head = http.head(url)
            content_type = head.headers.get("content-type", "").split(";")[0].strip().lower()
            if head.status_code == 200 and content_type.startswith("image/"):
                return None
            if head.status_code in (404, 410):
                return f"{shown}: HTTP {head.status_code} (not found)"
            with http.stream("GET", url, headers={"Range": f"bytes=0-{SNIFF_BYTES - 1}"}) as got:
                if got.status_code not in (200, 206):
                    return f"{shown}: HTTP {got.status_code}"
                first_bytes = b""
                for chunk in got.iter_bytes():
                    first_bytes += chunk
                    if len(first_bytes) >= SNIFF_BYTES:
                        break
    except httpx.HTTPError as exc:
        return f"{shown}: not reachable ({type(exc).__name__})"
    if sniff_image_type(first_bytes) is None:
        served = got.headers.get("content-type", "no content type")
        return f"{shown}: not an image (served as {served})"
    return None


@dataclass(frozen=True)
class _Plan:
    items: list[_Planned]
    clients: _S3Clients

    @property
    def local_files(self) -> list[_LocalFile]:
        return [item for item in self.items if isinstance(item, _LocalFile)]


def _plan(
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    expires_in: int,
    clients: _S3Clients,
    staging_uri: str | None,
    url_timeout: float | None,
) -> _Plan:
    """Phase one: expand and check every source, and the inline caps when there is no
    staging location; nothing written anywhere. An http(s) source's header is read
    within `url_timeout` seconds (None: not read)."""
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    if not sources:
        raise StagingError("no sources given")
    if not 1 <= expires_in <= MAX_URL_EXPIRES_IN:
        raise StagingError(f"expires_in must be between 1 and {MAX_URL_EXPIRES_IN} seconds")
    plan = _Plan(
        [item for source in sources for item in _plan_source(source, clients, url_timeout)],
        clients,
    )
    if plan.local_files and not staging_uri:
        _check_inline(plan.local_files)
    return plan


def _check_inline(files: list[_LocalFile]) -> None:
    """The provider's inline caps, all problems at once, with the sizes (the pixel cap was
    checked for every local file when it was inspected)."""
    problems = []
    for item in files:
        encoded = data_uri_length(item.size_bytes, item.content_type)
        if encoded > INLINE_MAX_ENCODED_BYTES:
            problems.append(
                f"{item.path}: {format_mib(item.size_bytes)} is too large to send inline "
                f"({format_mib(encoded)} as a data: URI; at most "
                f"{format_mib(INLINE_MAX_ENCODED_BYTES)}, about "
                f"{format_mib(INLINE_MAX_ENCODED_BYTES * 3 // 4)} of file)"
            )
    total = sum(data_uri_length(item.size_bytes, item.content_type) for item in files)
    if total > INLINE_MAX_REQUEST_BYTES - _REQUEST_RESERVE_BYTES:
        problems.append(
            f"together the {len(files)} local images are {format_mib(total)} as data: URIs, "
            f"over the {format_mib(INLINE_MAX_REQUEST_BYTES)} one request may carry"
        )
    if problems:
        raise StagingError(
            "; ".join(problems) + f". Without a staging location local images go inline; "
            f"{_STAGING_HINT}. Nothing was submitted."
        )


def check_assets(
    sources: Sequence[str | os.PathLike[str]],
    staging_uri: str | None = None,
    *,
    s3_client: Any = None,
    upload_token: str | None = None,
) -> int:
    """Validate sources as `stage_assets` does (the inline caps without a staging
    location), and that the staging store answers, uploading nothing (a dry run's
    check); the number of images found. Raises :class:`StagingError`."""
    planned = _plan(
        sources, DEFAULT_EXPIRES_IN, _S3Clients(s3_client), staging_uri, DEFAULT_PROBE_TIMEOUT
    )
    if not planned.local_files or not staging_uri:
        return len(planned.items)
    target = _open_target(staging_uri, planned.clients, DEFAULT_EXPIRES_IN, upload_token)
    with _staging_errors(target, "staging check failed"):
        target.check()
    return len(planned.items)


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
    """Phase two: uploads, signatures or inline data. Everything here has been validated."""
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
        elif target is None:  # no staging location: the caps were checked in phase one
            staged.append(_inline(item))
        else:
            key = join_key(target.prefix, f"{item.sha256}{extension_for(item.content_type)}")
            uploaded = False
            url = urls.get(key)
            if url is None:
                url, uploaded = target.store(item.path, key, item.content_type, item.size_bytes)
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


def _inline(item: _LocalFile) -> StagedAsset:
    try:
        content = item.path.read_bytes()
    except OSError as exc:
        raise StagingError(f"{item.path}: cannot read file: {exc.strerror}") from exc
    payload = base64.b64encode(content).decode("ascii")
    return StagedAsset(
        source=str(item.path),
        url=f"data:{item.content_type};base64,{payload}",
        sha256=item.sha256,
        content_type=item.content_type,
        size_bytes=item.size_bytes,
        inline=True,
    )


def _open_target(
    staging_uri: str, clients: _S3Clients, expires_in: int, upload_token: str | None
) -> _Target:
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
        "use s3://bucket/prefix or a loopback store URL, or give none to send local images "
        "inline (up to 6 MiB each)"
    )


def _parse(value: str | os.PathLike[str]) -> LocalLocation | S3Location | HttpLocation:
    try:
        return parse_location(value)
    except StorageError as exc:
        raise StagingError(str(exc)) from exc


def _plan_source(
    source: str | os.PathLike[str], clients: _S3Clients, url_timeout: float | None
) -> list[_Planned]:
    """Phase one for one source: expand and validate it; no writes anywhere."""
    location = _parse(source)
    if isinstance(location, HttpLocation):
        if url_timeout is not None:
            _check_url_header(location, url_timeout)
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
    check_url_input_size(str(path), stat.st_size)
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
    check_url_input_size(str(location), size)
    try:
        head_bytes = backend.read_range(location.key, HEADER_BYTES)
    except (ClientError, BotoCoreError) as exc:
        raise StagingError(f"{location}: cannot be read: {exc}") from exc
    content_type = sniff_image_type(head_bytes[:SNIFF_BYTES])
    if content_type is None:
        raise StagingError(_not_an_image(str(location)))
    header_facts(head_bytes, str(location))  # the header's pixel count, when in range
    return _S3Object(location, content_type, size)


def _check_url_header(location: HttpLocation, timeout: float) -> None:
    """The pixel cap of an http(s) input, from a ranged GET of its header, as for S3.

    The API fetches the URL itself, and would refuse a pixel bomb only after the
    submit is billed. A URL that does not answer here, or not with an image, is
    left to the API (it may reach what this machine cannot) and to the probe of
    :func:`check_urls`, which says so where a person is waiting.
    """
    head = read_url_header(location.url, timeout=timeout)
    if head is not None and sniff_image_type(head[:SNIFF_BYTES]) is not None:
        header_facts(head, str(location))


def url_input_problem(url: str, *, timeout: float = DEFAULT_PROBE_TIMEOUT) -> str | None:
    """Everything asked of one http(s) input before a paid submit, for a caller that asks
    each URL once however many rows use it: over the pixel cap (its header), or not an
    image (`probe_image_url`).

    Args:
        url: The input as the API will fetch it.
        timeout: Seconds for each of the two looks.

    Returns:
        The problem, naming the URL without its signature; None when there is none.
    """
    try:
        _check_url_header(HttpLocation(url), timeout)
    except StagingError as error:
        return str(error)
    return probe_image_url(url, timeout=timeout)


def read_url_header(url: str, *, timeout: float = DEFAULT_PROBE_TIMEOUT) -> bytes | None:
    """The first :data:`HEADER_BYTES` of what ``url`` serves (a ranged GET, redirects
    followed), read within ``timeout`` seconds in all; None when it does not answer
    200 or 206 in time. Servers that ignore the range are read no further."""
    host = urlsplit(url).hostname or ""
    deadline = time.monotonic() + timeout
    head = b""
    try:
        # A loopback URL must not go through a proxy from the environment.
        with (
            httpx.Client(
                follow_redirects=True, timeout=timeout, trust_env=not is_loopback_host(host)
            ) as http,
            http.stream(
                "GET",
                url,
                # Identity: a compressed chunk could inflate far past the header we want.
                headers={"Range": f"bytes=0-{HEADER_BYTES - 1}", "Accept-Encoding": "identity"},
            ) as got,
        ):
            if got.status_code not in (200, 206):
                return None
            for chunk in got.iter_bytes():
                head += chunk
                if len(head) >= HEADER_BYTES:
                    break
                if time.monotonic() > deadline:
                    return None  # a server dripping its answer: left to the API
    except httpx.HTTPError:
        return None
    return head[:HEADER_BYTES]


def _not_an_image(name: str) -> str:
    return f"{name}: not an image (expected {_ACCEPTED}, judged by the file's bytes)"
