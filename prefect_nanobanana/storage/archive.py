"""Archiving: keep every output a request produced, with the metadata to explain it.

Output URLs are short-lived, so outputs are copied into an archive the user owns:
a local folder (the default) or ``s3://bucket/prefix``. Layout — one function,
:func:`archive_layout`, turns a request into its keys::

    {archive}/{YYYY-MM-DD}/{request_id}/{index}.{ext}
    {archive}/{YYYY-MM-DD}/{request_id}/metadata.json

or, ``flat=True`` (what a person's ``--out DIR`` asks for: the files right there)::

    {archive}/{request_id}.{ext}            (or {request_id}-{n}.{ext}, n from 1, for several)
    {archive}/{request_id}.metadata.json

Outputs are written first and ``metadata.json`` last (atomically), so its
existence means the request is completely archived; a second run finds it and
writes nothing. Outputs are streamed through a temp file while hashed, never held
whole in memory. An output that cannot be fetched does not stop the others: all
that can be archived is, then :class:`ArchiveError` reports the failures and
carries the partial record, so nothing produced is dropped silently.

Output URLs come from the API's answers, which are not ours to trust: given
``allowed_hosts`` (the API's output hosts), nothing else is fetched, redirects
included; no credential is ever sent; and each output's download, retries
included, ends by a wall-clock deadline. Scratch files left by a killed run are
swept from the request's folder when it is archived again.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote_to_bytes

import httpx
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ..deadline import call_deadline, install_deadlines
from .backends import DEFAULT_ARCHIVE_URI, Backend, open_backend
from .errors import LocationError, StorageError
from .locations import (
    HttpLocation,
    host_allowed,
    parse_location,
    redact,
    redact_text,
    strip_signature,
)
from .media import SNIFF_BYTES, extension_for, sniff_image_type
from .thumbnails import thumbnail_data_uri

logger = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 100 * 1024 * 1024
# The deadline of one output's whole download, retries included: 100 MB (the size
# cap) at about 3 Mbit/s; a 4K PNG of ~25 MB needs under 1 Mbit/s.
DEFAULT_DOWNLOAD_TIMEOUT = 300.0
METADATA_NAME = "metadata.json"
METADATA_SCHEMA = "prefect-nanobanana/archive/v1"
_RESERVED_KEYS = frozenset({"schema", "request_id", "archive_date", "archived_at", "outputs"})
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_CHUNK = 1024 * 1024
_DATA_CHUNK_CHARS = 4 * 256 * 1024  # a multiple of 4: each slice decodes on its own
_UNTYPED = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_MAX_RETRY_AFTER = 30.0


class ArchivedOutput(BaseModel):
    """One archived output, as listed in ``metadata.json``."""

    index: int
    location: str
    sha256: str
    bytes: int
    content_type: str
    width: int | None = None
    height: int | None = None
    source_url: str


class ArchiveRecord(BaseModel):
    """Where a request's outputs and metadata were archived.

    ``metadata_location`` is None only in :attr:`ArchiveError.partial_record`:
    metadata is written when, and only when, every output is archived.
    """

    request_id: str
    archive_date: dt.date
    outputs: list[ArchivedOutput]
    metadata_location: str | None
    already_archived: bool = False
    thumbnails: list[str | None] = Field(
        default_factory=list,
        exclude=True,
        repr=False,
        description="With `archive_outputs(thumbnails=True)`: a JPEG data URI of each output, "
        "made from the file while it was at hand, so a report need not read it back.",
    )

    @property
    def output_locations(self) -> list[str]:
        return [output.location for output in self.outputs]


class ArchiveMetadata(BaseModel):
    """What a request's ``metadata.json`` says: schema ``prefect-nanobanana/archive/v1``.

    The one model every archiving path writes (the flows, the batch's rows, the
    CLI). Callers set what they know of the edit; :func:`archive_outputs` sets
    ``schema``, ``request_id``, ``archive_date``, ``archived_at`` and ``outputs``.
    Downstream ETL reads these names: fields may be added, never renamed. Only the
    fields a caller set are written (a download by request id knows only the cost
    and times), and keys the model does not name are kept as they are.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_: str = Field(default=METADATA_SCHEMA, alias="schema")
    request_id: str | None = None
    archive_date: dt.date | None = None
    prompt: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="aspect_ratio, resolution, output_format, num_images."
    )
    model_id: str | None = None
    sources: list[str] | None = Field(default=None, description="Inputs, signatures removed.")
    row: int | None = Field(default=None, description="1-based row of a batch.")
    row_id: str | None = Field(default=None, description="The batch row's own id.")
    created_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    cost: float | None = None
    flow_run_id: str | None = None
    archived_at: dt.datetime | None = None
    outputs: list[ArchivedOutput] | None = None

    def document(self) -> dict[str, Any]:
        """The JSON-ready ``metadata.json``: set fields only, every URL signature-stripped."""
        return redact(self.model_dump(by_alias=True, exclude_unset=True))


