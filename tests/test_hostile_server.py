"""Broken and hostile servers: every row of issue 11's table, driven against loopback servers.

The API's answers are not ours to trust. Each test programs the hostile server
(`tests/fixtures/hostile.py`) to misbehave one way and asserts the bound that
must hold: memory, time, hosts fetched from, signatures kept out, bad ids and
bad inputs refused before anything is paid, no scratch file left by a kill.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from prefect_nanobanana.client import (
    DEFAULT_WAIT_TIMEOUT,
    MAX_PROMPT_CHARS,
    APIConnectionError,
    InvalidRequestError,
    JobFailedError,
    NanoBananaEditInput,
    ProtocolError,
    RetryPolicy,
    RunComfyClient,
    ServerError,
    SubmitOutcomeUnknownError,
    WaitTimeoutError,
)
from prefect_nanobanana.emulator import LoopbackObjectStore
from prefect_nanobanana.redaction import redact_text
from prefect_nanobanana.storage import (
    ArchiveError,
    StagingError,
    archive_outputs,
    stage_assets,
)
from tests.fixtures.hostile import (
    CREDENTIAL,
    HOSTILE_TOKEN,
    SECRETS,
    SIGNATURE,
    SIGNED_INPUT_URL,
    HostileHandler,
    HostileServer,
    dripped,
    padded_json,
    png_bytes,
)

SUBMIT_PATH = "/v1/models/google/nano-banana/pro/edit"
EDIT = {"prompt": "Add snow", "image_urls": ["https://example.com/in.png"]}
REQUEST_ID = "3f1c2a9e-0d4b-4c55-9a7e-1b2c3d4e5f60"
DAY = date(2026, 12, 1)
MB = 1024 * 1024

# A regression here hangs rather than fails (a dripping server, a 300 MB answer): fail fast.
pytestmark = pytest.mark.timeout(90)


def _client(server: HostileServer, **options: Any) -> RunComfyClient:
    return RunComfyClient(HOSTILE_TOKEN, server.base_url, **options)


def _no_secret_in(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


# ------------------------------------------------------------------ bounded answers

_RSS_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    from prefect_nanobanana.client import RunComfyClient, ProtocolError
    base_url, token, call = sys.argv[1:4]
    with RunComfyClient(token, base_url, timeout=60) as client:
        client.status("warm-up")  # imports, TLS-less pool, JSON: all loaded before measuring
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            if call == "status":
                client.status("huge")
            else:
                client.submit_edit({"prompt": "x", "image_urls": ["https://example.com/a.png"]})
            outcome = "no error"
        except ProtocolError as error:
            outcome = type(error).__name__
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mb": (after - before) / 1024, "outcome": outcome}))
    """
)


@pytest.mark.parametrize("call", ["status", "submit"])
def test_a_300_mb_answer_is_cut_off_with_little_memory(hostile: HostileServer, call: str) -> None:
    """Row 1: peak RSS grew 3,649 MB (status) / 958 MB (submit); now under 100 MB."""
    status_prefix = b'{"request_id": "huge", "status": "in_queue", '
    hostile.route(
        "GET",
        "/v1/requests/warm-up/status",
        lambda h: h.json(200, {"request_id": "warm-up", "status": "in_queue"}),
    )
    hostile.route(
        "GET",
        "/v1/requests/huge/status",
        lambda h: h.stream(200, padded_json(status_prefix, 300 * MB), "application/json"),
    )
    hostile.route(
        "POST",
        SUBMIT_PATH,
        lambda h: h.stream(
            200, padded_json(b'{"request_id": "r1", ', 300 * MB), "application/json"
        ),
    )
    probe = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, hostile.base_url, HOSTILE_TOKEN, call],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout)
    expected = "ProtocolError" if call == "status" else "SubmitProtocolError"
    assert report["outcome"] == expected
    assert report["growth_mb"] < 100


