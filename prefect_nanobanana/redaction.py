"""The one redaction of URL signatures and credentials, for every text we hand to people.

Pre-signed URLs (S3's, the loopback store's) are bearer credentials: whoever holds
one can read the object until it expires. The API token is one too. Servers echo
both back (a 422 quotes its input, a failed job quotes the URL it could not fetch),
so every path by which server text or a URL reaches a log line, an exception, an
event, a state message, an artifact or a file goes through :func:`redact_text` or
:func:`redact`. This module imports nothing of Prefect, the client or storage, so
all three can use it.

What is removed:

* the query string, fragment and user info of every ``http(s)://`` URL, also when
  JSON-escaped (``https:\\/\\/…``) — that is where S3's ``X-Amz-Signature``,
  ``X-Amz-Credential``, ``X-Amz-Security-Token``, the loopback store's
  ``signature`` and ``expires`` and any other provider's signature live;
* the value of a signature or credential parameter even without its URL (a
  server that quotes only the query, or a percent-encoded URL inside another);
* ``Authorization`` header values and ``Bearer`` tokens;
* the payload of ``data:`` URIs (the image itself), shortened to ``data:<type>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel

MASK = "**********"

# A URL runs to the first character that cannot be part of one in prose or JSON.
_URL_IN_TEXT_RE = re.compile(r"\bhttps?:(?://|\\/\\/)[^\s\"'<>`]+", re.IGNORECASE)
_DATA_URI_IN_TEXT_RE = re.compile(r"\bdata:[^,\s\"'<>]*,[^\s\"'<>]*")
# Query parameters that carry a signature or a credential, by every spelling we know
# (S3 SigV4 and SigV2, CloudFront, GCS, Azure SAS, the loopback store), followed by
# `=` or its percent-encoding. The value ends where a query or quoted text would.
_SECRET_PARAM_RE = re.compile(
    r"(?i)\b(x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
    r"x-goog-credential|awsaccesskeyid|signature|sig|key-pair-id|policy|token|"
    r"access_token|api_token|api_key|apikey)(=|%3d)[^&\s\"'<>#]+"
)
_BEARER_RE = re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9._~+/=-]+")
# `Authorization: <scheme> <credentials>` in headers, reprs and JSON alike.
_AUTHORIZATION_RE = re.compile(
    r"(?i)\b(authorization|x-api-key)([\"']?\s*[:=]\s*[\"']?)"
    r"(?:(?:bearer|basic|token)\s+)?[^\s\"',;}]+"
)
# What every pattern above needs to match at least once: a text with none of these has
# nothing to remove, and most texts we write (keys, ids, timestamps) are such texts.
_MIGHT_CARRY_A_SECRET_RE = re.compile(r"(?i)https?:|data:|=|%3d|bearer|authorization|x-api-key")


def strip_signature(url: str) -> str:
    """The URL without query string, fragment or user info — safe to log and to store.

    ``data:`` URIs shrink to ``data:<type>`` (their payload is the image itself);
    local paths and ``s3://`` locations carry no signature and come back unchanged.
    """
    if url.startswith("data:"):
        media_type = url[len("data:") :].split(",", 1)[0].split(";", 1)[0]
        return f"data:{media_type}"
    if url.startswith("s3://"):
        return url
    parts = urlsplit(url)
    if len(parts.scheme) <= 1:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def carries_signature(url: str) -> bool:
    """Whether ``url`` is an http(s) URL that carries a credential: a signature or
    credential query parameter (a pre-signed URL, by every spelling the redaction
    knows) or user info. Such a URL must not be kept anywhere but the request that
    needs it."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https"):
        return False
    return "@" in parts.netloc or _SECRET_PARAM_RE.search(parts.query) is not None


def redact_text(text: str) -> str:
    """``text`` with no URL signature, credential parameter, bearer token or data: payload."""
    if not text or _MIGHT_CARRY_A_SECRET_RE.search(text) is None:
        return text
    text = _DATA_URI_IN_TEXT_RE.sub(lambda match: strip_signature(match.group(0)), text)
    text = _URL_IN_TEXT_RE.sub(lambda match: strip_signature(match.group(0)), text)
    text = _SECRET_PARAM_RE.sub(_mask_parameter, text)
    text = _AUTHORIZATION_RE.sub(lambda match: f"{match.group(1)}{match.group(2)}{MASK}", text)
    return _BEARER_RE.sub(lambda match: f"{match.group(1)}{match.group(2)}{MASK}", text)


def _mask_parameter(match: re.Match[str]) -> str:
    name, equals = match.group(1), match.group(2)
    value = match.group(0)[len(name) + len(equals) :]
    if not value.strip("."):
        return match.group(0)  # a placeholder in prose ("pass api_token=..."), not a secret
    return f"{name}{equals}{MASK}"


def redact(value: Any) -> Any:
    """A JSON-ready copy of ``value`` in which no string can carry a URL signature.

    Callers hand metadata of every shape (datetimes, paths, pydantic models,
    exceptions); converting and scrubbing in one walk means nothing reaches a file
    through a ``default=str`` back door without being scrubbed.
    """
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {redact_text(str(key)): redact(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [redact(item) for item in items]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return redact(value.model_dump(mode="json"))
    return redact_text(str(value))