@dataclass(frozen=True)
class OutputFailure:
    """An output that could not be archived; ``url`` is signature-stripped."""

    index: int
    url: str
    reason: str


class ArchiveError(StorageError):
    """Some outputs of a request could not be archived; the others were.

    ``index`` and ``url`` name the first failure, ``failures`` lists them all and
    ``partial_record`` holds what did get archived.
    """

    def __init__(
        self, request_id: str, failures: list[OutputFailure], partial_record: ArchiveRecord
    ) -> None:
        self.request_id = request_id
        self.failures = failures
        self.partial_record = partial_record
        self.index = failures[0].index
        self.url = failures[0].url
        details = "; ".join(
            f"output {failure.index} ({failure.url}): {failure.reason}" for failure in failures
        )
        super().__init__(
            f"request {request_id}: {len(failures)} of "
            f"{len(failures) + len(partial_record.outputs)} outputs could not be archived "
            f"({len(partial_record.outputs)} kept): {details}"
        )


@dataclass(frozen=True)
class ArchiveLayout:
    """The keys of one request in the archive, relative to the archive root.

    Dated layout: a folder per request. Flat layout (``stem`` set): files named by
    the request directly in ``folder``, so several requests share one folder.
    """

    folder: str
    stem: str | None = None
    output_count: int = 1

    def output_key(self, index: int, content_type: str) -> str:
        return f"{self._name(index)}{extension_for(content_type)}"

    def temp_name(self, index: int) -> str:
        """The scratch name an output is fetched into before it gets its key."""
        return self._name(index)

    @property
    def metadata_key(self) -> str:
        if self.stem is None:
            return f"{self.folder}/{METADATA_NAME}"
        return _join(self.folder, f"{self.stem}.{METADATA_NAME}")

    def _name(self, index: int) -> str:
        if self.stem is None:
            return f"{self.folder}/{index}"
        suffix = "" if self.output_count == 1 else f"-{index + 1}"
        return _join(self.folder, f"{self.stem}{suffix}")


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def archive_layout(
    request_id: str, archive_date: dt.date, *, flat: bool = False, output_count: int = 1
) -> ArchiveLayout:
    """The one place that turns a request into archive keys: ``{YYYY-MM-DD}/{request_id}/…``,
    or with ``flat`` ``{request_id}….{ext}`` and ``{request_id}.metadata.json`` at the root."""
    if not _REQUEST_ID_RE.match(request_id) or request_id in (".", ".."):
        raise ValueError(f"request id {request_id!r} cannot be used as an archive folder name")
    if flat:
        return ArchiveLayout("", stem=request_id, output_count=output_count)
    return ArchiveLayout(f"{_as_date(archive_date).isoformat()}/{request_id}")


def _as_date(value: dt.date) -> dt.date:
    # A datetime is a date too, but its isoformat() has a time: reduce it to the UTC day.
    if isinstance(value, dt.datetime):
        return (value.astimezone(dt.timezone.utc) if value.tzinfo else value).date()
    return value


def load_archive_record(
    request_id: str,
    archive_date: dt.date,
    archive_uri: str | os.PathLike[str] = DEFAULT_ARCHIVE_URI,
    *,
    s3_client: Any = None,
) -> ArchiveRecord | None:
    """The record of an archived request, read back from its ``metadata.json``, or None."""
    backend = open_backend(archive_uri, s3_client)
    day = _as_date(archive_date)
    return _load_record(backend, request_id, day, archive_layout(request_id, day))