def test_the_answer_cap_is_a_protocol_error_that_is_not_retried(hostile: HostileServer) -> None:
    hostile.route(
        "GET",
        "/v1/requests/",
        lambda h: h.stream(
            200, padded_json(b'{"status": "in_queue", ', 8 * MB), "application/json"
        ),
    )
    with _client(hostile) as client, pytest.raises(ProtocolError, match="4194304-byte limit"):
        client.status("r1")
    assert len(hostile.hits_of("GET")) == 1


# ------------------------------------------------------------------ deadlines


def _drip_whole_response(handler: HostileHandler) -> None:
    body = b'{"request_id": "r1", "status": "in_progress"}\n'  # 47 bytes
    head = (
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    # One byte a second, even the status line: httpx's per-read timeout never trips,
    # and the whole answer (about two minutes) outlasts every bound under test.
    for byte in dripped(head + body, every_seconds=1.0):
        handler.wfile.write(byte)
        handler.wfile.flush()


def test_wait_over_a_dripping_server_ends_by_its_deadline(hostile: HostileServer) -> None:
    """Row 2 and issue 24: `wait(timeout=8)` returned after 30 s, the poll in flight
    keeping a whole call's deadline. It gets only what is left of the wait: within 10 s."""
    hostile.route("GET", "/v1/requests/", _drip_whole_response)
    started = time.monotonic()
    with _client(hostile) as client, pytest.raises(WaitTimeoutError) as caught:
        assert client.timeout == 30  # one call's deadline alone would not end it in time
        client.wait("r1", timeout=8)
    assert time.monotonic() - started < 10
    assert caught.value.request_id == "r1"


def test_wait_has_a_finite_default_and_none_only_when_asked() -> None:
    import inspect

    from prefect_nanobanana.client import AsyncRunComfyClient

    assert DEFAULT_WAIT_TIMEOUT == 30 * 60
    for cls in (RunComfyClient, AsyncRunComfyClient):
        assert inspect.signature(cls.wait).parameters["timeout"].default == DEFAULT_WAIT_TIMEOUT


async def test_the_async_client_holds_the_same_deadline(hostile: HostileServer) -> None:
    from prefect_nanobanana.client import AsyncRunComfyClient

    hostile.route("GET", "/v1/requests/", _drip_whole_response)
    started = time.monotonic()
    async with AsyncRunComfyClient(HOSTILE_TOKEN, hostile.base_url) as client:
        assert client.timeout == 30
        with pytest.raises(WaitTimeoutError):
            await client.wait("r1", timeout=8)
    assert time.monotonic() - started < 10


async def test_a_wait_queued_for_a_pooled_connection_still_ends_by_its_deadline(
    hostile: HostileServer,
) -> None:
    """A batch shares one client: a poll waiting for a free connection waits within
    what is left of its wait too, not a whole call's 30 s."""
    import asyncio
    import contextlib

    from prefect_nanobanana.client import AsyncRunComfyClient

    hostile.route("GET", "/v1/requests/", _drip_whole_response)
    async with AsyncRunComfyClient(
        HOSTILE_TOKEN, hostile.base_url, max_connections=1, total_timeout=20
    ) as client:
        hog = asyncio.create_task(client.status("hog"))
        while not hostile.hits_of("GET", "/v1/requests/hog/"):
            await asyncio.sleep(0.01)  # the one connection is taken
        started = time.monotonic()
        with pytest.raises(WaitTimeoutError):
            await client.wait("r1", timeout=3)
        assert time.monotonic() - started < 3 + 2
        hog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hog
    assert not hostile.hits_of("GET", "/v1/requests/r1/")


def _tried(error: Exception, total: float) -> tuple[int, float]:
    """The attempts and seconds a call's error says it spent before its total ran out."""
    said = re.search(
        rf"gave up after (\d+) attempts? in ([\d.]+) s "
        rf"\(this call's total_timeout is {total:g} s\)",
        str(error),
    )
    assert said, str(error)
    return int(said[1]), float(said[2])


def test_one_call_and_its_retries_end_within_the_calls_total(hostile: HostileServer) -> None:
    """Issue 24: `status()` raised after 192 s, each of its 6 attempts given a fresh 30 s.
    The call, retries included, ends by its `total_timeout` (7 s here, to be quick) and
    its error says how long it tried and how many attempts. Attempts of 4 s: the
    second, begun at 4 to 4.5 s, is cut at 7 s by what is left of the total."""
    hostile.route("GET", "/v1/requests/", _drip_whole_response)
    with _client(hostile, timeout=4, total_timeout=7) as client:
        started = time.monotonic()
        with pytest.raises(APIConnectionError) as caught:
            client.status("r1")
        elapsed = time.monotonic() - started
    assert elapsed < 7 + 1
    attempts, seconds = _tried(caught.value, 7)
    assert attempts == len(hostile.hits_of("GET", "/v1/requests/r1/status")) == 2
    assert seconds == pytest.approx(elapsed, abs=0.5)
    _no_secret_in(str(caught.value))


async def test_an_async_call_gives_its_attempt_no_more_than_what_is_left_of_its_total(
    hostile: HostileServer,
) -> None:
    """With the default 30 s per attempt, a 5 s total ends the first attempt at 5 s."""
    from prefect_nanobanana.client import AsyncRunComfyClient

    hostile.route("GET", "/v1/requests/", _drip_whole_response)
    async with AsyncRunComfyClient(HOSTILE_TOKEN, hostile.base_url, total_timeout=5) as client:
        started = time.monotonic()
        with pytest.raises(APIConnectionError) as caught:
            await client.status("r1")
        elapsed = time.monotonic() - started
    assert elapsed < 5 + 1
    attempts, seconds = _tried(caught.value, 5)
    assert attempts == len(hostile.hits_of("GET", "/v1/requests/r1/status")) == 1
    assert seconds == pytest.approx(elapsed, abs=0.5)
    _no_secret_in(str(caught.value))


def test_a_submit_ends_within_its_total_and_is_not_resent(hostile: HostileServer) -> None:
    hostile.route("POST", SUBMIT_PATH, _drip_whole_response)
    started = time.monotonic()
    with (
        _client(hostile, total_timeout=3) as client,
        pytest.raises(SubmitOutcomeUnknownError) as caught,
    ):
        client.submit_edit(EDIT)
    assert time.monotonic() - started < 3 + 1
    assert _tried(caught.value, 3)[0] == len(hostile.hits_of("POST")) == 1
    _no_secret_in(str(caught.value))


def test_one_call_has_the_documented_total_by_default() -> None:
    import inspect

    from prefect_nanobanana.client import DEFAULT_TOTAL_TIMEOUT, AsyncRunComfyClient

    assert DEFAULT_TOTAL_TIMEOUT == 45
    for cls in (RunComfyClient, AsyncRunComfyClient):
        assert inspect.signature(cls).parameters["total_timeout"].default == 45
    assert re.search(r"total_timeout: [^:]*\b45 s\b", RunComfyClient.__doc__)
    with pytest.raises(ValueError, match="total_timeout"):
        RunComfyClient(HOSTILE_TOKEN, total_timeout=0)


def test_a_trickled_download_ends_by_its_deadline_retries_included(
    hostile: HostileServer, tmp_path: Path
) -> None:
    """Row 2: `archive_outputs(timeout=5, retries=0)` on a 40 s trickle took 45 s."""
    image = png_bytes()
    hostile.route("GET", "/out/", lambda h: h.stream(200, dripped(image, 0.5), "image/png"))
    started = time.monotonic()
    with pytest.raises(ArchiveError, match="deadline"):
        archive_outputs(
            REQUEST_ID,
            [f"{hostile.base_url}/out/0.png"],
            date=DAY,
            archive_uri=str(tmp_path),
            timeout=2,
            retries=3,
            backoff=0.1,
        )
    assert time.monotonic() - started < 2 + 1.5


# ------------------------------------------------------------------ outputs only from their hosts


def test_outputs_and_redirects_to_other_hosts_are_refused_and_reported(
    hostile: HostileServer, secret_service: HostileServer, tmp_path: Path
) -> None:
    """Row 3: a foreign output URL and a redirect were fetched (2 hits on the secret service)."""
    hostile.route("GET", "/out/", lambda h: h.image(png_bytes()))
    hostile.route("GET", "/hop/", lambda h: h.redirect(f"{secret_service.base_url}/loot.png"))
    with _client(hostile) as client:
        hosts = client.output_hosts
    assert hosts == ("*.runcomfy.net", hostile.netloc)
    urls = [
        f"{hostile.base_url}/out/0.png",
        f"{secret_service.base_url}/loot.png",
        f"{hostile.base_url}/hop/1.png",
    ]
    with pytest.raises(ArchiveError) as caught:
        archive_outputs(REQUEST_ID, urls, date=DAY, archive_uri=str(tmp_path), allowed_hosts=hosts)
    error = caught.value
    assert REQUEST_ID in str(error)
    assert [failure.index for failure in error.failures] == [1, 2]
    assert all("not one of the API's output hosts" in f.reason for f in error.failures)
    assert [output.index for output in error.partial_record.outputs] == [0]
    assert secret_service.hits == []
    assert all("Authorization" not in hit.headers for hit in hostile.hits_of("GET", "/out/"))


# ------------------------------------------------------------------ redaction


def _echo_422(handler: HostileHandler) -> None:
    sent = json.loads(handler.body)
    # FastAPI's shape: the offending input, echoed verbatim.
    handler.json(
        422,
        {
            "detail": [
                {
                    "type": "value_error",
                    "loc": ["body", "image_urls", 0],
                    "msg": f"cannot fetch {sent['image_urls'][0]}",
                    "input": sent["image_urls"][0],
                }
            ]
        },
    )


def test_server_text_echoing_a_signed_url_is_redacted_in_every_error(
    hostile: HostileServer,
) -> None:
    """Row 4 at the client: a 422 echo, a 500 quoting the URL, a failed job quoting it."""
    hostile.route("POST", SUBMIT_PATH, _echo_422)
    hostile.route(
        "GET",
        "/v1/requests/r500/",
        lambda h: h.json(500, {"error_code": 500001, "error_message": f"boom {SIGNED_INPUT_URL}"}),
    )
    hostile.route(
        "GET",
        "/v1/requests/rfail/",
        lambda h: h.json(
            200,
            {
                "request_id": "rfail",
                "status": "failed",
                "error": {
                    "message": f"could not fetch {SIGNED_INPUT_URL}",
                    "url": SIGNED_INPUT_URL,
                },
            },
        ),
    )
    errors: list[Exception] = []
    with _client(hostile, retry_policy=RetryPolicy(max_attempts=1)) as client:
        for call, expected in (
            (
                lambda: client.submit_edit({**EDIT, "image_urls": [SIGNED_INPUT_URL]}),
                InvalidRequestError,
            ),
            (lambda: client.status("r500"), ServerError),
            (lambda: client.wait("rfail", timeout=5), JobFailedError),
        ):
            with pytest.raises(expected) as caught:
                call()
            errors.append(caught.value)
    for error in errors:
        _no_secret_in(str(error))
        _no_secret_in(repr(error.args))
        _no_secret_in(json.dumps(error.detail))
    assert "bucket.s3.amazonaws.com/staging/input.png" in str(errors[0])  # still says which


def test_the_one_redaction_strips_every_known_form() -> None:
    loopback = "http://127.0.0.1:8123/objects/in.png?expires=1764547200&signature=abcdef0123"
    texts = {
        SIGNED_INPUT_URL: SIGNATURE,
        json.dumps({"url": SIGNED_INPUT_URL}).replace("/", "\\/"): SIGNATURE,  # JSON-escaped
        f"only the query: X-Amz-Signature={SIGNATURE}&x=1": SIGNATURE,
        f"percent-encoded: https%3A%2F%2Fb%2Fk%3FX-Amz-Signature%3D{SIGNATURE}": SIGNATURE,
        f"X-Amz-Credential={CREDENTIAL}%2F2026": CREDENTIAL,
        loopback: "abcdef0123",
        f"Authorization: Bearer {HOSTILE_TOKEN}": HOSTILE_TOKEN,
        f"{{'authorization': 'Bearer {HOSTILE_TOKEN}'}}": HOSTILE_TOKEN,
        f"bearer {HOSTILE_TOKEN}": HOSTILE_TOKEN,
    }
    for text, secret in texts.items():
        assert secret not in redact_text(text), text


# ------------------------------------------------------------------ protocol checks


@pytest.mark.parametrize("bad_id", ["..", "r" * 100_000, "a/b", "", None, "x y"])
def test_a_bad_request_id_in_a_submit_answer_is_a_protocol_error(
    hostile: HostileServer, bad_id: Any
) -> None:
    """Row 5: `..` turned a poll into `GET /v1/status`; 100,000 characters were stored."""
    hostile.route("POST", SUBMIT_PATH, lambda h: h.json(200, {"request_id": bad_id}))
    with _client(hostile) as client, pytest.raises(ProtocolError) as caught:
        client.submit_edit(EDIT)
    # The job may exist all the same: the submit guards must keep their marker.
    assert isinstance(caught.value, SubmitOutcomeUnknownError)
    assert len(str(caught.value)) < 600
    assert [hit.method for hit in hostile.hits] == ["POST"]


def test_a_bad_request_id_from_a_caller_never_reaches_a_url(hostile: HostileServer) -> None:
    with _client(hostile) as client:
        for bad_id in ("..", "a/../b", "r" * 129):
            with pytest.raises(InvalidRequestError):
                client.status(bad_id)
    assert hostile.hits == []


def test_a_status_answer_cannot_swap_the_request_id(hostile: HostileServer) -> None:
    hostile.route(
        "GET", "/v1/requests/", lambda h: h.json(200, {"request_id": "..", "status": "in_queue"})
    )
    with _client(hostile) as client:
        assert client.status("r1").request_id == "r1"


def test_a_long_prompt_is_refused_before_any_request(hostile: HostileServer) -> None:
    """Row 7: a 2,000,000-character prompt was submitted."""
    with pytest.raises(ValidationError, match="at most 20000 characters"):
        NanoBananaEditInput(**{**EDIT, "prompt": "x" * (MAX_PROMPT_CHARS + 1)})
    with _client(hostile) as client, pytest.raises(ValidationError):
        client.submit_edit({**EDIT, "prompt": "x" * 2_000_000})
    assert hostile.hits == []
    NanoBananaEditInput(**{**EDIT, "prompt": "x" * MAX_PROMPT_CHARS})


def write_pixel_bomb(path: Path, width: int = 30_000, height: int = 30_000) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels, in a few hundred bytes.

    The pixel data is a valid zlib stream of the first rows only: every check that
    reads headers sees the full size, and nothing here spends time compressing 900 MB.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 4)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )
    return path


