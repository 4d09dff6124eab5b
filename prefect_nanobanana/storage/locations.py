"""Location strings — local paths, ``file://``, ``s3://``, ``https://`` — and signature hygiene.

Pre-signed URLs are bearer credentials: whoever holds one can read the object
until it expires. Everything here that turns a URL into text meant for people or
files (metadata, logs, error messages) goes through :func:`strip_signature` or
:func:`redact` (from :mod:`prefect_nanobanana.redaction`), so a signature never
leaks beyond the request that needs it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..redaction import redact, redact_text, strip_signature
from .errors import LocationError

# The redaction lives in one neutral module (client, storage and the Prefect layer
# share it); these names stay importable from here.
__all__ = [
    "HttpLocation",
    "LocalLocation",
    "Location",
    "S3Location",
    "host_allowed",
    "is_loopback_host",
    "join_key",
    "parse_location",
    "redact",
    "redact_text",
    "s3_location_of_url",
    "strip_signature",
]

# S3's rules for bucket names, loosely: 3-63 lowercase letters, digits, dots and hyphens.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
# AWS's S3 hosts: virtual-hosted (the bucket first) and path-style (the bucket in the path).
_AWS_S3_HOST_RE = re.compile(
    r"^(?:(?P<bucket>[a-z0-9][a-z0-9.\-]*)\.)?s3(?:[.-][a-z0-9-]+)*\.amazonaws\.com(?:\.cn)?$"
)


@dataclass(frozen=True)
class LocalLocation:
    """A path on this machine (``~`` expanded, not resolved: globs stay globs)."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class S3Location:
    """An S3 object or prefix; ``key`` has no leading slash and may be empty (bucket root)."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class HttpLocation:
    """An ``https://`` URL, or ``http://`` on a loopback host; ``url`` may carry a signature."""

    url: str

    def __str__(self) -> str:
        return strip_signature(self.url)


Location = LocalLocation | S3Location | HttpLocation


def parse_location(value: str | os.PathLike[str]) -> Location:
    """Classify a location string; refuse plain-HTTP remote URLs and unknown schemes.

    Plain HTTP is allowed only on loopback hosts (tests, the offline demo): across
    a network it would expose pre-signed URLs and image bytes to anyone on the path.
    """
    if isinstance(value, os.PathLike):
        return LocalLocation(Path(value).expanduser())
    if not value:
        raise LocationError("empty location")
    if value.startswith("s3://"):
        return _parse_s3(value)
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    # No scheme, or a one-letter "scheme" that is really a Windows drive letter.
    if len(scheme) <= 1:
        return LocalLocation(Path(value).expanduser())
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise LocationError(f"file:// URL names a remote host: {strip_signature(value)}")
        return LocalLocation(Path(unquote(parts.path)))
    if scheme in ("http", "https"):
        host = parts.hostname
        if not host:
            raise LocationError(f"URL has no host: {strip_signature(value)}")
        if scheme == "http" and not is_loopback_host(host):
            raise LocationError(
                f"refusing non-HTTPS URL {strip_signature(value)}: plain http is allowed only "
                "on loopback hosts (127.0.0.0/8, localhost, ::1)"
            )
        return HttpLocation(value)
    raise LocationError(
        f"unsupported location {strip_signature(value)!r}: expected a local path, file://, "
        "s3://bucket/key or an https:// URL"
    )


def _parse_s3(value: str) -> S3Location:
    # Split by hand: S3 keys may contain '?' and '#', which urlsplit would cut off.
    bucket, _, key = value[len("s3://") :].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise LocationError(f"invalid S3 bucket name {bucket!r} in {value!r}")
    return S3Location(bucket, key.strip("/"))


def s3_location_of_url(url: str) -> str | None:
    """The ``s3://bucket/key`` an S3 object's URL (pre-signed or not) names, or None when
    the URL is not one this can tell: AWS's virtual-hosted and path-style hosts, and
    the endpoint ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` names (MinIO, moto).
    """
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    path = unquote(parts.path).lstrip("/")
    aws = _AWS_S3_HOST_RE.match(host)
    if aws and aws.group("bucket"):
        bucket, key = aws.group("bucket"), path
    elif aws or _is_s3_endpoint(parts.scheme, parts.netloc):
        bucket, _, key = path.partition("/")
    else:
        return None
    if not _BUCKET_RE.match(bucket) or not key:
        return None
    return f"s3://{bucket}/{key}"


def _is_s3_endpoint(scheme: str, netloc: str) -> bool:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return False
    parts = urlsplit(endpoint)
    origin = (parts.scheme.lower(), parts.netloc.rpartition("@")[2].lower())
    return origin == (scheme.lower(), netloc.rpartition("@")[2].lower())


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_allowed(url: str, allowed_hosts: Sequence[str]) -> bool:
    """True when the URL's host (and port) matches an entry of ``allowed_hosts``.

    Entries are ``host``, ``host:port``, ``*.domain`` or ``*.domain:port``, matched
    without regard to case. ``*.runcomfy.net`` matches ``a.runcomfy.net`` and
    ``a.b.runcomfy.net``, not ``runcomfy.net`` itself; an entry without a port
    matches every port, one with a port only that port.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        return False
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:
        return False
    for entry in allowed_hosts:
        pattern, entry_port = _split_host_entry(entry)
        if entry_port is not None and entry_port != port:
            continue
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def _split_host_entry(entry: str) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) as the lowercase host and the port, if any."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:
        host, port = entry, ""
    return host.rstrip("."), int(port) if port.isdigit() else None


def join_key(*parts: str) -> str:
    """Join S3 key segments with single slashes, skipping empty ones."""
    return "/".join(part.strip("/") for part in parts if part and part.strip("/"))