def _load_record(
    backend: Backend, request_id: str, day: dt.date, layout: ArchiveLayout
) -> ArchiveRecord | None:
    raw = backend.read_bytes(layout.metadata_key)
    if raw is None:
        return None
    try:
        document = json.loads(raw)
        outputs = [ArchivedOutput.model_validate(item) for item in document["outputs"]]
    except (ValueError, KeyError, TypeError) as exc:
        # Cannot happen with atomic writes; if it does, archiving again repairs it.
        logger.warning("unreadable %s (%s): archiving again", layout.metadata_key, exc)
        return None
    return ArchiveRecord(
        request_id=request_id,
        archive_date=day,
        outputs=outputs,
        metadata_location=backend.location(layout.metadata_key),
        already_archived=True,
    )


def archive_outputs(
    request_id: str,
    output_urls: Sequence[str],
    *,
    date: dt.date | None,
    archive_uri: str | os.PathLike[str] = DEFAULT_ARCHIVE_URI,
    metadata: ArchiveMetadata | Mapping[str, Any] | None = None,
    s3_client: Any = None,
    max_bytes: int = MAX_OUTPUT_BYTES,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
    flat: bool = False,
    allowed_hosts: Sequence[str] | None = None,
    check_target: bool = True,
    check_existing: bool = True,
    thumbnails: bool = False,
) -> ArchiveRecord:
    """Copy a request's outputs into the archive and write its ``metadata.json``.

    ``date`` is the request's creation date, so running again lands in the same
    folder (None means today in UTC: only for requests whose date is unknown).
    ``metadata`` is what the caller knows of the edit (prompt, parameters, model id,
    sources, times, cost, flow run id…), an :class:`ArchiveMetadata` or a mapping of
    its fields — every URL in it is signature-stripped.
    Output URLs may be ``https://``, loopback ``http://`` or ``data:`` URIs.
    ``flat`` writes the files named by the request straight into the archive root
    (see the module docstring) instead of a dated folder per request.
    Transient fetch failures (connection errors, 5xx, 429) are retried ``retries``
    times with exponential ``backoff``; ``timeout`` is the wall-clock deadline of one
    output's whole download, every attempt and read included. ``allowed_hosts``
    (``host``, ``host:port``, ``*.domain``; see
    :func:`~.locations.host_allowed`) lists the only hosts fetched from, redirects
    included; pass the client's ``output_hosts``. None fetches from any host.
    ``check_target=False`` skips the check that the archive can be written (for a
    caller archiving many requests that checked it once), ``check_existing=False``
    the look for an earlier archive of the request (for a caller whose record shows
    that none was ever started): on S3 each is a round trip per request.
    ``thumbnails`` makes each output's thumbnail from the fetched file
    (`ArchiveRecord.thumbnails`), for a report that would otherwise download it again.

    Returns the existing record (``already_archived=True``) without writing
    anything when the request is already archived. Raises :class:`ArchiveError`
    after archiving what it could when some outputs fail, and
    :class:`~.errors.LocationError` before fetching anything when the archive
    cannot be written (e.g. missing bucket).
    """
    day = _as_date(date or dt.datetime.now(dt.timezone.utc))
    layout = archive_layout(request_id, day, flat=flat, output_count=len(output_urls))
    if not isinstance(metadata, ArchiveMetadata):
        metadata = ArchiveMetadata.model_validate(dict(metadata or {}))
    caller_metadata = metadata.document()
    clashes = sorted(_RESERVED_KEYS & caller_metadata.keys() - {"request_id"})
    if clashes or caller_metadata.get("request_id", request_id) != request_id:
        raise ValueError(
            f"metadata must not set {clashes or ['request_id']}: the archive sets them"
        )

    backend = open_backend(archive_uri, s3_client)
    if check_target:
        backend.check()
    backend.sweep_scratch(layout.folder)
    existing = _load_record(backend, request_id, day, layout) if check_existing else None
    if existing is not None and [o.index for o in existing.outputs] == list(
        range(len(output_urls))
    ):
        return existing

    archived: list[ArchivedOutput] = []
    made_thumbnails: list[str | None] = []
    failures: list[OutputFailure] = []
    fetcher = _Fetcher(
        max_bytes=max_bytes,
        retries=retries,
        backoff=backoff,
        timeout=timeout,
        allowed_hosts=None if allowed_hosts is None else tuple(allowed_hosts),
    )
    try:
        for index, url in enumerate(output_urls):
            try:
                output, thumbnail = _archive_one(backend, layout, index, url, fetcher, thumbnails)
                archived.append(output)
                made_thumbnails.append(thumbnail)
            except (_FetchError, StorageError, OSError) as exc:
                reason = redact_text(str(exc))
                logger.warning("request %s output %d: %s", request_id, index, reason)
                failures.append(OutputFailure(index, strip_signature(url), reason))
    finally:
        fetcher.close()

    if failures:
        partial = ArchiveRecord(
            request_id=request_id, archive_date=day, outputs=archived, metadata_location=None
        )
        raise ArchiveError(request_id, failures, partial)
    document = ArchiveMetadata.model_validate(
        {
            **caller_metadata,
            "schema": METADATA_SCHEMA,
            "request_id": request_id,
            "archive_date": day,
            "archived_at": dt.datetime.now(dt.timezone.utc),
            "outputs": archived,
        }
    ).document()
    data = json.dumps(document, indent=2, ensure_ascii=False).encode()
    return ArchiveRecord(
        request_id=request_id,
        archive_date=day,
        outputs=archived,
        metadata_location=backend.write_bytes(layout.metadata_key, data, "application/json"),
        thumbnails=made_thumbnails if thumbnails else [],
    )