def test_a_pixel_bomb_is_refused_before_any_upload(
    tmp_path: Path, loopback_store: LoopbackObjectStore
) -> None:
    """Row 6: a 30000x30000 PNG of 109 KB passed staging."""
    bomb = write_pixel_bomb(tmp_path / "bomb.png")
    over = write_pixel_bomb(tmp_path / "over.png", 8000, 4001)  # 32,008,000 pixels
    for image, refusal in ((bomb, "image has far more than"), (over, "8000x4001 is 32,008,000")):
        with pytest.raises(StagingError, match=f"^{re.escape(str(image))}: {refusal}"):
            stage_assets([image], loopback_store.base_url, upload_token=loopback_store.upload_token)
    assert [path for path in (loopback_store.folder / "objects").rglob("*")] == []


# ------------------------------------------------------------------ no scratch file after a kill

_SLOW_ARCHIVE = textwrap.dedent(
    """
    import sys
    from datetime import date
    from prefect_nanobanana.storage import archive_outputs
    url, root, request_id = sys.argv[1:4]
    archive_outputs(request_id, [url], date=date(2026, 12, 1), archive_uri=root, timeout=120)
    """
)


def test_a_killed_download_leaves_no_scratch_file(hostile: HostileServer, tmp_path: Path) -> None:
    """Also: a download killed midway left a `.0.*.part` file in the archive."""
    image = png_bytes((64, 64))
    hostile.route(
        "GET",
        "/slow/",
        lambda h: h.stream(200, [image[:40], *dripped(image[40:], 5.0)], "image/png"),
    )
    folder = tmp_path / "2026-12-01" / REQUEST_ID
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SLOW_ARCHIVE,
            f"{hostile.base_url}/slow/0",
            str(tmp_path),
            REQUEST_ID,
        ]
    )
    try:
        for _ in range(300):
            if folder.is_dir() and any(folder.glob(".*.part")):
                break
            time.sleep(0.05)
        assert any(folder.glob(".*.part")), "the child never started writing"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    hostile.route("GET", "/slow/", lambda h: h.image(image))
    record = archive_outputs(
        REQUEST_ID, [f"{hostile.base_url}/slow/0"], date=DAY, archive_uri=str(tmp_path)
    )
    assert [output.width for output in record.outputs] == [64]
    assert sorted(path.name for path in folder.iterdir()) == ["0.png", "metadata.json"]


