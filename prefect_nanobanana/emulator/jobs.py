"""The job table, the FIFO queue and the workers that run jobs like the real model.

A job's life: `in_queue` until one of `workers` threads is free (FIFO), then
`in_progress` while the worker fetches every input URL (as the real service
does, so pre-signed URLs are really exercised) or decodes it when it is an
inline `data:` URI, checks they are images and renders the outputs from the
first one, then `completed` or `failed` once its drawn duration has
passed. Only a queued job can be cancelled.

One lock guards the table and the queue; everything slow (HTTP fetches,
Pillow, waiting out the duration) happens outside it, so polls stay fast while
hundreds of jobs run.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlsplit

import httpx

from ..client.models import NanoBananaEditInput
from ..errors import NanoBananaError
from .config import EmulatorConfig
from .faults import FaultInjector
from .images import (
    InputImage,
    decode_data_uri,
    describe_data_uri,
    output_size,
    read_input_image,
    render_output,
)
from .stats import JobTableSummary, StatsRecorder

logger = logging.getLogger("prefect_nanobanana.emulator")

# Third-party reported run times of Nano Banana Pro: (mean, p95) seconds per resolution.
REPORTED_LATENCY_SECONDS: dict[str, tuple[float, float]] = {
    "1K": (17.5, 25.0),
    "2K": (35.0, 50.0),
    "4K": (60.0, 90.0),
}
_Z95 = 1.6448536269514722  # the standard normal's 95th percentile


def _lognormal_parameters(mean: float, p95: float) -> tuple[float, float]:
    """(mu, sigma) of the lognormal with this mean and 95th percentile.

    Run times are positive and right-skewed, which a lognormal captures with two
    numbers; solving mean = exp(mu + sigma²/2) and p95 = exp(mu + z95·sigma)
    for sigma gives the smaller root of a quadratic.
    """
    sigma = _Z95 - math.sqrt(_Z95**2 - 2 * math.log(p95 / mean))
    return math.log(mean) - sigma**2 / 2, sigma


_DURATION_PARAMETERS = {
    resolution: _lognormal_parameters(mean, p95)
    for resolution, (mean, p95) in REPORTED_LATENCY_SECONDS.items()
}


def draw_run_seconds(rng: random.Random, resolution: str) -> float:
    """One run time of a job at `resolution`, in the model's seconds (unscaled).

    The emulator draws its jobs' durations here, and benchmarks draw from the very
    same distribution, so a simulated job and an emulated one are alike.
    """
    mu, sigma = _DURATION_PARAMETERS[resolution]
    return rng.lognormvariate(mu, sigma)


class InsufficientBalance(NanoBananaError):
    """A submit would spend more than the configured balance."""


class InputImageError(NanoBananaError):
    """An input URL could not be fetched or is not an image; the message is safe to publish."""


def public_url(url: str) -> str:
    """The URL without query, fragment or credentials: pre-signed signatures must never leak."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _utc(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc)


@dataclass(eq=False)
class _Job:
    """A job's mutable state; read and written only under `JobManager._lock`.

    Compared by identity (eq=False): the queue removes and indexes jobs by identity.
    """

    request_id: str
    owner: str
    edit: NanoBananaEditInput
    duration_seconds: float
    cost_usd: float
    fault: str | None
    created_at: float
    created_clock: float
    status: str = "in_queue"
    started_at: float | None = None
    started_clock: float | None = None
    finished_at: float | None = None
    finished_clock: float | None = None
    error: str | None = None
    output_size: tuple[int, int] | None = None
    outputs: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class JobInfo:
    """A consistent snapshot of one job: what `EmulatorServer.job()` returns.

    `duration_seconds` is the drawn run time (already scaled); `queue_wait_seconds`
    is known once the job started. `expired` means its result and files now 404.
    """

    request_id: str
    status: str
    resolution: str
    aspect_ratio: str
    output_format: str
    num_images: int
    sync_mode: bool
    prompt: str
    image_urls: tuple[str, ...]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_seconds: float
    queue_wait_seconds: float | None
    queue_position: int | None
    cost_usd: float
    error: str | None
    fault: str | None
    expired: bool
    output_size: tuple[int, int] | None
    owner: str = field(repr=False)
    outputs: tuple[bytes, ...] = field(repr=False)


