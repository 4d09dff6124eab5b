"""A tiny object store on loopback: the offline stand-in for S3 and its pre-signed URLs.

The demo and the tests must stage local files with no cloud account, yet exercise
the same shape as production: an authenticated upload, then a time-limited
signed GET URL that a fetcher with no credentials can use. The protocol:

* ``PUT /objects/{key}`` with ``Authorization: Bearer <upload_token>`` stores the
  body (streamed to disk) and answers JSON ``{"key", "url", "size", "sha256",
  "content_type", "expires"}`` where ``url`` is a signed GET URL.
* ``HEAD /objects/{key}`` with the bearer token says whether the object exists
  (200/404) and, since a HEAD answer has no body, gives the signed GET URL in the
  ``X-Signed-Url`` header. With a valid signature instead of the token it behaves
  like GET without the body (fetchers often probe first).
* ``GET /objects/{key}?expires=…&signature=…`` serves the object only with a valid,
  unexpired HMAC-SHA256 signature (403 otherwise), with its Content-Type.
* ``GET /`` with the bearer token answers 200: lets a client check token and
  reachability before anything is uploaded.

PUT and HEAD accept ``?expires_in=<seconds>`` for the URL they hand back. The
signing key is random per store instance: URLs die with the store, like a demo should.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from ..storage.locations import is_loopback_host, redact_text
from ..storage.staging import MAX_URL_EXPIRES_IN, STAGING_TOKEN_ENV

logger = logging.getLogger(__name__)

DEFAULT_URL_EXPIRES_IN = 3600
_CHUNK = 1024 * 1024


def validate_key(key: str) -> str:
    """Reject keys that could escape the store's folder or hide as dot-files."""
    # Split by hand: PurePosixPath would silently drop "." and empty segments.
    if (
        "\\" in key
        or "\x00" in key
        or any(not part or part.startswith(".") for part in key.split("/"))
    ):
        raise ValueError(f"invalid object key {key!r}")
    return key


class LoopbackObjectStore:
    """An HTTP object store bound to a loopback address, run in a background thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Objects live
    under ``folder/objects`` and their content types under ``folder/types``.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        upload_token: str | None = None,
        max_object_bytes: int = 200 * 1024 * 1024,
    ) -> None:
        if not is_loopback_host(host):
            raise ValueError(f"the loopback store binds only to loopback hosts, not {host!r}")
        self.folder = Path(folder).expanduser().absolute()
        self.host = host
        self.port = port
        # Without a configured token, a random one: nobody can upload unless told it.
        self.upload_token = (
            upload_token or os.environ.get(STAGING_TOKEN_ENV) or secrets.token_urlsafe(24)
        )
        self.max_object_bytes = max_object_bytes
        self._signing_key = secrets.token_bytes(32)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> LoopbackObjectStore:
        """Bind and serve in a daemon thread; returns self for chaining."""
        if self._server is not None:
            return self
        (self.folder / "objects").mkdir(parents=True, exist_ok=True)
        (self.folder / "types").mkdir(parents=True, exist_ok=True)
        server_class = _IPv6Server if ":" in self.host else ThreadingHTTPServer
        server = server_class((self.host, self.port), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # so stop() returns promptly
            name=f"loopback-store-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> LoopbackObjectStore:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://host:port`` — the ``staging_uri`` to pass to ``stage_assets``."""
        if self._server is None:
            raise RuntimeError("the loopback store is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # -- signing -----------------------------------------------------------------

    def sign_url(self, key: str, expires_in: int = DEFAULT_URL_EXPIRES_IN) -> str:
        """A GET URL for ``key`` that works for ``expires_in`` seconds, for anyone holding it."""
        validate_key(key)
        expires = int(time.time()) + expires_in
        signature = self._signature(key, expires)
        return f"{self.base_url}/objects/{quote(key)}?expires={expires}&signature={signature}"

    def _signature(self, key: str, expires: int) -> str:
        message = f"GET\n{key}\n{expires}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    def signature_is_valid(self, key: str, expires: str, signature: str) -> bool:
        """True when ``signature`` was made by this store for ``key`` and has not expired."""
        try:
            expires_at = int(expires)
        except ValueError:
            return False
        if expires_at < time.time():
            return False
        return hmac.compare_digest(self._signature(key, expires_at), signature)

    def token_is_valid(self, authorization: str | None) -> bool:
        """True when an ``Authorization`` header carries this store's upload token."""
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.upload_token.encode()
        )

    # -- storage -----------------------------------------------------------------

    def object_path(self, key: str) -> Path:
        """Where the object ``key`` is stored (the key is validated first)."""
        return self.folder / "objects" / validate_key(key)

    def type_path(self, key: str) -> Path:
        """Where the content type of ``key`` is stored."""
        return self.folder / "types" / validate_key(key)


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _handler_for(store: LoopbackObjectStore) -> type[BaseHTTPRequestHandler]:
    class Handler(_StoreHandler):
        pass

    Handler.store = store
    return Handler