# ------------------------------------------------------------------ the Prefect side


def _flow_run_ids(states: list[Any]) -> list[Any]:
    return [state.state_details.flow_run_id for state in states]


def _prefect_record_of(flow_run_ids: list[Any]) -> list[str]:
    """Every text Prefect keeps of these runs: logs, events, states (flow and task), artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.events.filters import EventFilter, EventRelatedFilter, EventResourceFilter
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    texts: list[str] = []
    resource_ids = [f"prefect.flow-run.{run_id}" for run_id in flow_run_ids]
    with get_client(sync_client=True) as client:
        texts += [
            log.message
            for log in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids))
            )
        ]
        for run_id in flow_run_ids:
            texts += [
                json.dumps(s.model_dump(mode="json")) for s in client.read_flow_run_states(run_id)
            ]
        for task_run in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids))
        ):
            texts.append(json.dumps(task_run.state.model_dump(mode="json")))
        for artifact in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids))
        ):
            texts.append(json.dumps(artifact.model_dump(mode="json")))

    def events() -> list[str]:
        found: list[str] = []
        with get_client(sync_client=True) as client:
            for events_filter in (
                EventFilter(resource=EventResourceFilter(id=resource_ids)),
                EventFilter(related=EventRelatedFilter(id=resource_ids)),
            ):
                page = client.read_events(filter=events_filter, limit=50)
                while True:
                    found += [event.model_dump_json() for event in page.events]
                    if not page.next_page:
                        break
                    page = client.read_events_page(page.next_page)
        return found

    # The server stores events asynchronously: wait for every run's final state event.
    for _ in range(100):
        event_texts = events()
        finals = sum('"prefect.flow-run.Failed"' in text for text in event_texts)
        if finals >= len(flow_run_ids):
            break
        time.sleep(0.2)
    return texts + event_texts


@pytest.mark.prefect
def test_an_echoing_server_leaves_no_signature_in_prefects_database(
    prefect_harness: Any,
    hostile: HostileServer,
    secret_service: HostileServer,
    loopback_store: LoopbackObjectStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Row 4: signatures landed in logs (13), events (15), states (6) and an artifact (1).

    Four runs of `edit_and_archive` over a local image staged to the loopback store
    (so its signed URL is in no flow parameter): a 422 echoing the input, a 500
    quoting it, a failed job quoting it, and a completed job whose outputs carry
    signatures and point to another host (refused, reported, never fetched).
    """
    from prefect_nanobanana import RunComfyCredentials, edit_and_archive

    monkeypatch.setenv("NANOBANANA_STAGING_TOKEN", loopback_store.upload_token)
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes((16, 16)))
    credentials = RunComfyCredentials(api_token=HOSTILE_TOKEN, base_url=hostile.base_url)

    def quote_input(handler: HostileHandler) -> str:
        return json.loads(handler.body)["image_urls"][0]

    def accepted(request_id: str) -> None:
        hostile.route(
            "POST",
            SUBMIT_PATH,
            lambda h: h.json(
                200,
                {
                    "request_id": request_id,
                    "result_url": f"{hostile.base_url}/v1/requests/{request_id}/result"
                    f"?X-Amz-Signature={SIGNATURE}",
                },
            ),
        )

    def run() -> Any:
        return edit_and_archive(
            prompt="Add snow",
            images=[str(image)],
            archive_uri=str(tmp_path / "archive"),
            staging_uri=loopback_store.base_url,
            credentials=credentials,
            return_state=True,
        )

    states = []
    hostile.route("POST", SUBMIT_PATH, _echo_422)
    states.append(run())
    hostile.route(
        "POST",
        SUBMIT_PATH,
        lambda h: h.json(500, {"error_code": 500001, "error_message": f"boom: {quote_input(h)}"}),
    )
    states.append(run())
    accepted("rid-failed")
    polls = [
        {"status": f"paused-for {SIGNED_INPUT_URL}"},  # an unknown status: logged as it is
        {"status": "failed", "error": f"cannot fetch {SIGNED_INPUT_URL} (Bearer {HOSTILE_TOKEN})"},
    ]
    hostile.route(
        "GET",
        "/v1/requests/rid-failed/",
        lambda h: h.json(200, polls.pop(0) if len(polls) > 1 else polls[0]),
    )
    states.append(run())
    accepted("rid-elsewhere")
    outputs = [
        f"{hostile.base_url}/out/0.png?X-Amz-Signature={SIGNATURE}",
        f"{secret_service.base_url}/loot.png?X-Amz-Credential={CREDENTIAL}&X-Amz-Signature={SIGNATURE}",
    ]
    hostile.route(
        "GET",
        "/v1/requests/rid-elsewhere/",
        lambda h: h.json(200, {"status": "completed", "output": {"images": outputs}}),
    )
    hostile.route("GET", "/out/", lambda h: h.image(png_bytes()))
    states.append(run())

    assert [state.type.value for state in states] == ["FAILED"] * 4
    assert "rid-elsewhere" in states[3].message and "output hosts" in states[3].message
    assert secret_service.hits == []
    submits = hostile.hits_of("POST", SUBMIT_PATH)
    assert len(submits) == 4
    for hit in hostile.hits_of("GET", "/out/"):
        assert "Authorization" not in hit.headers
    record = _prefect_record_of(_flow_run_ids(states))
    assert any("rid-failed" in text for text in record)  # the record is really there
    assert any("rid-elsewhere" in text for text in record)
    # Ours, and the loopback store's own signatures as the API received them.
    signatures = {SIGNATURE, CREDENTIAL, HOSTILE_TOKEN, *_loopback_signatures(hostile)}
    leaks = [(secret, text[:300]) for text in record for secret in signatures if secret in text]
    assert leaks == []


