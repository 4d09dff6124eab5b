"""S3 cost as batches grow: requests per row, and the time to the first paid submit.

A batch on S3 reads the ledger, stages inputs, writes ledger records, archives
outputs and metadata. At 20-50 ms a round trip (S3 from another region, or a
busy VPC endpoint), requests that run one after another before the first submit
decide how long a 5,000-row batch waits before it pays for anything.

The rig: moto's S3 server on loopback behind a loopback proxy that adds a fixed
round trip (`RTT_SECONDS`) to every request and counts them by kind (GET, HEAD,
PUT, LIST, POST; and apart, "API GET": the emulator fetching the staged inputs
through their pre-signed URLs, as RunComfy would, told apart by its user agent);
the emulator (fixed job duration, `WORKERS` workers); Prefect's temporary server.
Every row has its own small input image (a local file, staged to S3), the archive
and the ledger are on S3.

* At `FULL_ROWS` rows the whole `batch_edit` flow runs: S3 requests per row in
  all, and the time from the call to the first submit the emulator accepted. Once
  more without a staging store (the default: local inputs go inline as data:
  URIs), for the S3 requests of the archive and the ledger alone.
* At every size in `PLAN_ROWS`, the planning step alone (`aplan_batch`, what runs
  before the first submit: the ledger's listing, the inputs' checks and the
  staging store's) of a first run: its wall time and S3 requests. Each row stages
  its own input right before its submit, in the run.
* At every size in `PLAN_ROWS`, a dry run of the whole flow (`dry_run=True`) over a
  JSONL manifest: the flow run, reading the manifest, planning, the estimate; what the
  first submit waits for, less the lanes' start. The first submit at the largest
  size is that dry run plus what the full run spent between its own dry-run part
  and its first submit (measured at `FULL_ROWS`: the flow's concurrency slots, the
  first row's task run, its staging PUT and its claim).

* A prefix of `LISTED_OBJECTS` images as the batch (`images_uri`, issue 25), in the
  `listing` mode (`python -m bench.s3_scale listing`): the real flow,
  `batch_edit(images_uri=..., prompt=...)`, run in a subprocess and timed from its call
  (the wall clock the subprocess prints right before calling it) to the first submit
  the emulator accepted (that request's `created_at`, found through the ids the run's
  ledger recorded). A flow of 5,000 rows would take minutes to finish, so once that
  submit is in, the subprocess gets SIGTERM, the designed stop, as a worker or
  Kubernetes sends it: the seconds it then took to exit are reported (SIGKILL after
  `STOP_KILL_SECONDS`). Once on an empty archive, once on a rerun whose ledger holds
  every image but the `NEW_ON_RERUN` newest (listed last, so the rerun's first submit
  comes after the whole listing). Beside it, the keying alone, without the flow: the
  time from the start to a first row ready to submit: the prefix listed a page at a
  time, the ledger scanned once (its listing, alongside the first page), the row's job
  key made (its ETag in it), found new, and its input checked and signed (HEAD, ranged
  GET, pre-signed URL); on the same first run and rerun. And, for the lead: the same
  rows planned by today's whole-batch planning (`_plan_rows` + `_stage_rows`, every S3
  input checked before the first submit). The whole bench (without `listing`)
  measures the keying and the whole-batch planning of these rows, not the flow.

Goals: at most 4 S3 requests per row in all; the first submit within 5 s at 5,000 rows;
the listed flow's first submit within 5 s of its call at 5,000 objects, on a first run
(issue 25; the `listing` mode's verdict). The keying alone is reported, not judged: the
flow's figure is the one a user waits for.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from unittest import mock

from PIL import Image

from ._common import Verdict, print_header, table, write_results
from .batch_overhead import (
    EmulatorProcess,
    api_environment,
    poll_time_scale,
    prefect_server,
)

RTT_SECONDS = 0.020
FULL_ROWS = 500
PLAN_ROWS = (500, 5000)
WORKERS = 16
DURATION = 0.05  # each emulated job, seconds
BUCKET = "bench-s3-scale"
REQUESTS_GOAL = 4.0
FIRST_SUBMIT_GOAL = 5.0  # seconds, at the largest PLAN_ROWS
LISTED_OBJECTS = 5000
LISTED_PREFIX = f"incoming-{LISTED_OBJECTS}/"
LISTED_PROMPT = "listed scale"  # in every listed row's job key: the flow's must match ours
NEW_ON_RERUN = 2
LISTED_SUBMIT_GOAL = 5.0  # seconds, from the listed flow's call to its first submit (issue 25)
# Today's flow plans every row before any lane starts (minutes at 5,000 rows on a busy
# machine): a run that has not submitted after this long is stopped and reported as such.
FLOW_SUBMIT_TIMEOUT = 900.0
SUBMIT_POLL_SECONDS = 0.05  # how often the emulator's counters are read for a first submit
STOP_KILL_SECONDS = 60.0  # a flow still running this long after SIGTERM gets SIGKILL
ROOT = Path(__file__).resolve().parent.parent  # the tree the flow's subprocess imports from
CALLED = "listed flow called at"  # the subprocess's line: the wall clock of the call


class _LatencyProxy(ThreadingHTTPServer):
    """Forwards to moto after sleeping one round trip; counts requests by kind."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, upstream: str, rtt: float) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.rtt = rtt
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] += 1

    def take(self) -> Counter[str]:
        with self.lock:
            counts, self.counts = self.counts, Counter()
        return counts