class _StoreHandler(BaseHTTPRequestHandler):
    """Request handling for :class:`LoopbackObjectStore` (one instance per request)."""

    store: LoopbackObjectStore
    protocol_version = "HTTP/1.1"
    server_version = "NanobananaLoopbackStore/1"

    def log_message(self, format: str, *args: Any) -> None:
        # The request line holds signatures: scrub before it reaches any log.
        logger.debug("loopback store: " + redact_text(format % args))

    # -- helpers -----------------------------------------------------------------

    def _target(self) -> tuple[str | None, dict[str, list[str]]]:
        """The object key named by the path (None for ``/``) and the query parameters."""
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if parts.path in ("", "/"):
            return None, query
        if not parts.path.startswith("/objects/"):
            raise ValueError("unknown path")
        return validate_key(unquote(parts.path[len("/objects/") :])), query

    def _send_json(self, status: int, body: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _refuse(self, status: int, message: str) -> None:
        # A refused PUT's body is unread: close rather than misparse it as the next request.
        self._send_json(status, {"error": message}, close=self.command == "PUT")

    def _expires_in(self, query: dict[str, list[str]]) -> int:
        value = int(query.get("expires_in", [DEFAULT_URL_EXPIRES_IN])[0])
        if not 1 <= value <= MAX_URL_EXPIRES_IN:
            raise ValueError(f"expires_in must be between 1 and {MAX_URL_EXPIRES_IN}")
        return value

    def _content_type(self, key: str) -> str:
        try:
            return self.store.type_path(key).read_text().strip() or "application/octet-stream"
        except FileNotFoundError:
            return "application/octet-stream"

    # -- verbs -------------------------------------------------------------------

    def do_GET(self) -> None:
        try:
            key, query = self._target()
        except ValueError as exc:
            self._refuse(404, str(exc))
            return
        if key is None:
            if self.store.token_is_valid(self.headers.get("Authorization")):
                self._send_json(200, {"service": "nanobanana-loopback-store"})
            else:
                self._refuse(401, "missing or wrong upload token")
            return
        self._serve(key, query, with_body=True)

    def do_HEAD(self) -> None:
        try:
            key, query = self._target()
            if key is None:
                raise ValueError("HEAD needs an object key")
        except ValueError as exc:
            self._refuse(404, str(exc))
            return
        if not self.store.token_is_valid(self.headers.get("Authorization")):
            self._serve(key, query, with_body=False)
            return
        path = self.store.object_path(key)
        if not path.is_file():
            self._refuse(404, "no such object")
            return
        try:
            signed = self.store.sign_url(key, self._expires_in(query))
        except ValueError as exc:
            self._refuse(400, str(exc))
            return
        self.send_response(200)
        self.send_header("Content-Type", self._content_type(key))
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("X-Signed-Url", signed)
        self.end_headers()

    def _serve(self, key: str, query: dict[str, list[str]], *, with_body: bool) -> None:
        expires = query.get("expires", [""])[0]
        signature = query.get("signature", [""])[0]
        if not self.store.signature_is_valid(key, expires, signature):
            self._refuse(403, "missing, invalid or expired signature")
            return
        path = self.store.object_path(key)
        try:
            handle = path.open("rb")
        except (FileNotFoundError, IsADirectoryError):
            self._refuse(404, "no such object")
            return
        with handle:
            self.send_response(200)
            self.send_header("Content-Type", self._content_type(key))
            self.send_header("Content-Length", str(os.fstat(handle.fileno()).st_size))
            self.end_headers()
            if with_body:
                shutil.copyfileobj(handle, self.wfile, _CHUNK)

    def do_PUT(self) -> None:
        try:
            key, query = self._target()
            if key is None:
                raise ValueError("PUT needs an object key")
        except ValueError as exc:
            self._refuse(404, str(exc))
            return
        if not self.store.token_is_valid(self.headers.get("Authorization")):
            self._refuse(401, "missing or wrong upload token")
            return
        declared_length = self.headers.get("Content-Length", "")
        if not declared_length.isdigit():
            self._refuse(411, "a Content-Length header is required")
            return
        length = int(declared_length)
        try:
            expires_in = self._expires_in(query)
        except ValueError as exc:
            self._refuse(400, str(exc))
            return
        if length > self.store.max_object_bytes:
            self._refuse(413, f"object larger than {self.store.max_object_bytes} bytes")
            return
        content_type = self.headers.get("Content-Type") or "application/octet-stream"
        # The type goes first: once the object is renamed into place it can be served.
        self.store.type_path(key).parent.mkdir(parents=True, exist_ok=True)
        self.store.type_path(key).write_text(content_type)
        digest = self._receive(key, length)
        if digest is None:
            self._refuse(400, "body shorter than Content-Length")
            return
        self._send_json(
            201,
            {
                "key": key,
                "url": self.store.sign_url(key, expires_in),
                "size": length,
                "sha256": digest,
                "content_type": content_type,
                "expires": int(time.time()) + expires_in,
            },
        )

    def _receive(self, key: str, length: int) -> str | None:
        """Stream ``length`` body bytes to the object's file; its sha256, or None if cut short."""
        target = self.store.object_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        hasher = hashlib.sha256()
        remaining = length
        try:
            with temp.open("wb") as handle:
                while remaining:
                    chunk = self.rfile.read(min(_CHUNK, remaining))
                    if not chunk:
                        return None
                    hasher.update(chunk)
                    handle.write(chunk)
                    remaining -= len(chunk)
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
        return hasher.hexdigest()