def _loopback_signatures(server: HostileServer) -> set[str]:
    """The `signature` query values of the staged URLs the hostile API was sent."""
    from urllib.parse import parse_qs, urlsplit

    found = set()
    for hit in server.hits_of("POST", SUBMIT_PATH):
        for url in json.loads(hit.body)["image_urls"]:
            found.update(parse_qs(urlsplit(url).query).get("signature", []))
    assert found, "the staged URL carried no signature: the test would prove nothing"
    return found


@pytest.mark.prefect
def test_a_cancelling_direct_run_withdraws_its_queued_request(
    prefect_harness: Any, use_emulator: Any, emulator_factory: Any, image_server: Any
) -> None:
    """Also: a direct `edit_image` ignored a cancel set through the API (0 cancel calls)."""
    import threading
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.states import Cancelling

    from prefect_nanobanana import edit_image
    from prefect_nanobanana.emulator import Fault, FaultPlan
    from prefect_nanobanana.tasks import RECORD_LABEL_PREFIX

    emulator = use_emulator(emulator_factory(faults=FaultPlan([Fault("stuck", endpoint="job")])))
    name = f"cancel-direct-{uuid.uuid4().hex[:8]}"
    ended: list[Any] = []
    runner = threading.Thread(
        target=lambda: ended.append(
            edit_image.with_options(flow_run_name=name)(
                prompt="paint it teal",
                image_urls=[image_server.url_for("wide.png")],
                return_state=True,
            )
        ),
        daemon=True,
    )
    runner.start()

    def submitted() -> tuple[Any, str] | None:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name]))
            )
        for run in runs:
            for key, value in (run.labels or {}).items():
                if key.startswith(RECORD_LABEL_PREFIX) and value not in (
                    "submitting",
                    "not-submitted",
                ):
                    return run.id, value
        return None

    found = None
    for _ in range(600):
        if found := submitted():
            break
        time.sleep(0.1)
    assert found, "the run never recorded its request"
    run_id, request_id = found
    assert emulator.job(request_id).status == "in_queue"

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelling(), force=True)
    asked = time.monotonic()
    while emulator.job(request_id).status != "cancelled" and time.monotonic() - asked < 10:
        time.sleep(0.05)
    withdrawn_after = time.monotonic() - asked
    runner.join(timeout=60)

    assert emulator.job(request_id).status == "cancelled"
    assert withdrawn_after < 5
    assert emulator.stats.cancel_outcomes == {"cancelled": 1, "not_cancellable": 0}
    assert ended and ended[0].is_cancelled()