class JobManager:
    """Owns the jobs: accepts them, queues them FIFO and runs `config.workers` at once."""

    def __init__(self, config: EmulatorConfig, faults: FaultInjector, stats: StatsRecorder) -> None:
        self._config = config
        self._faults = faults
        self._stats = stats
        self._lock = threading.Lock()
        self._work_available = threading.Condition(self._lock)
        self._jobs: dict[str, _Job] = {}
        self._queue: deque[_Job] = deque()
        self._in_progress = 0
        self._peak_in_progress = 0
        self._spent_usd = 0.0
        self._rng = random.Random(config.seed)
        self._stopping = threading.Event()
        # While held, queued jobs stay queued: a test reads "queued" and it stays true.
        self._held = False
        self._http = httpx.Client(
            follow_redirects=True,
            timeout=config.input_fetch_timeout_seconds,
            # A worker fetches one input at a time, so no fetch ever waits for a pooled connection.
            limits=httpx.Limits(max_connections=config.workers),
            headers={"User-Agent": "runcomfy-emulator"},
        )
        self._threads = [
            threading.Thread(target=self._work, name=f"emulator-worker-{number}", daemon=True)
            for number in range(config.workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the workers without finishing their jobs; returns within about a second."""
        with self._lock:
            self._stopping.set()
            self._work_available.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=1.0)
        self._http.close()

    def submit(self, owner: str, edit: NanoBananaEditInput) -> str:
        """Create a job (billed now, like the real service) and queue it; its request id."""
        cost = self._config.cost_usd(edit.resolution, edit.num_images)
        with self._lock:
            balance = self._config.balance_usd
            if balance is not None and self._spent_usd + cost > balance + 1e-9:
                raise InsufficientBalance(
                    f"Insufficient balance: this request costs ${cost:.2f}, "
                    f"${max(0.0, balance - self._spent_usd):.2f} left"
                )
            fault = self._faults.on_job()
            job = _Job(
                request_id=str(uuid.uuid4()),
                owner=owner,
                edit=edit,
                duration_seconds=self._draw_duration(edit.resolution),
                cost_usd=cost,
                fault=None if fault is None else fault.kind,
                created_at=time.time(),
                created_clock=time.monotonic(),
            )
            self._spent_usd += cost
            self._jobs[job.request_id] = job
            # A stuck job stays in_queue without ever entering the FIFO the workers read.
            if job.fault != "stuck":
                self._queue.append(job)
                self._work_available.notify()
        if fault is not None:
            self._stats.record_faults([fault])
        return job.request_id

    def info(self, request_id: str) -> JobInfo | None:
        """A snapshot of the job, or None when the id is unknown."""
        with self._lock:
            job = self._jobs.get(request_id)
            if job is None:
                return None
            expired = self._expired(job)
            if expired:
                job.outputs = ()  # free the memory; nobody may fetch them any more
            return JobInfo(
                request_id=job.request_id,
                status=job.status,
                resolution=job.edit.resolution,
                aspect_ratio=job.edit.aspect_ratio,
                output_format=job.edit.output_format,
                num_images=job.edit.num_images,
                sync_mode=job.edit.sync_mode,
                prompt=job.edit.prompt,
                image_urls=tuple(job.edit.image_urls),
                created_at=datetime.fromtimestamp(job.created_at, timezone.utc),
                started_at=_utc(job.started_at),
                finished_at=_utc(job.finished_at),
                duration_seconds=job.duration_seconds,
                queue_wait_seconds=None
                if job.started_clock is None
                else job.started_clock - job.created_clock,
                queue_position=self._queue_position(job),
                cost_usd=job.cost_usd,
                error=job.error,
                fault=job.fault,
                expired=expired,
                output_size=job.output_size,
                owner=job.owner,
                outputs=job.outputs,
            )

    def cancel(self, request_id: str) -> tuple[str, str]:
        """Cancel a queued job: (outcome, status after the attempt). Cancelling refunds it."""
        with self._lock:
            job = self._jobs[request_id]
            if job.status != "in_queue":
                return "not_cancellable", job.status
            if job in self._queue:
                self._queue.remove(job)
            job.status = "cancelled"
            job.finished_at, job.finished_clock = time.time(), time.monotonic()
            self._spent_usd -= job.cost_usd
            return "cancelled", job.status

    def request_ids(self) -> list[str]:
        """Every request id issued, in the order of their submits."""
        with self._lock:
            return list(self._jobs)

    def hold_queue(self, held: bool) -> None:
        """Hold the queue (no queued job starts) or let it go on."""
        with self._lock:
            self._held = held
            self._work_available.notify_all()

    def summary(self) -> JobTableSummary:
        with self._lock:
            return JobTableSummary(
                jobs_by_status=dict(Counter(job.status for job in self._jobs.values())),
                peak_in_progress=self._peak_in_progress,
                spent_usd=round(self._spent_usd, 6),
            )

    def reset_peak(self) -> None:
        with self._lock:
            self._peak_in_progress = self._in_progress

    def _draw_duration(self, resolution: str) -> float:
        if self._config.fixed_duration_seconds is not None:
            return self._config.fixed_duration_seconds
        return draw_run_seconds(self._rng, resolution) * self._config.time_scale

    def _queue_position(self, job: _Job) -> int | None:
        if job.status != "in_queue":
            return None
        if job.fault == "stuck":
            return len(self._queue) + 1  # always behind everything: it never starts
        return self._queue.index(job) + 1

    def _expired(self, job: _Job) -> bool:
        if job.finished_clock is None:
            return False
        ttl = 0.0 if job.fault == "expire_output" else self._config.output_ttl_seconds
        return ttl is not None and time.monotonic() >= job.finished_clock + ttl

    def _work(self) -> None:
        while True:
            with self._lock:
                while (not self._queue or self._held) and not self._stopping.is_set():
                    self._work_available.wait()
                if self._stopping.is_set():
                    return
                job = self._queue.popleft()
                job.status = "in_progress"
                job.started_at, job.started_clock = time.time(), time.monotonic()
                self._in_progress += 1
                self._peak_in_progress = max(self._peak_in_progress, self._in_progress)
                deadline = job.started_clock + job.duration_seconds
            self._run(job, deadline)

    def _run(self, job: _Job, deadline: float) -> None:
        """Do the work, wait out the rest of the drawn duration, then publish the outcome.

        The job ends at max(deadline, work done), so rendering time does not add
        to the drawn duration unless rendering alone takes longer.
        """
        size: tuple[int, int] | None = None
        outputs: tuple[bytes, ...] = ()
        error: str | None = None
        try:
            inputs = [
                self._fetch_input(url, keep_pixels=position == 0)
                for position, url in enumerate(job.edit.image_urls)
            ]
            if job.fault == "fail_job":
                error = "Generation failed (emulated fault: fail_job)"
            else:
                size = output_size(job.edit.aspect_ratio, job.edit.resolution, inputs[0].size)
                outputs = tuple(
                    render_output(
                        job.edit.prompt,
                        index,
                        size,
                        job.edit.output_format,
                        self._config.output_min_bytes,
                        source=inputs[0],
                    )
                    for index in range(job.edit.num_images)
                )
        except InputImageError as exc:
            error = str(exc)
        except Exception:
            # An emulator bug must not leave a job in_progress forever: fail it loudly.
            logger.exception("Emulator failed while running job %s", job.request_id)
            error = "Internal error in the emulator (see its log)"
        if self._stopping.wait(max(0.0, deadline - time.monotonic())):
            return
        with self._lock:
            job.status = "failed" if error else "completed"
            job.error = error
            job.output_size = size
            job.outputs = outputs
            job.finished_at, job.finished_clock = time.time(), time.monotonic()
            self._in_progress -= 1

    def _fetch_input(self, url: str, *, keep_pixels: bool) -> InputImage:
        """Fetch (or, for a `data:` URI, decode) one input like the real service and check it.

        `keep_pixels` decodes the image at a small size: the first input is what
        the outputs are made from.
        """
        if url.startswith("data:"):
            shown = describe_data_uri(url)
            self._stats.record_fetch(shown)  # a data URI can be megabytes: never kept whole
            try:
                _media_type, content = decode_data_uri(url)
            except ValueError as exc:
                raise InputImageError(f"Input {shown} is not usable: {exc}") from None
        else:
            shown = public_url(url)
            self._stats.record_fetch(url)
            content = self._download(url, shown)
        try:
            return read_input_image(content, keep_pixels=keep_pixels)
        except ValueError as exc:
            raise InputImageError(f"Input {shown} is not an image: {exc}") from None

    def _download(self, url: str, shown: str) -> bytes:
        if urlsplit(url).scheme not in ("http", "https"):
            raise InputImageError(f"Input image {shown} is not an http(s) URL")
        try:
            response = self._http.get(url)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            # The exception text may quote the full URL, signature included: name the type only.
            raise InputImageError(
                f"Could not fetch input image {shown} ({type(exc).__name__})"
            ) from None
        if response.status_code != 200:
            raise InputImageError(
                f"Could not fetch input image {shown}: HTTP {response.status_code}"
            )
        return response.content
