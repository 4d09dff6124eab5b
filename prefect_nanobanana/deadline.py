"""Wall-clock deadlines for HTTP calls, whatever pace the server sets.

httpx's timeouts are per operation: a server that drips one byte a second never
trips a 30 s read timeout, and a call can last for ever. :func:`call_deadline`
sets a deadline for everything a thread or task sends and reads until it ends;
:func:`install_deadlines` wraps httpcore's network backend of an httpx client so
that every connect, TLS handshake, write and read gets at most what is left of it.

Deadlines nest and the earliest wins: a deadline set inside another, or given an
``until`` (the end of a caller's wait, or of a call's retries), can only shorten
what is left, never extend it. That is how an attempt gets no more than what is
left of its call and of the wait it polls for. The client (each API call, retries
included) and the archive (each output's download, retries included) both use
it; it knows nothing of either.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import httpcore
import httpx

_deadline: ContextVar[float | None] = ContextVar("runcomfy_call_deadline", default=None)


@contextlib.contextmanager
def call_deadline(seconds: float | None, *, until: float | None = None) -> Iterator[float | None]:
    """Every network operation of this thread or task ends within ``seconds`` from now.

    Args:
        seconds: How long from now; None sets no bound of its own.
        until: A ``time.monotonic()`` instant that bounds it too (a wait's end).

    Returns:
        A context manager yielding the deadline in force (a ``time.monotonic()``
        instant, or None when nothing bounds it): the earliest of ``seconds`` from
        now, ``until`` and any deadline already set around it.
    """
    bounds = [_deadline.get(), until, None if seconds is None else time.monotonic() + seconds]
    deadline = min((bound for bound in bounds if bound is not None), default=None)
    token = _deadline.set(deadline)
    try:
        yield deadline
    finally:
        _deadline.reset(token)


def seconds_left(deadline: float | None) -> float | None:
    """What is left of ``deadline`` (a ``time.monotonic()`` instant), never below 0."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


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


def _is_readable(sock: socket.socket) -> bool:
    """Whether a read of ``sock`` would not wait: data, or the peer's close (how httpcore
    tells an idle connection the server dropped); a closed socket counts as readable."""
    descriptor = sock.fileno()
    if descriptor < 0:
        return True
    poller = select.poll()
    poller.register(descriptor, select.POLLIN)
    return bool(poller.poll(0))


class _AsyncDeadlineStream(httpcore.AsyncNetworkStream):
    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream
        # httpcore asks each idle connection of the pool whether it is readable, on every
        # request; anyio answers by making all of the socket's attributes afresh, a
        # getpeername() each time. The socket itself does not change: kept once.
        self._socket: socket.socket | None = stream.get_extra_info("socket")

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
        if info == "is_readable" and self._socket is not None:
            return _is_readable(self._socket)
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