def _archive_one(
    backend: Backend,
    layout: ArchiveLayout,
    index: int,
    url: str,
    fetcher: _Fetcher,
    thumbnail: bool = False,
) -> tuple[ArchivedOutput, str | None]:
    temp = backend.temp_file(layout.temp_name(index))
    try:
        with temp.open("w+b") as sink:
            fetched = fetcher.fetch(url, sink)
            sink.flush()
            os.fsync(sink.fileno())
        width, height = _pixel_size(temp)
        preview = thumbnail_data_uri(temp) if thumbnail else None
        location = backend.commit_file(
            temp, layout.output_key(index, fetched.content_type), fetched.content_type
        )
    finally:
        temp.unlink(missing_ok=True)
    output = ArchivedOutput(
        index=index,
        location=location,
        sha256=fetched.sha256,
        bytes=fetched.size,
        content_type=fetched.content_type,
        width=width,
        height=height,
        source_url=strip_signature(url),
    )
    return output, preview


def _pixel_size(path: Path) -> tuple[int | None, int | None]:
    """Width and height from the image header (Pillow reads lazily), or None if unreadable."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None, None


class _FetchError(Exception):
    """An output cannot be fetched, for good (after retries, or not worth retrying)."""


class _TransientError(Exception):
    """A failure worth another try (5xx, 429), with the server's Retry-After if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class _Fetched:
    sha256: str
    size: int
    content_type: str