@pytest.mark.prefect
def test_a_pixel_bomb_or_a_long_prompt_ends_a_run_with_zero_submits(
    prefect_harness: Any,
    hostile: HostileServer,
    loopback_store: LoopbackObjectStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows 6 and 7 through `edit_and_archive`: refused before anything is paid."""
    from prefect_nanobanana import RunComfyCredentials, edit_and_archive

    monkeypatch.setenv("NANOBANANA_STAGING_TOKEN", loopback_store.upload_token)
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())
    credentials = RunComfyCredentials(api_token=HOSTILE_TOKEN, base_url=hostile.base_url)
    for prompt, image in (
        ("Add snow", write_pixel_bomb(tmp_path / "bomb.png")),
        ("x" * (MAX_PROMPT_CHARS + 1), good),  # (2,000,000 is over Prefect's own parameter cap)
    ):
        state = edit_and_archive(
            prompt=prompt,
            images=[str(image)],
            archive_uri=str(tmp_path / "archive"),
            staging_uri=loopback_store.base_url,
            credentials=credentials,
            return_state=True,
        )
        assert state.is_failed()
    assert hostile.hits_of("POST") == []
    assert list((loopback_store.folder / "objects").rglob("*.png")) == []


def test_a_bad_value_in_a_manifest_names_its_line(tmp_path: Path) -> None:
    """Also: an enum error or `num_images: 5` said "1 validation error for BatchJob"."""
    import asyncio

    from prefect_nanobanana.flows.batch.plan import aread_batch_manifest
    from prefect_nanobanana.storage import ManifestError

    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    for bad in ({"aspect_ratio": "7:1"}, {"num_images": 5}):
        manifest = tmp_path / "m.jsonl"
        rows = [
            {"prompt": "ok", "images": [str(image)]},
            {"prompt": "bad", "images": [str(image)], **bad},
        ]
        manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
        with pytest.raises(ManifestError, match=r"m\.jsonl:2: " + next(iter(bad))):
            asyncio.run(aread_batch_manifest.fn(str(manifest)))