class _ProxyHandler(BaseHTTPRequestHandler):
    server: _LatencyProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        listing = self.command == "GET" and "list-type=" in self.path
        ours = self.headers.get("User-Agent", "").lower().startswith(("boto3", "botocore"))
        kind = "LIST" if listing else self.command
        self.server.count(kind if ours else f"API {kind}")
        time.sleep(self.server.rtt)
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                    self.send_header(name, value)
            # A HEAD's length is the object's, not that of its (empty) body.
            length = answer.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


@dataclass
class Figures:
    rows: int
    phase: str
    seconds: float
    requests: dict[str, int]

    @property
    def per_row(self) -> float:
        """Ours: what the package sends."""
        return sum(n for kind, n in self.requests.items() if not kind.startswith("API")) / self.rows

    @property
    def per_row_in_all(self) -> float:
        """Ours and the API's reads of the staged inputs."""
        return sum(self.requests.values()) / self.rows


@contextlib.contextmanager
def s3_rig() -> Iterator[tuple[_LatencyProxy, Any]]:
    """moto's server behind the latency proxy; a boto3 client through the proxy."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    proxy = _LatencyProxy(f"http://{host}:{port}", RTT_SECONDS)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    environment = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    try:
        with mock.patch.dict(os.environ, environment):
            client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            proxy.take()
            yield proxy, client
    finally:
        proxy.shutdown()
        proxy.server_close()
        moto.stop()


def _draw_inputs(folder: Path, rows: int) -> list[Path]:
    """A distinct small PNG per row (content-addressed staging uploads each once)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in range(rows):
        path = folder / f"in-{row:05d}.png"
        if not path.exists():
            Image.new("RGB", (16, 16), (row % 256, (row // 256) % 256, 90)).save(path)
        paths.append(path)
    return paths


def _jobs(inputs: list[Path]) -> list[Any]:
    from prefect_nanobanana.flows.batch import BatchJob

    return [
        BatchJob(prompt=f"s3 scale {row}", images=[str(path)], id=f"row-{row}")
        for row, path in enumerate(inputs)
    ]


def measure_planning(proxy: _LatencyProxy, workdir: Path, rows: int) -> Figures:
    """The planning step alone: what stands between the call and the first submit."""
    import asyncio

    from prefect_nanobanana.flows.batch.plan import aplan_batch

    archive = f"s3://{BUCKET}/plan-{rows}/archive"
    jobs = _jobs(_draw_inputs(workdir / "inputs", rows))
    proxy.take()
    defaults = {"aspect_ratio": "auto", "resolution": "1K", "output_format": "png", "num_images": 1}
    began = time.perf_counter()
    asyncio.run(aplan_batch.fn(jobs, defaults, archive, f"s3://{BUCKET}/plan-{rows}/staging", None))
    return Figures(rows, "planning", time.perf_counter() - began, dict(proxy.take()))


def measure_dry_run(proxy: _LatencyProxy, workdir: Path, rows: int) -> Figures:
    """The flow up to the point where the first row would start: a dry run of it."""
    import asyncio

    from prefect_nanobanana.flows import batch_edit

    # A manifest, as a batch of thousands must be: Prefect refuses a flow run whose
    # parameters pass 512 KB, which 5,000 rows given as `jobs` do.
    manifest = workdir / f"manifest-{rows}.jsonl"
    manifest.write_text(
        "".join(
            job.model_dump_json(exclude_none=True) + "\n"
            for job in _jobs(_draw_inputs(workdir / "inputs", rows))
        )
    )
    proxy.take()
    began = time.perf_counter()
    asyncio.run(
        batch_edit(
            manifest_uri=str(manifest),
            archive_uri=f"s3://{BUCKET}/dry-{rows}/archive",
            staging_uri=f"s3://{BUCKET}/dry-{rows}/staging",
            max_concurrency=WORKERS,
            dry_run=True,
        )
    )
    return Figures(rows, "dry run", time.perf_counter() - began, dict(proxy.take()))


def measure_full(
    proxy: _LatencyProxy, emulator: EmulatorProcess, workdir: Path, rows: int, staged: bool = True
) -> tuple[Figures, float]:
    """The whole flow; its S3 requests and the seconds from the call to the first submit.

    `staged`: the inputs are uploaded to S3 for the API to fetch; else sent inline.
    """
    import asyncio

    from prefect_nanobanana.flows import batch_edit

    from .batch_overhead import first_submit

    jobs = _jobs(_draw_inputs(workdir / "inputs", rows))
    name = f"full-{rows}" if staged else f"inline-{rows}"
    proxy.take()
    began_wall, began = time.time(), time.perf_counter()
    result = asyncio.run(
        batch_edit(
            jobs=jobs,
            archive_uri=f"s3://{BUCKET}/{name}/archive",
            staging_uri=f"s3://{BUCKET}/{name}/staging" if staged else None,
            max_concurrency=WORKERS,
            concurrency_limit_name=f"bench-s3-scale-{rows}",
        )
    )
    seconds = time.perf_counter() - began
    counts = dict(proxy.take())
    assert result.archived == rows, (result.archived, result.failed)
    request_ids = [row.request_id for row in result.rows if row.request_id]
    head = asyncio.run(first_submit(emulator.base_url, request_ids)) - began_wall
    return Figures(rows, "full run" if staged else "full run, inline", seconds, counts), head


@dataclass
class ListingFigures:
    """A listed batch: seconds to a first row ready to submit, and to every row keyed."""

    objects: int
    phase: str
    first_ready_seconds: float
    all_keyed_seconds: float
    new_rows: int
    requests_to_first: dict[str, int]
    requests: dict[str, int]


def _direct_client(proxy: _LatencyProxy) -> Any:
    """A client straight to moto (no added round trip), to lay out the bench's data fast."""
    import boto3
    from botocore.config import Config

    host, port = proxy.upstream
    return boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        region_name="us-east-1",
        config=Config(max_pool_connections=32),
    )


def _fill_prefix(proxy: _LatencyProxy, prefix: str, first: int, count: int) -> None:
    """`count` distinct small PNGs under `prefix`, named in the order S3 lists them."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    direct = _direct_client(proxy)

    def put(number: int) -> None:
        image = io.BytesIO()
        Image.new("RGB", (16, 16), (number % 256, (number // 256) % 256, 40)).save(image, "PNG")
        direct.put_object(Bucket=BUCKET, Key=f"{prefix}img-{number:05d}.png", Body=image.getvalue())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(first, first + count)))


def _fill_ledger(proxy: _LatencyProxy, archive_key: str, job_keys: list[str]) -> None:
    """Archived ledger entries for `job_keys`, as an earlier run leaves them."""
    import datetime as dt
    from concurrent.futures import ThreadPoolExecutor

    from prefect_nanobanana.storage import LedgerEntry

    direct = _direct_client(proxy)
    now = dt.datetime.now(dt.timezone.utc)

    def put(job_key: str) -> None:
        entry = LedgerEntry(
            job_key=job_key,
            request_id=f"req-{job_key[:8]}",
            status="archived",
            submitted_at=now,
            updated_at=now,
            cost=0.15,
        )
        key = f"{archive_key}/_ledger/{job_key}.json"
        direct.put_object(Bucket=BUCKET, Key=key, Body=entry.model_dump_json().encode())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, job_keys))


# `batch_edit`'s defaults: the listed flow keys its rows with these, as the keying here does.
LISTING_DEFAULTS = {
    "aspect_ratio": "auto",
    "resolution": "1K",
    "output_format": "png",
    "num_images": 1,
}


def measure_first_listed_row(
    proxy: _LatencyProxy, uri: str, archive: str, phase: str
) -> ListingFigures:
    """Start to a first listed row ready to submit; then every row keyed against the scan."""
    from prefect_nanobanana.flows.batch.sources import key_listed_rows, listed_rows
    from prefect_nanobanana.storage import Ledger, stage_assets

    proxy.take()
    began = time.perf_counter()
    first_ready = math.nan
    to_first: dict[str, int] = {}
    new_rows = 0
    rows = listed_rows(uri, LISTED_PROMPT)
    for keyed in key_listed_rows(rows, LISTING_DEFAULTS, Ledger(archive)):
        if not keyed.new:
            continue  # archived earlier; its entry is read only to see whether it failed
        new_rows += 1
        if new_rows == 1:
            # What the row needs before its submit: its input checked and signed.
            staged = stage_assets(keyed.row.job.images, None, check_target=False)
            assert staged[0].url.startswith("http")
            first_ready = time.perf_counter() - began
            to_first = dict(proxy.take())
    all_keyed = time.perf_counter() - began
    counts = Counter(to_first) + proxy.take()
    return ListingFigures(
        LISTED_OBJECTS, phase, first_ready, all_keyed, new_rows, to_first, dict(counts)
    )


def measure_listed_whole_plan(proxy: _LatencyProxy, uri: str, archive: str) -> Figures:
    """The listed rows through today's planning: every S3 input checked before any submit."""
    from prefect_nanobanana.flows.batch.plan import _plan_rows, _stage_rows
    from prefect_nanobanana.flows.batch.sources import listed_rows
    from prefect_nanobanana.storage import Ledger
    from prefect_nanobanana.tasks.storage import ResolvedLocation

    proxy.take()
    began = time.perf_counter()
    jobs = [row.job for row in listed_rows(uri, LISTED_PROMPT)]
    ledger = Ledger(archive)
    plans = _plan_rows(jobs, LISTING_DEFAULTS, ledger)
    _stage_rows(plans, ResolvedLocation(None, None), dry_run=False)
    assert not [plan.error for plan in plans if plan.error][:1]
    return Figures(len(jobs), "listed, whole plan", time.perf_counter() - began, dict(proxy.take()))


def _done_on_rerun(uri: str) -> list[str]:
    """The job keys a rerun's ledger holds: every listed image but the newest few (they
    sort last), keyed as the flow keys them."""
    from prefect_nanobanana.flows.batch.sources import listed_job_key, listed_rows

    existing = LISTED_OBJECTS - NEW_ON_RERUN
    return [
        listed_job_key(row, LISTING_DEFAULTS)
        for _, row in zip(range(existing), listed_rows(uri, LISTED_PROMPT), strict=False)
    ]


def measure_listing(proxy: _LatencyProxy) -> tuple[list[ListingFigures], Figures]:
    """The listed-batch case: a first run, a rerun with a few new images, today's planning."""
    uri = f"s3://{BUCKET}/{LISTED_PREFIX}"
    _fill_prefix(proxy, LISTED_PREFIX, 0, LISTED_OBJECTS)
    first = measure_first_listed_row(
        proxy, uri, f"s3://{BUCKET}/listed-first/archive", "listed, first run"
    )
    print(
        f"  listed {LISTED_OBJECTS} objects: first row ready in "
        f"{first.first_ready_seconds:.2f} s, all keyed in {first.all_keyed_seconds:.1f} s",
        flush=True,
    )
    _fill_ledger(proxy, "listed-rerun/archive", _done_on_rerun(uri))
    rerun = measure_first_listed_row(
        proxy, uri, f"s3://{BUCKET}/listed-rerun/archive", "listed, rerun"
    )
    assert rerun.new_rows == NEW_ON_RERUN, rerun.new_rows
    print(
        f"  rerun with {NEW_ON_RERUN} new: first new row ready in "
        f"{rerun.first_ready_seconds:.2f} s",
        flush=True,
    )
    whole = measure_listed_whole_plan(proxy, uri, f"s3://{BUCKET}/listed-whole/archive")
    print(f"  today's whole-batch planning of the listed rows: {whole.seconds:.1f} s", flush=True)
    return [first, rerun], whole


@dataclass
class ListedFlowFigures:
    """The real flow over a listed prefix: its call to its first paid submit, and its stop.

    Wall-clock seconds (`time.time()` in the flow's subprocess and at the emulator, one
    machine, one clock). `own_first_submit_seconds` is the flow's own figure: the call to
    the `submitted_at` its ledger recorded for its first request, stamped once the
    submit's answer (the request id) was in hand.
    """

    objects: int
    phase: str
    new_rows: int  # rows the ledger did not hold: what the run has to pay for
    first_submit_seconds: float  # the call to the first submit the emulator accepted
    own_first_submit_seconds: float
    call_after_spawn_seconds: float  # interpreter start and imports, outside the figures
    exit_after_sigterm_seconds: float  # NaN when the run had ended before the SIGTERM
    killed: bool  # still running STOP_KILL_SECONDS after the SIGTERM
    exit_code: int | None
    requests_to_first: dict[str, int]  # S3 requests until the first submit was seen
    requests: dict[str, int]  # ... and until the subprocess exited


def listed_flow_child(images_uri: str, archive_uri: str, limit_name: str) -> None:
    """The listed flow, in the subprocess `measure_listed_flow` starts and stops.

    Prints the wall clock of the call first: the first submit is timed from it, not
    from the spawn, whose interpreter start and imports a deployed flow run does not
    wait for at its call.
    """
    import asyncio

    from prefect_nanobanana.flows import batch_edit

    print(f"{CALLED} {time.time()!r}", flush=True)
    asyncio.run(
        batch_edit(
            images_uri=images_uri,
            prompt=LISTED_PROMPT,
            archive_uri=archive_uri,
            max_concurrency=WORKERS,
            concurrency_limit_name=limit_name,
        )
    )


def _await_first_submit(emulator: EmulatorProcess, child: subprocess.Popen[bytes]) -> bool:
    """Whether the emulator accepted a submit before `FLOW_SUBMIT_TIMEOUT`.

    Its counters, not the run's ids: the run is stopped long before it returns any.
    """
    deadline = time.perf_counter() + FLOW_SUBMIT_TIMEOUT
    while time.perf_counter() < deadline:
        if emulator.stats()["submits_accepted"]:
            return True
        if child.poll() is not None:  # asked once more: it may have submitted, then ended
            return bool(emulator.stats()["submits_accepted"])
        time.sleep(SUBMIT_POLL_SECONDS)
    return False


def _stop(child: subprocess.Popen[bytes]) -> tuple[float, bool]:
    """SIGTERM, the designed stop; the seconds to exit, and whether SIGKILL was needed."""
    if child.poll() is not None:
        return math.nan, False
    child.send_signal(signal.SIGTERM)
    began = time.perf_counter()
    try:
        child.wait(timeout=STOP_KILL_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        return time.perf_counter() - began, True
    return time.perf_counter() - began, False


def measure_listed_flow(
    proxy: _LatencyProxy,
    emulator: EmulatorProcess,
    name: str,
    phase: str,
    new_rows: int,
    held: frozenset[str] = frozenset(),
) -> ListedFlowFigures:
    """`batch_edit` over the listed prefix in a subprocess, archiving under `name`, until
    its first accepted submit; then its SIGTERM stop. `held`: the job keys the archive's
    ledger holds already (`_fill_ledger`), whose entries name no real request."""
    import asyncio

    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH

    from prefect_nanobanana.storage import Ledger

    from .batch_overhead import first_submit

    archive = f"s3://{BUCKET}/{name}/archive"
    # A limit of its own: slots a stopped run still held would hold the next one back.
    arguments = [f"s3://{BUCKET}/{LISTED_PREFIX}", archive, f"bench-s3-{name}"]
    command = [
        sys.executable,
        "-c",
        "import sys; from bench.s3_scale import listed_flow_child; "
        "listed_flow_child(*sys.argv[1:])",
        *arguments,
    ]
    environment = {
        **os.environ,  # AWS_* to the proxy (s3_rig), RUNCOMFY_* to the emulator
        # Settings of this process (the temporary server's), not environment variables.
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_LOCAL_STORAGE_PATH": str(PREFECT_LOCAL_STORAGE_PATH.value()),
        # The package and the bench of this tree, ahead of any installed copy.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    emulator.reset()  # `submits_accepted` counts this run's only
    with TemporaryDirectory(prefix="bench-s3-flow-") as folder:
        # Files, not pipes: nobody reads the run's logs while it works, and a full pipe
        # would block it.
        stdout, stderr = Path(folder) / "stdout", Path(folder) / "stderr"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            proxy.take()
            spawned = time.time()
            child = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=out, stderr=err)
        try:
            submitted = _await_first_submit(emulator, child)
            to_first = dict(proxy.take())
            failed = not submitted and child.poll() is not None  # ended unasked, unpaid
            exit_after_sigterm, killed = _stop(child)
        finally:
            if child.poll() is None:  # the bench itself failed: leave no flow running
                child.kill()
                child.wait()
        counts = Counter(to_first) + proxy.take()
        output, errors = stdout.read_text(), stderr.read_text(errors="replace")
    calls = [line for line in output.splitlines() if line.startswith(CALLED)]
    if failed or not calls:
        raise RuntimeError(
            f"the listed flow ended before any submit (exit {child.returncode}): {errors[-3000:]}"
        )
    called = float(calls[0].removeprefix(CALLED))
    head = own = math.nan
    if submitted:
        # `first_submit` reads `created_at` of the ids it is given, the first WORKERS * 2 of
        # them: the run's own, from its ledger, earliest first.
        ledger = Ledger(archive)
        fresh = sorted(ledger.known_keys() - held)
        assert len(fresh) <= new_rows, f"{len(fresh)} rows claimed, {new_rows} new: keys differ"
        # A claim not (yet) answered names no request; its `submitted_at` is the claim's.
        recorded = sorted(
            (found.entry.submitted_at, found.entry.request_id)
            for found in ledger.read_many(fresh).values()
            if found is not None and found.entry.request_id
        )
        assert recorded, "the emulator accepted a submit the run's ledger does not record"
        request_ids = [request_id for _, request_id in recorded]
        head = asyncio.run(first_submit(emulator.base_url, request_ids)) - called
        own = recorded[0][0].timestamp() - called
    return ListedFlowFigures(
        objects=LISTED_OBJECTS,
        phase=phase,
        new_rows=new_rows,
        first_submit_seconds=head,
        own_first_submit_seconds=own,
        call_after_spawn_seconds=called - spawned,
        exit_after_sigterm_seconds=exit_after_sigterm,
        killed=killed,
        exit_code=child.returncode,
        requests_to_first=to_first,
        requests=dict(counts),
    )


def measure_listed_flows(
    proxy: _LatencyProxy, emulator: EmulatorProcess
) -> list[ListedFlowFigures]:
    """The listed flow on an empty archive, then on a rerun missing only the newest images."""
    first = measure_listed_flow(
        proxy, emulator, "listed-flow-first", "flow, first run", LISTED_OBJECTS
    )
    print(f"  listed flow over {LISTED_OBJECTS} objects: {_flow_text(first)}", flush=True)
    done = _done_on_rerun(f"s3://{BUCKET}/{LISTED_PREFIX}")
    _fill_ledger(proxy, "listed-flow-rerun/archive", done)
    rerun = measure_listed_flow(
        proxy, emulator, "listed-flow-rerun", "flow, rerun", NEW_ON_RERUN, frozenset(done)
    )
    print(f"  listed flow, rerun with {NEW_ON_RERUN} new: {_flow_text(rerun)}", flush=True)
    return [first, rerun]


def _flow_text(figure: ListedFlowFigures) -> str:
    """A listed flow's first submit and stop, in words (NaN: it did not happen)."""
    if math.isnan(figure.first_submit_seconds):
        submit = f"no submit within {FLOW_SUBMIT_TIMEOUT:g} s"
    else:
        submit = f"first submit {figure.first_submit_seconds:.1f} s after the call"
    if figure.killed:
        stop = f"still running {STOP_KILL_SECONDS:g} s after SIGTERM, killed"
    elif math.isnan(figure.exit_after_sigterm_seconds):
        stop = "ended before the SIGTERM"
    else:
        stop = f"exited {figure.exit_after_sigterm_seconds:.1f} s after SIGTERM"
    return f"{submit}, {stop}"


def _listed_flow_lines(flows: list[ListedFlowFigures]) -> tuple[str, bool]:
    """The listed flow's table; the verdict's words and whether the first run met the goal."""
    kinds = ("GET", "HEAD", "PUT", "LIST")
    rows_out = [
        [
            figure.phase,
            figure.objects,
            figure.new_rows,
            figure.first_submit_seconds,
            figure.own_first_submit_seconds,
            figure.call_after_spawn_seconds,
            figure.exit_after_sigterm_seconds,
            "yes" if figure.killed else "no",
            figure.exit_code,
            *(figure.requests_to_first.get(kind, 0) for kind in kinds),
        ]
        for figure in flows
    ]
    print(
        table(
            [
                "listed flow",
                "objects",
                "new",
                "call to submit s",
                "own figure s",
                "spawn to call s",
                "SIGTERM to exit s",
                "SIGKILL",
                "exit",
                *(f"{kind} to submit" for kind in kinds),
            ],
            rows_out,
        )
    )
    first, rerun = flows
    return (
        f"listed flow over {LISTED_OBJECTS} objects, first run: {_flow_text(first)} "
        f"(goal <= {LISTED_SUBMIT_GOAL:g} s); rerun with {NEW_ON_RERUN} new: {_flow_text(rerun)}",
        first.first_submit_seconds <= LISTED_SUBMIT_GOAL,
    )


def _listing_lines(listed: list[ListingFigures], whole: Figures) -> str:
    kinds = ("GET", "HEAD", "PUT", "LIST")
    rows_out = [
        [
            figure.phase,
            figure.objects,
            figure.new_rows,
            figure.first_ready_seconds,
            figure.all_keyed_seconds,
            *(figure.requests_to_first.get(kind, 0) for kind in kinds),
        ]
        for figure in listed
    ]
    print(
        table(
            [
                "listed batch",
                "objects",
                "new",
                "first ready s",
                "all keyed s",
                *(f"{kind} to first" for kind in kinds),
            ],
            rows_out,
        )
    )
    print(
        f"today's whole-batch planning of the same {whole.rows} listed rows (every input "
        f"checked before the first submit): {whole.seconds:.1f} s, "
        f"{whole.per_row:.2f} S3 requests a row"
    )
    first, rerun = listed
    return (
        f"first listed row ready {first.first_ready_seconds:.2f} s at {LISTED_OBJECTS} objects, "
        f"{rerun.first_ready_seconds:.2f} s on the rerun"
    )


def run_listing() -> Verdict:
    """Only the listed-batch case (`python -m bench.s3_scale listing`): the keying, today's
    whole-batch planning, and the real flow to its first submit, judged by the flow's."""
    print_header("s3_scale listing: a 5,000-object prefix as a batch, time to a first submit")
    print(
        f"moto's S3 behind a loopback proxy adding {RTT_SECONDS * 1000:.0f} ms a request; "
        f"the flow: emulator {WORKERS} workers, jobs of {DURATION} s, {WORKERS} lanes"
    )
    uptime = Path("/proc/loadavg").read_text().split()[:3]
    with s3_rig() as (proxy, _client):
        listed, whole = measure_listing(proxy)
        with (
            EmulatorProcess(WORKERS, DURATION) as emulator,
            api_environment(emulator.base_url, poll_time_scale(DURATION)),
            prefect_server(),
        ):
            flows = measure_listed_flows(proxy, emulator)
    keying = _listing_lines(listed, whole)
    detail, met = _listed_flow_lines(flows)
    verdict = Verdict("s3_scale_listing", met, f"{detail}; keying alone: {keying}; load {uptime}")
    first, rerun = flows
    write_results(
        "s3_scale_listing",
        {
            "rtt_seconds": RTT_SECONDS,
            "load_average": uptime,
            "listed": [asdict(figure) for figure in listed],
            "whole_plan": {**asdict(whole), "per_row": whole.per_row},
            "listed_flow": [asdict(figure) for figure in flows],
            "flow_first_submit_seconds": first.first_submit_seconds,
            "flow_rerun_first_submit_seconds": rerun.first_submit_seconds,
            "flow_submit_goal_seconds": LISTED_SUBMIT_GOAL,
            "workers": WORKERS,
            "job_seconds": DURATION,
            "verdict": asdict(verdict),
        },
    )
    print(verdict.line())
    return verdict


def run() -> Verdict:
    """Measure, print the table, write the JSON."""
    print_header("s3_scale: S3 requests per row and time to the first submit")
    print(
        f"moto's S3 behind a loopback proxy adding {RTT_SECONDS * 1000:.0f} ms a request; "
        f"every row its own input image, archive and ledger on S3; emulator {WORKERS} workers, "
        f"jobs of {DURATION} s"
    )
    uptime = Path("/proc/loadavg").read_text().split()[:3]
    figures: list[Figures] = []
    with TemporaryDirectory(prefix="bench-s3-") as folder, s3_rig() as (proxy, _client):
        workdir = Path(folder)
        for rows in PLAN_ROWS:
            figures.append(measure_planning(proxy, workdir, rows))
            print(f"  planned {rows} rows in {figures[-1].seconds:.1f} s", flush=True)
        listed, listed_whole = measure_listing(proxy)
        with (
            EmulatorProcess(WORKERS, DURATION) as emulator,
            api_environment(emulator.base_url, poll_time_scale(DURATION)),
            prefect_server(),
        ):
            dry_runs = {rows: measure_dry_run(proxy, workdir, rows) for rows in PLAN_ROWS}
            for rows, dry in dry_runs.items():
                print(f"  dry run of {rows} rows in {dry.seconds:.1f} s", flush=True)
            full, head = measure_full(proxy, emulator, workdir, FULL_ROWS)
            inline, _ = measure_full(proxy, emulator, workdir, FULL_ROWS, staged=False)
        figures.extend(dry_runs.values())
    kinds = ("GET", "HEAD", "PUT", "LIST", "POST", "API GET")
    rows_out = [
        [
            figure.phase,
            figure.rows,
            figure.seconds,
            *(figure.requests.get(kind, 0) for kind in kinds),
            figure.per_row,
            figure.per_row_in_all,
        ]
        for figure in [*figures, full, inline]
    ]
    print(table(["phase", "rows", "seconds", *kinds, "ours/row", "in all/row"], rows_out))
    print(f"full run of {FULL_ROWS} rows: first submit {head:.2f} s after the call")
    run_phase = full.per_row - figures[0].per_row
    api_per_row = full.per_row_in_all - full.per_row
    largest = figures[len(PLAN_ROWS) - 1]
    lanes_start = max(0.0, head - dry_runs[FULL_ROWS].seconds)
    first_at_largest = dry_runs[largest.rows].seconds + lanes_start
    total_per_row = largest.per_row + run_phase
    print(
        f"at {largest.rows} rows: first submit about {first_at_largest:.1f} s after the call "
        f"(its dry run + {lanes_start:.1f} s to the first submit); "
        f"about {total_per_row:.1f} S3 requests a row of ours "
        f"(planning {largest.per_row:.2f} + the rest of the run {run_phase:.2f}), "
        f"{total_per_row + api_per_row:.1f} with the API's reads of the inputs; load {uptime}"
    )
    listing_detail = _listing_lines(listed, listed_whole)
    met = total_per_row + api_per_row <= REQUESTS_GOAL and first_at_largest <= FIRST_SUBMIT_GOAL
    verdict = Verdict(
        "s3_scale",
        met,
        f"{total_per_row + api_per_row:.1f} S3 requests a row in all, {total_per_row:.1f} of "
        f"ours (goal <= {REQUESTS_GOAL:g}; {inline.per_row_in_all:.1f} with inputs inline); "
        f"first submit {first_at_largest:.1f} s at {largest.rows} rows "
        f"(goal <= {FIRST_SUBMIT_GOAL:g} s); {listing_detail}",
    )
    write_results(
        "s3_scale",
        {
            "rtt_seconds": RTT_SECONDS,
            "load_average": uptime,
            "figures": [{**asdict(figure), "per_row": figure.per_row} for figure in figures],
            "full_run": {
                **asdict(full),
                "per_row": full.per_row,
                "per_row_in_all": full.per_row_in_all,
                "first_submit_seconds": head,
            },
            "full_run_inline": {
                **asdict(inline),
                "per_row": inline.per_row,
                "per_row_in_all": inline.per_row_in_all,
            },
            "first_submit_seconds_at_largest": first_at_largest,
            "requests_per_row_ours": total_per_row,
            "requests_per_row_in_all": total_per_row + api_per_row,
            "listed": [asdict(figure) for figure in listed],
            "listed_whole_plan": {**asdict(listed_whole), "per_row": listed_whole.per_row},
            "verdict": asdict(verdict),
        },
    )
    print(verdict.line())
    return verdict


if __name__ == "__main__":
    import sys

    # `python -m bench.s3_scale listing`: the listed-batch case alone; else the whole bench.
    verdict = run_listing() if sys.argv[1:] == ["listing"] else run()
    sys.exit(0 if verdict.met else 1)