class _Sink:
    """Writes chunks to a file while hashing, counting and keeping the first bytes for sniffing."""

    def __init__(self, handle: IO[bytes], max_bytes: int) -> None:
        self.handle = handle
        self.max_bytes = max_bytes
        handle.seek(0)
        handle.truncate()
        self.hasher = hashlib.sha256()
        self.size = 0
        self.head = b""

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise _FetchError(f"output is larger than the {self.max_bytes}-byte limit")
        if len(self.head) < SNIFF_BYTES:
            self.head += chunk[: SNIFF_BYTES - len(self.head)]
        self.hasher.update(chunk)
        self.handle.write(chunk)

    def finish(self, declared_type: str) -> _Fetched:
        """The fetched file's facts; its type from its bytes, or from an ``image/*`` header."""
        if self.size == 0:
            raise _FetchError("output is empty")
        content_type = sniff_image_type(self.head)
        if content_type is None:
            if not declared_type.startswith("image/"):
                raise _FetchError(f"output is not an image (content type {declared_type!r})")
            content_type = declared_type
        return _Fetched(self.hasher.hexdigest(), self.size, content_type)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every archive call: building one loads the CA bundle, which
    cost more CPU than the downloads themselves in a 200-row batch (bench/batch_overhead)."""
    return httpx.create_ssl_context()


class _Fetcher:
    """Streams outputs into files: https, loopback http and data: URIs, with retries."""

    def __init__(
        self,
        *,
        max_bytes: int,
        retries: int,
        backoff: float,
        timeout: float,
        allowed_hosts: tuple[str, ...] | None,
    ) -> None:
        self.max_bytes = max_bytes
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.allowed_hosts = allowed_hosts
        # Checked on every hop, redirects included, before anything is sent: no
        # downgrade to remote plain http, no host outside the list. This client
        # holds no API token: an output host never sees it.
        self.http = httpx.Client(
            timeout=timeout,
            follow_redirects=True,
            event_hooks={"request": [self._refuse_foreign]},
            verify=_tls_context(),
        )
        install_deadlines(self.http)

    def _refuse_foreign(self, request: httpx.Request) -> None:
        url = str(request.url)
        try:
            parse_location(url)
        except LocationError as exc:
            raise _FetchError(str(exc)) from exc
        if self.allowed_hosts is not None and not host_allowed(url, self.allowed_hosts):
            raise _FetchError(
                f"refused to fetch from {request.url.netloc.decode()}: not one of the API's "
                f"output hosts ({', '.join(self.allowed_hosts)})"
            )

    def close(self) -> None:
        self.http.close()

    def fetch(self, url: str, handle: IO[bytes]) -> _Fetched:
        if url.startswith("data:"):
            return self._fetch_data_uri(url, handle)
        try:
            location = parse_location(url)
        except LocationError as exc:
            raise _FetchError(str(exc)) from exc
        if not isinstance(location, HttpLocation):
            raise _FetchError("output URL must be https://, loopback http:// or data:")
        with call_deadline(self.timeout):
            return self._fetch_with_retries(url, handle, time.monotonic() + self.timeout)

    def _fetch_with_retries(self, url: str, handle: IO[bytes], deadline: float) -> _Fetched:
        attempt = 0
        while True:
            try:
                return self._fetch_once(url, handle)
            except (_TransientError, httpx.TransportError) as exc:
                retry_after = getattr(exc, "retry_after", None)
                delay = (
                    min(retry_after, _MAX_RETRY_AFTER)
                    if retry_after is not None
                    else self.backoff * 2**attempt
                )
                out_of_time = time.monotonic() + delay >= deadline
                if attempt >= self.retries or out_of_time:
                    within = f" within the {self.timeout:g} s deadline" if out_of_time else ""
                    raise _FetchError(
                        f"gave up after {attempt + 1} attempts{within}: "
                        f"{redact_text(str(exc)) or type(exc).__name__}"
                    ) from exc
                time.sleep(delay)
                attempt += 1
            except httpx.HTTPError as exc:
                raise _FetchError(redact_text(str(exc))) from exc

    def _fetch_once(self, url: str, handle: IO[bytes]) -> _Fetched:
        with self.http.stream("GET", url) as response:
            status = response.status_code
            if status == 429 or status >= 500:
                raise _TransientError(f"HTTP {status}", _retry_after(response))
            if status != 200:
                raise _FetchError(f"HTTP {status}")
            declared_type = _media_type(response.headers.get("Content-Type"))
            if declared_type not in _UNTYPED and not declared_type.startswith("image/"):
                raise _FetchError(f"output is not an image (content type {declared_type!r})")
            declared_size = response.headers.get("Content-Length", "")
            if declared_size.isdigit() and int(declared_size) > self.max_bytes:
                raise _FetchError(
                    f"output is larger than the {self.max_bytes}-byte limit ({declared_size} bytes)"
                )
            sink = _Sink(handle, self.max_bytes)
            for chunk in response.iter_bytes(_CHUNK):
                sink.write(chunk)
            return sink.finish(declared_type)

    def _fetch_data_uri(self, url: str, handle: IO[bytes]) -> _Fetched:
        header, comma, payload = url[len("data:") :].partition(",")
        if not comma:
            raise _FetchError("malformed data: URI (no comma)")
        params = header.split(";")
        declared_type = _media_type(params[0])
        sink = _Sink(handle, self.max_bytes)
        if "base64" not in params[1:]:
            sink.write(unquote_to_bytes(payload))
            return sink.finish(declared_type)
        if len(payload) // 4 * 3 > self.max_bytes:
            raise _FetchError(f"output is larger than the {self.max_bytes}-byte limit")
        if re.search(r"\s", payload):
            payload = re.sub(r"\s+", "", payload)
        try:
            for start in range(0, len(payload), _DATA_CHUNK_CHARS):
                sink.write(
                    base64.b64decode(payload[start : start + _DATA_CHUNK_CHARS], validate=True)
                )
        except binascii.Error as exc:
            raise _FetchError(f"data: URI holds invalid base64 ({exc})") from exc
        return sink.finish(declared_type)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
