"""The HTTP face of the emulator: the RunComfy Model API on a loopback port.

A real server on a real socket, not a mock transport: the client's connection
handling, timeouts, keep-alive, dropped connections and Retry-After parsing are
exercised exactly as against the provider. The stdlib `ThreadingHTTPServer`
is enough (one thread per connection, HTTP/1.1 keep-alive) and adds no
dependency; every answer carries a Content-Length so connections are reused.

Control endpoints (no auth), for an emulator running in another process:
`GET /_emulator/stats`, `POST /_emulator/faults` (body: `FaultPlan.to_json()` or
`{"spec": "..."}`), `POST /_emulator/reset`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import sys
import threading
from collections.abc import Iterable
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import ValidationError

from ..client.models import NanoBananaEditInput
from ..client.vocabulary import MEDIA_TYPES, NANO_BANANA_EDIT_MODEL_ID
from .config import EmulatorConfig
from .faults import Fault, FaultInjector, FaultPlan, plan_of
from .images import data_uri
from .jobs import InsufficientBalance, JobInfo, JobManager
from .stats import EmulatorStats, StatsRecorder

logger = logging.getLogger("prefect_nanobanana.emulator")

_REQUEST_ID = r"(?P<request_id>[^/]+)"
# (method, path pattern, endpoint); endpoints starting with "_" are control endpoints.
_ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("POST", re.compile(r"/v1/models/(?P<model_id>.+)"), "submit"),
    ("GET", re.compile(r"/v1/models/(?P<model_id>.+)"), "model"),
    ("GET", re.compile(rf"/v1/requests/{_REQUEST_ID}/status"), "status"),
    ("GET", re.compile(rf"/v1/requests/{_REQUEST_ID}/result"), "result"),
    ("POST", re.compile(rf"/v1/requests/{_REQUEST_ID}/cancel"), "cancel"),
    ("GET", re.compile(rf"/files/{_REQUEST_ID}/(?P<index>\d+)\.(?P<ext>\w+)"), "output"),
    ("GET", re.compile(r"/_emulator/stats"), "_stats"),
    ("POST", re.compile(r"/_emulator/faults"), "_faults"),
    ("POST", re.compile(r"/_emulator/reset"), "_reset"),
)
# The stats name the file endpoint "output", the fault plans "files" (as in the URL).
_FAULT_ENDPOINTS = {"output": "files"}


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


class _Emulator:
    """Everything a request handler needs, shared by all connection threads."""

    def __init__(self, config: EmulatorConfig, base_url: str) -> None:
        self.config = config
        self.base_url = base_url
        self.stats = StatsRecorder()
        self.faults = FaultInjector(config.faults, config.seed)
        self.jobs = JobManager(config, self.faults, self.stats)
        self.stopping = threading.Event()

    def snapshot(self) -> EmulatorStats:
        return self.stats.snapshot(self.jobs.summary())

    def reset_stats(self) -> None:
        self.stats.reset()
        self.jobs.reset_peak()


class _Server(ThreadingHTTPServer):
    """Daemon connection threads, a deep backlog and a registry of open connections.

    The backlog matters: the default of 5 makes a burst of 200 clients wait
    for SYN retransmits (a second or more). The registry lets `stop` close idle
    keep-alive connections, whose threads would otherwise block in a read.
    """

    daemon_threads = True
    request_queue_size = 1024
    emulator: _Emulator  # set by `EmulatorServer.start` once the port (hence base URL) is known

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the peer
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            # A client that timed out (e.g. on a slow fault) and left: its business, not a bug.
            logger.debug("Client %s went away before its answer", client_address)
        else:
            logger.exception("Emulator failed to handle a request from %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    """One connection; each request is routed, counted, exposed to faults and answered."""

    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "RunComfyEmulator/1.0"
    disable_nagle_algorithm = True  # headers and body go out as two writes; no 40 ms stalls
    timeout = 120  # idle keep-alive connections are closed after this many seconds

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    @property
    def app(self) -> _Emulator:
        return self.server.emulator

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send_json(
                411, {"error_message": "Send a Content-Length; chunked bodies are not supported"}
            )
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.app.config.max_request_bytes:
            self._refuse_large_body(length)
            return
        body = self.rfile.read(length)
        url = urlsplit(self.path)
        allowed = []
        for route_method, pattern, endpoint in _ROUTES:
            match = pattern.fullmatch(url.path)
            if match is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            params = match.groupdict()
            if endpoint.startswith("_"):
                self._control(endpoint, body)
            else:
                self._api(endpoint, params, parse_qs(url.query), body)
            return
        if allowed:
            self._send_json(
                405, {"error_message": f"Use {' or '.join(allowed)}"}, {"Allow": ", ".join(allowed)}
            )
        else:
            self._send_json(404, {"error_message": f"No route for {method} {url.path}"})

    def _refuse_large_body(self, length: int) -> None:
        """Answer 413 after draining the body (a client still sending would see a reset)."""
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1024 * 1024))
            if not chunk:
                self.close_connection = True
                return
            remaining -= len(chunk)
        limit = self.app.config.max_request_bytes
        self._send_error(
            413,
            422001,
            f"Request body of {length} bytes exceeds {limit} bytes; "
            "send large images as URLs instead of inline data: URIs",
        )

    # -- the API -------------------------------------------------------------

    def _api(
        self, endpoint: str, params: dict[str, str], query: dict[str, list[str]], body: bytes
    ) -> None:
        app = self.app
        app.stats.record_call(endpoint, params.get("request_id"))
        decision = app.faults.on_call(_FAULT_ENDPOINTS.get(endpoint, endpoint))
        app.stats.record_faults(decision.fired)
        if decision.delay_seconds and app.stopping.wait(decision.delay_seconds):
            self.close_connection = True  # shutting down: do not keep a client waiting
            return
        failure = decision.failure
        if failure is not None and not failure.after_accept:
            self._send_fault(failure)
            return
        if endpoint == "submit":
            self._submit(params["model_id"], body, failure)
        elif endpoint == "model":
            self._model(params["model_id"])
        elif endpoint == "output":
            self._output(params["request_id"], int(params["index"]), params["ext"])
        else:
            self._request_call(endpoint, params["request_id"], query)

    def _submit(self, model_id: str, body: bytes, after_accept: Fault | None) -> None:
        app = self.app
        token = self._authenticate()
        if token is None:
            return
        if model_id != NANO_BANANA_EDIT_MODEL_ID:
            self._send_error(
                400, 400001, f"Invalid resource identifier: unknown model {model_id!r}"
            )
            return
        try:
            payload = json.loads(body or b"null")
        except ValueError:
            detail = [{"loc": ["body"], "msg": "Body is not valid JSON", "type": "json_invalid"}]
            self._send_error(422, 422001, "Validation error", detail)
            return
        try:
            edit = NanoBananaEditInput.model_validate(payload)
        except ValidationError as exc:
            detail = [
                {"loc": ["body", *error["loc"]], "msg": error["msg"], "type": error["type"]}
                for error in exc.errors()
            ]
            self._send_error(422, 422001, "Validation error", detail)
            return
        try:
            request_id = app.jobs.submit(token, edit)
        except InsufficientBalance as exc:
            self._send_error(400, 400002, str(exc))
            return
        app.stats.record_submit_accepted()
        if after_accept is not None:
            self._send_fault(after_accept)
            return
        self._send_json(
            200,
            {
                "request_id": request_id,
                "status_url": self._request_url(request_id, "status"),
                "result_url": self._request_url(request_id, "result"),
                "cancel_url": self._request_url(request_id, "cancel"),
            },
        )

    def _model(self, model_id: str) -> None:
        if self._authenticate() is None:
            return
        if model_id != NANO_BANANA_EDIT_MODEL_ID:
            self._send_error(
                400, 400001, f"Invalid resource identifier: unknown model {model_id!r}"
            )
            return
        prices = self.app.config.price_per_image_usd
        self._send_json(
            200,
            {
                "model_id": model_id,
                "base_price_usd": prices["1K"],
                "price_unit": "image",
                "pricing_note": (
                    f"${prices['1K']:.2f} per image at 1K, ${prices['2K']:.2f} at 2K, "
                    f"${prices['4K']:.2f} at 4K (emulator prices)"
                ),
            },
        )

    def _request_call(self, endpoint: str, request_id: str, query: dict[str, list[str]]) -> None:
        """status, result and cancel: all need the caller to own the request."""
        token = self._authenticate()
        if token is None:
            return
        job = self.app.jobs.info(request_id)
        if job is None:
            self._send_error(404, 404001, f"Request {request_id} not found, deleted or expired")
            return
        if job.owner != token:
            self._send_error(403, 403001, f"Permission denied for request {request_id}")
            return
        if endpoint == "status":
            self._send_json(200, self._status_body(job))
        elif endpoint == "result":
            self._result(job, query)
        else:
            self._cancel(job)

    def _status_body(self, job: JobInfo) -> dict[str, Any]:
        body: dict[str, Any] = {"request_id": job.request_id, "status": job.status}
        if job.queue_position is not None:
            body["queue_position"] = job.queue_position
        body["status_url"] = self._request_url(job.request_id, "status")
        body["result_url"] = self._request_url(job.request_id, "result")
        return body

    def _result(self, job: JobInfo, query: dict[str, list[str]]) -> None:
        if job.expired:
            self._send_error(404, 404001, f"Request {job.request_id} not found, deleted or expired")
            return
        body: dict[str, Any] = {"request_id": job.request_id, "status": job.status}
        if job.queue_position is not None:
            body["queue_position"] = job.queue_position
        completed = job.status == "completed"
        body.update(
            output=self._output_body(job) if completed else None,
            created_at=_iso(job.created_at),
            finished_at=_iso(job.finished_at),
            error=job.error,
        )
        if completed and query.get("include_cost", [""])[-1].lower() in ("true", "1"):
            body["cost"] = job.cost_usd
        self._send_json(200, body)

    def _output_body(self, job: JobInfo) -> dict[str, Any]:
        if job.sync_mode:
            urls = [data_uri(data, job.output_format) for data in job.outputs]
        else:
            urls = [
                f"{self.app.base_url}/files/{job.request_id}/{index}.{job.output_format}"
                for index in range(len(job.outputs))
            ]
        return {"image": urls[0]} if job.num_images == 1 else {"images": urls}

    def _cancel(self, job: JobInfo) -> None:
        app = self.app
        outcome, status = app.jobs.cancel(job.request_id)
        app.stats.record_cancel_outcome(outcome)
        self._send_json(200, {"request_id": job.request_id, "status": status, "outcome": outcome})

    def _output(self, request_id: str, index: int, ext: str) -> None:
        """A file, like a CDN URL: no auth, gone once the request expired."""
        job = self.app.jobs.info(request_id)
        if (
            job is None
            or job.status != "completed"
            or job.sync_mode  # sync mode keeps nothing in the request history
            or job.expired
            or ext != job.output_format
            or index >= len(job.outputs)
        ):
            self._send_json(404, {"error_message": "Not found"})
            return
        self._send(200, job.outputs[index], MEDIA_TYPES[job.output_format])

    # -- control ---------------------------------------------------------------

    def _control(self, endpoint: str, body: bytes) -> None:
        app = self.app
        if endpoint == "_stats":
            self._send_json(200, app.snapshot().to_json())
        elif endpoint == "_reset":
            app.reset_stats()
            self._send_json(200, {"reset": True})
        else:
            try:
                plan = FaultPlan.from_json(body.decode("utf-8") or "{}")
            except (ValueError, TypeError) as exc:
                self._send_json(400, {"error_message": f"Invalid fault plan: {exc}"})
                return
            app.faults.set_plan(plan)
            self._send_json(200, {**plan.to_json(), "spec": plan.to_spec()})

    # -- answers ---------------------------------------------------------------

    def _authenticate(self) -> str | None:
        """The caller's token, or None after answering 400004 (HTTP 401, or 200 if configured)."""
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token in self.app.config.api_tokens:
            return token
        status = 200 if self.app.config.auth_errors_as_http_200 else 401
        self._send_error(
            status, 400004, "User account error: missing, expired or revoked API token"
        )
        return None

    def _request_url(self, request_id: str, action: str) -> str:
        return f"{self.app.base_url}/v1/requests/{request_id}/{action}"

    def _send_fault(self, fault: Fault) -> None:
        if fault.kind == "drop":
            # No answer at all: the client sees the connection close mid-request.
            self.close_connection = True
        elif fault.kind == "rate_limit":
            headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            self._send_json(429, {"error_message": "Too many requests (emulated)"}, headers)
        else:
            self._send_error(
                fault.status_code or 500,
                500001,
                "Internal error (emulated); retry with exponential backoff",
            )

    def _send_error(
        self, status: int, error_code: int, message: str, detail: list[dict[str, Any]] | None = None
    ) -> None:
        body: dict[str, Any] = {"error_code": error_code, "error_message": message}
        if detail is not None:
            body["detail"] = detail
        self._send_json(status, body)

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(body).encode("utf-8"), "application/json", headers)

    def _send(
        self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class EmulatorServer:
    """A RunComfy Model API emulator on a loopback port, with its workers.

    Use it as a context manager, or `start()` / `stop()`. `port=0` picks a free
    port; `base_url` is known once started. Stopping closes every connection and
    returns quickly, so tests can start and stop many emulators.
    """

    def __init__(
        self, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config or EmulatorConfig()
        self.host = host
        self._requested_port = port
        self._server: _Server | None = None
        self._emulator: _Emulator | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> EmulatorServer:
        if self._server is not None:
            raise RuntimeError("the emulator was already started")
        server = _Server((self.host, self._requested_port))
        # A wildcard bind is reachable on loopback; URLs handed to clients must be dialable.
        url_host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        emulator = _Emulator(self.config, f"http://{url_host}:{server.server_address[1]}")
        server.emulator = emulator
        emulator.jobs.start()
        self._server, self._emulator = server, emulator
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"emulator-http-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and stop the workers; safe to call twice."""
        server, emulator, thread = self._server, self._emulator, self._thread
        if server is None or emulator is None or thread is None or not thread.is_alive():
            return
        emulator.stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join()
        emulator.jobs.stop()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def _running(self) -> _Emulator:
        if self._emulator is None:
            raise RuntimeError("the emulator is not started; call start() or use `with`")
        return self._emulator

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the emulator is not started; call start() or use `with`")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """Where clients point, e.g. "http://127.0.0.1:51234" (no trailing slash)."""
        return self._running.base_url

    @property
    def stats(self) -> EmulatorStats:
        """A snapshot of what the emulator has seen since start or the last reset."""
        return self._running.snapshot()

    @property
    def faults(self) -> FaultPlan:
        """The fault plan in force."""
        return self._running.faults.plan

    def job(self, request_id: str) -> JobInfo:
        """A snapshot of one job; KeyError for an id the emulator never issued."""
        info = self._running.jobs.info(request_id)
        if info is None:
            raise KeyError(request_id)
        return info

    def jobs(self) -> list[JobInfo]:
        """A snapshot of every job, in the order they were submitted."""
        return [self.job(request_id) for request_id in self._running.jobs.request_ids()]

    def hold_queue(self, held: bool = True) -> None:
        """Hold the queue: queued jobs stay queued (and cancellable) until released with
        `hold_queue(False)`; running ones go on. Lets a test say exactly which requests
        were queued at a moment of its choosing."""
        self._running.jobs.hold_queue(held)

    def set_faults(self, faults: FaultPlan | Iterable[Fault] | str | None) -> None:
        """Replace the fault plan (a plan, a list of faults, a spec string or None for none).

        Call numbers count from here, so `calls=[1]` means the next call.
        """
        self._running.faults.set_plan(plan_of(faults))

    def reset_stats(self) -> None:
        """Zero the counters (faults keep counting; set a plan again to restart them)."""
        self._running.reset_stats()
