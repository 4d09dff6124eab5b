"""The client's one transport: every call bounded in time and in size.

The API's answers are not ours to trust. Two bounds hold whatever the server does:

* **Size.** Every JSON answer is streamed and reading stops past a cap
  (:data:`MAX_ANSWER_BYTES`, 4 MiB; a status answer is under 1 KB, so the cap is
  generous and still keeps a hostile 300 MB answer out of memory). The result of
  a request this client submitted with ``sync_mode`` carries its outputs inline as
  data URIs, up to four images of up to ~40 MB encoded, so it gets
  :data:`MAX_INLINE_RESULT_BYTES` instead.
* **Time.** httpx's timeouts are per operation: a server that drips one byte a
  second never trips a 30 s read timeout. :func:`call_deadline` sets a wall-clock
  deadline for a whole call, and a wrapper around httpcore's network backend
  shortens the timeout of every connect, TLS handshake, write and read to what is
  left of it, so the call ends by its deadline however the server paces its bytes.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import httpcore
import httpx

MAX_ANSWER_BYTES = 4 * 1024 * 1024
MAX_INLINE_RESULT_BYTES = 256 * 1024 * 1024

_deadline: ContextVar[float | None] = ContextVar("runcomfy_call_deadline", default=None)


class AnswerTooLarge(Exception):
    """The answer grew past its cap; reading stopped there."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the answer is larger than the {limit}-byte limit")
        self.limit = limit


@contextlib.contextmanager
def call_deadline(seconds: float) -> Iterator[None]:
    """Every network operation of this thread or task ends within ``seconds`` from now."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def _budget(timeout: float | None, expired: type[Exception]) -> float | None:
    """The operation's own timeout, shortened to what is left of the call's deadline."""
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise expired("the call's deadline has passed")
    return remaining if timeout is None else min(timeout, remaining)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _budget(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _budget(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(
            self._stream.start_tls(
                ssl_context, server_hostname, _budget(timeout, httpcore.ConnectTimeout)
            )
        )

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(
            self._backend.connect_tcp(
                host, port, _budget(timeout, httpcore.ConnectTimeout), local_address, socket_options
            )
        )

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(
            self._backend.connect_unix_socket(
                path, _budget(timeout, httpcore.ConnectTimeout), socket_options
            )
        )

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _AsyncDeadlineStream(httpcore.AsyncNetworkStream):
    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._stream.read(max_bytes, _budget(timeout, httpcore.ReadTimeout))

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, _budget(timeout, httpcore.WriteTimeout))

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _AsyncDeadlineStream(
            await self._stream.start_tls(
                ssl_context, server_hostname, _budget(timeout, httpcore.ConnectTimeout)
            )
        )

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _AsyncDeadlineBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, backend: httpcore.AsyncNetworkBackend) -> None:
        self._backend = backend

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _AsyncDeadlineStream(
            await self._backend.connect_tcp(
                host, port, _budget(timeout, httpcore.ConnectTimeout), local_address, socket_options
            )
        )

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _AsyncDeadlineStream(
            await self._backend.connect_unix_socket(
                path, _budget(timeout, httpcore.ConnectTimeout), socket_options
            )
        )

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def install_deadlines(http: httpx.Client | httpx.AsyncClient) -> None:
    """Route every connection pool of ``http`` (proxy mounts included) through the deadline.

    httpx (pinned below 1.0) exposes no network-backend option, so the pools'
    backend attribute is wrapped in place. A pool without one would leave calls
    unbounded, so the default transport's missing it is an error, not a shrug.
    """
    wrapper = _AsyncDeadlineBackend if isinstance(http, httpx.AsyncClient) else _DeadlineBackend
    transports = [http._transport, *(t for t in http._mounts.values() if t is not None)]
    for index, transport in enumerate(transports):
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is None:
            if index == 0:
                raise RuntimeError(
                    "this httpx version hides its network backend; call deadlines cannot hold"
                )
            continue
        if not isinstance(backend, _DeadlineBackend | _AsyncDeadlineBackend):
            pool._network_backend = wrapper(backend)  # type: ignore[union-attr]


def _declared_too_large(response: httpx.Response, limit: int) -> bool:
    declared = response.headers.get("Content-Length", "")
    return declared.isdigit() and int(declared) > limit


def read_answer(response: httpx.Response, limit: int) -> bytes:
    """The streamed answer's body, or `AnswerTooLarge` as soon as it passes ``limit`` bytes."""
    if _declared_too_large(response, limit):
        raise AnswerTooLarge(limit)
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge(limit)
    return bytes(body)


async def aread_answer(response: httpx.Response, limit: int) -> bytes:
    """The async twin of :func:`read_answer`."""
    if _declared_too_large(response, limit):
        raise AnswerTooLarge(limit)
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge(limit)
    return bytes(body)
