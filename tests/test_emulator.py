"""The emulator on its own, spoken to with plain httpx (never our client), over loopback."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import httpx
import pytest
from PIL import Image

from prefect_nanobanana.client.vocabulary import OUTPUT_PIXEL_SIZES
from prefect_nanobanana.emulator import (
    EmulatorConfig,
    EmulatorServer,
    EmulatorStats,
    Fault,
    FaultPlan,
)

MODEL_PATH = "/v1/models/google/nano-banana/pro/edit"
TERMINAL = {"completed", "failed", "cancelled"}


@contextmanager
def api(emulator: EmulatorServer, token: str | None = "test-token") -> Iterator[httpx.Client]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=emulator.base_url, headers=headers, timeout=10) as client:
        yield client


def body(image_server: Any, name: str = "wide.png", **options: Any) -> dict[str, Any]:
    return {"prompt": "paint it teal", "image_urls": [image_server.url_for(name)], **options}


def submit(client: httpx.Client, payload: dict[str, Any]) -> str:
    response = client.post(MODEL_PATH, json=payload)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def wait_done(client: httpx.Client, request_id: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/requests/{request_id}/status").json()
        if status["status"] in TERMINAL:
            return status
        time.sleep(0.01)
    raise AssertionError(f"{request_id} did not finish; last status {status}")


def wait_for_status(client: httpx.Client, request_id: str, wanted: str) -> None:
    deadline = time.monotonic() + 5
    while client.get(f"/v1/requests/{request_id}/status").json()["status"] != wanted:
        assert time.monotonic() < deadline, f"{request_id} never reached {wanted}"
        time.sleep(0.005)


def result(client: httpx.Client, request_id: str, **params: str) -> httpx.Response:
    return client.get(f"/v1/requests/{request_id}/result", params=params)


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every pixel: a truncated or corrupt file fails here
    return image


# -- the happy path -------------------------------------------------------------


@pytest.mark.parametrize(
    ("output_format", "aspect_ratio", "resolution", "input_name", "expected_ratio", "pil_format"),
    [
        ("png", "1:1", "1K", "wide.png", "1:1", "PNG"),
        ("jpeg", "21:9", "1K", "wide.png", "21:9", "JPEG"),
        ("webp", "3:4", "2K", "wide.png", "3:4", "WEBP"),
        ("png", "auto", "1K", "tall.jpg", "9:16", "PNG"),
        ("jpeg", "auto", "1K", "photo.jpeg", "4:3", "JPEG"),
        ("webp", "auto", "1K", "wide.png", "16:9", "WEBP"),
    ],
)
def test_happy_path_serves_real_images_of_the_table_size(
    emulator,
    image_server,
    output_format,
    aspect_ratio,
    resolution,
    input_name,
    expected_ratio,
    pil_format,
):
    payload = body(
        image_server,
        input_name,
        output_format=output_format,
        aspect_ratio=aspect_ratio,
        resolution=resolution,
    )
    with api(emulator) as client:
        handle = client.post(MODEL_PATH, json=payload).json()
        request_id = handle["request_id"]
        assert handle["status_url"] == f"{emulator.base_url}/v1/requests/{request_id}/status"
        assert handle["result_url"] == f"{emulator.base_url}/v1/requests/{request_id}/result"
        assert handle["cancel_url"] == f"{emulator.base_url}/v1/requests/{request_id}/cancel"
        assert wait_done(client, request_id)["status"] == "completed"
        answer = result(client, request_id).json()
        file = httpx.get(answer["output"]["image"])
    assert set(answer["output"]) == {"image"}
    assert answer["output"]["image"] == f"{emulator.base_url}/files/{request_id}/0.{output_format}"
    assert answer["error"] is None and "cost" not in answer
    created = datetime.fromisoformat(answer["created_at"])
    assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0
    assert datetime.fromisoformat(answer["finished_at"]) >= created
    assert file.status_code == 200
    assert file.headers["content-type"] == f"image/{output_format}"
    assert int(file.headers["content-length"]) == len(file.content)
    image = open_image(file.content)
    assert image.format == pil_format
    assert image.size == OUTPUT_PIXEL_SIZES[expected_ratio][resolution]
    assert emulator.job(request_id).output_size == image.size
    assert emulator.stats.fetched_input_urls == [image_server.url_for(input_name)]


def test_num_images_gives_distinct_images_under_images(emulator, image_server):
    with api(emulator) as client:
        request_id = submit(client, body(image_server, num_images=3, aspect_ratio="3:2"))
        wait_done(client, request_id)
        output = result(client, request_id).json()["output"]
        files = [client.get(url).content for url in output["images"]]
    assert list(output) == ["images"]
    assert [url.rsplit("/", 1)[1] for url in output["images"]] == ["0.png", "1.png", "2.png"]
    assert len(set(files)) == 3
    assert {open_image(data).size for data in files} == {(1264, 848)}


def test_sync_mode_answers_data_uris_and_keeps_no_files(emulator, image_server):
    with api(emulator) as client:
        request_id = submit(
            client, body(image_server, sync_mode=True, num_images=2, output_format="webp")
        )
        wait_done(client, request_id)
        uris = result(client, request_id).json()["output"]["images"]
        file = client.get(f"/files/{request_id}/0.webp")
    assert all(uri.startswith("data:image/webp;base64,") for uri in uris)
    images = [open_image(base64.b64decode(uri.split(",", 1)[1])) for uri in uris]
    assert [(image.format, image.size) for image in images] == [("WEBP", (1376, 768))] * 2
    assert file.status_code == 404


def test_model_endpoint_reports_the_price(emulator):
    with api(emulator) as client:
        answer = client.get(MODEL_PATH).json()
    assert answer["model_id"] == "google/nano-banana/pro/edit"
    assert answer["base_price_usd"] == 0.15
    assert answer["price_unit"] == "image"
    assert "$0.30 at 4K" in answer["pricing_note"]
    assert emulator.stats.calls["model"] == 1


# -- queue, cancel, durations -------------------------------------------------------


def test_queue_is_fifo_with_positions_while_queued(emulator_factory, image_server):
    # Long enough for the queue to still be there when looked at on a loaded machine
    # (0.15 s was not: the second job had started by the time its status was read).
    duration = 1.0
    emulator = emulator_factory(workers=1, fixed_duration_seconds=duration)
    with api(emulator) as client:
        ids = [submit(client, body(image_server))]
        wait_for_status(client, ids[0], "in_progress")
        ids += [submit(client, body(image_server)) for _ in range(2)]
        second = client.get(f"/v1/requests/{ids[1]}/status").json()
        third = client.get(f"/v1/requests/{ids[2]}/status").json()
        queued_result = result(client, ids[2]).json()
        first = client.get(f"/v1/requests/{ids[0]}/status").json()
        for request_id in ids:
            wait_done(client, request_id)
        done = client.get(f"/v1/requests/{ids[0]}/status").json()
    assert (second["status"], second["queue_position"]) == ("in_queue", 1)
    assert (third["status"], third["queue_position"]) == ("in_queue", 2)
    assert queued_result["status"] == "in_queue" and queued_result["output"] is None
    assert queued_result["finished_at"] is None and queued_result["queue_position"] == 2
    assert first["status"] == "in_progress" and "queue_position" not in first
    assert "queue_position" not in done
    jobs = [emulator.job(request_id) for request_id in ids]
    assert [job.started_at for job in jobs] == sorted(job.started_at for job in jobs)
    waits = [job.queue_wait_seconds for job in jobs]
    assert waits[0] < 0.1 and waits[1] >= duration / 2 and waits[2] >= duration * 1.5
    assert all(job.duration_seconds == duration for job in jobs)
    assert emulator.stats.peak_in_progress == 1


def test_only_a_queued_job_can_be_cancelled(emulator_factory, image_server):
    # Long enough for both cancels to land while the first job runs, on a loaded machine.
    emulator = emulator_factory(workers=1, fixed_duration_seconds=2.0)
    with api(emulator) as client:
        running = submit(client, body(image_server))
        queued = submit(client, body(image_server))
        wait_for_status(client, running, "in_progress")
        cancelled = client.post(f"/v1/requests/{queued}/cancel").json()
        refused = client.post(f"/v1/requests/{running}/cancel").json()
        assert wait_done(client, running)["status"] == "completed"
        late = client.post(f"/v1/requests/{running}/cancel").json()
        queued_result = result(client, queued).json()
    assert cancelled == {"request_id": queued, "status": "cancelled", "outcome": "cancelled"}
    assert refused == {"request_id": running, "status": "in_progress", "outcome": "not_cancellable"}
    assert late["outcome"] == "not_cancellable" and late["status"] == "completed"
    assert queued_result["status"] == "cancelled" and queued_result["output"] is None
    stats = emulator.stats
    assert stats.cancel_attempts == 3
    assert stats.cancel_outcomes == {"cancelled": 1, "not_cancellable": 2}
    assert stats.requests[queued].cancel == 1 and stats.requests[running].cancel == 2
    assert len(stats.fetched_input_urls) == 1  # the cancelled job never ran
    assert stats.spent_usd == pytest.approx(0.15)  # a cancelled job is refunded


def test_durations_follow_the_reported_latencies_and_the_seed(emulator_factory, image_server):
    # time_scale=1: real durations are only drawn, never waited for (workers stay busy).
    draws: dict[int, list[float]] = {}
    for attempt in (1, 2):
        emulator = emulator_factory(workers=1, time_scale=1.0, seed=7)
        with api(emulator) as client:
            ids = [submit(client, body(image_server, resolution="4K")) for _ in range(150)]
        draws[attempt] = [emulator.job(request_id).duration_seconds for request_id in ids]
        emulator.stop()
    assert draws[1] == draws[2]
    assert statistics.mean(draws[1]) == pytest.approx(60, rel=0.1)
    assert statistics.quantiles(draws[1], n=20)[-1] == pytest.approx(90, rel=0.15)


def test_time_scale_shrinks_durations(emulator_factory, image_server):
    emulator = emulator_factory(time_scale=0.01, seed=3)
    with api(emulator) as client:
        ids = [submit(client, body(image_server, resolution="1K")) for _ in range(40)]
    assert statistics.mean(emulator.job(i).duration_seconds for i in ids) == pytest.approx(
        0.175, rel=0.15
    )


def test_many_concurrent_jobs_and_fast_polling(emulator_factory, image_server):
    emulator = emulator_factory(workers=50, fixed_duration_seconds=0.3)
    finished: list[str] = []
    lock = threading.Lock()

    def run(count: int) -> None:
        with api(emulator) as client:
            ids = [submit(client, body(image_server, output_format="jpeg")) for _ in range(count)]
            for request_id in ids:
                assert wait_done(client, request_id, timeout=30)["status"] == "completed"
                with lock:
                    finished.append(request_id)

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(25,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    stats = emulator.stats
    assert len(set(finished)) == 200
    assert stats.peak_in_progress == 50
    assert stats.jobs_by_status == {"completed": 200}
    # 200 jobs of 0.3 s on 50 workers need 4 rounds (1.2 s); polling must not slow them down.
    assert elapsed < 6
    assert stats.calls["status"] / elapsed > 100


# -- errors of the API ------------------------------------------------------------


def test_missing_or_unknown_token_is_401_with_400004(emulator, image_server):
    with api(emulator, token=None) as anonymous, api(emulator, token="wrong") as wrong:
        answers = [
            anonymous.post(MODEL_PATH, json=body(image_server)),
            wrong.post(MODEL_PATH, json=body(image_server)),
            wrong.get("/v1/requests/some-id/status"),
            anonymous.get(MODEL_PATH),
        ]
    assert [answer.status_code for answer in answers] == [401] * 4
    assert {answer.json()["error_code"] for answer in answers} == {400004}
    assert emulator.stats.submits_received == 2 and emulator.stats.submits_accepted == 0


def test_auth_errors_can_come_as_http_200(emulator_factory, image_server):
    emulator = emulator_factory(auth_errors_as_http_200=True)
    with api(emulator, token="wrong") as client:
        answer = client.post(MODEL_PATH, json=body(image_server))
    assert answer.status_code == 200
    assert answer.json()["error_code"] == 400004 and "token" in answer.json()["error_message"]


def test_another_tokens_request_is_403001(emulator_factory, image_server):
    emulator = emulator_factory(api_tokens=("test-token", "other-token"))
    with api(emulator) as mine, api(emulator, token="other-token") as theirs:
        request_id = submit(mine, body(image_server))
        answers = [
            theirs.get(f"/v1/requests/{request_id}/status"),
            theirs.get(f"/v1/requests/{request_id}/result"),
            theirs.post(f"/v1/requests/{request_id}/cancel"),
        ]
        own = mine.get(f"/v1/requests/{request_id}/status")
    assert [answer.status_code for answer in answers] == [403] * 3
    assert {answer.json()["error_code"] for answer in answers} == {403001}
    assert own.status_code == 200
    assert emulator.job(request_id).status != "cancelled"


def test_unknown_request_id_is_404001(emulator):
    with api(emulator) as client:
        answers = [
            client.get("/v1/requests/nope/status"),
            client.get("/v1/requests/nope/result"),
            client.post("/v1/requests/nope/cancel"),
        ]
    assert [answer.status_code for answer in answers] == [404] * 3
    assert {answer.json()["error_code"] for answer in answers} == {404001}
    with pytest.raises(KeyError):
        emulator.job("nope")


def test_invalid_body_is_422001_with_detail(emulator, image_server):
    with api(emulator) as client:
        missing = client.post(MODEL_PATH, json={"image_urls": []})
        extra = client.post(MODEL_PATH, json=body(image_server, seed=3, num_images=9))
        not_json = client.post(MODEL_PATH, content=b"{oops", headers={"Content-Type": "text/plain"})
    assert missing.status_code == 422 and missing.json()["error_code"] == 422001
    assert {tuple(item["loc"]) for item in missing.json()["detail"]} == {
        ("body", "prompt"),
        ("body", "image_urls"),
    }
    assert {(tuple(item["loc"]), item["type"]) for item in extra.json()["detail"]} == {
        (("body", "seed"), "extra_forbidden"),
        (("body", "num_images"), "less_than_equal"),
    }
    assert all(item["msg"] for item in extra.json()["detail"])
    assert not_json.status_code == 422 and not_json.json()["detail"][0]["type"] == "json_invalid"
    assert emulator.stats.submits_accepted == 0


def test_unknown_model_is_400001(emulator, image_server):
    with api(emulator) as client:
        submitted = client.post("/v1/models/google/nano-banana/edit", json=body(image_server))
        described = client.get("/v1/models/acme/other")
    assert (submitted.status_code, submitted.json()["error_code"]) == (400, 400001)
    assert (described.status_code, described.json()["error_code"]) == (400, 400001)


def test_balance_runs_out_with_400002(emulator_factory, image_server):
    emulator = emulator_factory(balance_usd=0.5)
    with api(emulator) as client:
        submit(client, body(image_server, num_images=2))  # 0.30
        too_much = client.post(MODEL_PATH, json=body(image_server, resolution="4K"))  # +0.30
        submit(client, body(image_server))  # +0.15 fits
    assert too_much.status_code == 400
    assert too_much.json()["error_code"] == 400002
    assert "$0.30" in too_much.json()["error_message"]
    assert emulator.stats.submits_accepted == 2
    assert emulator.stats.spent_usd == pytest.approx(0.45)


def test_cost_only_when_asked_and_completed(emulator_factory, image_server):
    emulator = emulator_factory(workers=1, fixed_duration_seconds=0.2)
    with api(emulator) as client:
        first = submit(client, body(image_server, resolution="4K", num_images=2))
        second = submit(client, body(image_server))
        queued = result(client, second, include_cost="true").json()
        wait_done(client, first)
        wait_done(client, second)
        costed = result(client, first, include_cost="true").json()
        plain = result(client, first).json()
        cheap = result(client, second, include_cost="true").json()
    assert "cost" not in queued
    assert costed["cost"] == pytest.approx(0.60)
    assert "cost" not in plain
    assert cheap["cost"] == pytest.approx(0.15)


def test_routing_errors(emulator):
    with api(emulator) as client:
        unknown = client.get("/v2/whatever")
        wrong_method = client.get("/v1/requests/x/cancel")
    assert unknown.status_code == 404
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"


# -- inputs -----------------------------------------------------------------------


def test_inputs_are_fetched_with_their_query_and_redirects_followed(emulator, image_server):
    signed = image_server.url_for("square.png", "X-Amz-Signature=abc123&X-Amz-Expires=60")
    redirected = image_server.url_for("redirect/tall.jpg")
    with api(emulator) as client:
        request_id = submit(
            client, {"prompt": "p", "image_urls": [signed, redirected], "aspect_ratio": "auto"}
        )
        assert wait_done(client, request_id)["status"] == "completed"
    assert emulator.stats.fetched_input_urls == [signed, redirected]
    assert "/square.png?X-Amz-Signature=abc123&X-Amz-Expires=60" in image_server.requested_paths
    assert "/tall.jpg" in image_server.requested_paths
    assert emulator.job(request_id).output_size == (1024, 1024)  # auto follows the first input


@pytest.mark.parametrize(
    ("url_of", "reason"),
    [
        (
            lambda server: server.url_for("not-an-image.txt", "X-Amz-Signature=s3cr3t"),
            "not an image",
        ),
        (lambda server: server.url_for("missing.png", "X-Amz-Signature=s3cr3t"), "HTTP 404"),
        (lambda server: "http://127.0.0.1:9/a.png?X-Amz-Signature=s3cr3t", "ConnectError"),
        (lambda server: "ftp://user:s3cr3t@files.example/a.png", "not an http(s) URL"),
    ],
)
def test_bad_input_fails_the_job_without_leaking_secrets(emulator, image_server, url_of, reason):
    url = url_of(image_server)
    with api(emulator) as client:
        request_id = submit(client, {"prompt": "p", "image_urls": [url]})
        assert wait_done(client, request_id)["status"] == "failed"
        answer = result(client, request_id).json()
    public = url.split("?")[0].replace("user:s3cr3t@", "")
    assert public in answer["error"] and reason in answer["error"]
    assert "s3cr3t" not in json.dumps(answer)
    assert answer["output"] is None
    assert emulator.stats.fetched_input_urls == [url]


# -- outputs ----------------------------------------------------------------------


def test_outputs_and_results_expire_after_the_ttl(emulator_factory, image_server):
    # Room for the wait, the result and the download before the outputs expire.
    emulator = emulator_factory(output_ttl_seconds=1.0)
    with api(emulator) as client:
        request_id = submit(client, body(image_server))
        wait_done(client, request_id)
        url = result(client, request_id).json()["output"]["image"]
        fresh = client.get(url)
        time.sleep(1.05)
        expired_result = result(client, request_id)
        expired_file = client.get(url)
        status = client.get(f"/v1/requests/{request_id}/status").json()
    assert fresh.status_code == 200
    assert (expired_result.status_code, expired_result.json()["error_code"]) == (404, 404001)
    assert expired_file.status_code == 404
    assert status["status"] == "completed"
    assert emulator.job(request_id).expired


@pytest.mark.parametrize(
    ("output_format", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
)
def test_output_min_bytes_pads_to_a_valid_image(
    emulator_factory, image_server, output_format, pil_format
):
    emulator = emulator_factory(output_min_bytes=300_001)
    with api(emulator) as client:
        request_id = submit(client, body(image_server, output_format=output_format))
        wait_done(client, request_id)
        data = client.get(result(client, request_id).json()["output"]["image"]).content
    assert 300_001 <= len(data) < 300_100
    image = open_image(data)
    assert (image.format, image.size) == (pil_format, (1376, 768))


# -- faults -----------------------------------------------------------------------


def test_rate_limit_fault_with_retry_after(emulator_factory, image_server):
    emulator = emulator_factory(
        faults=FaultPlan([Fault("rate_limit", "submit", calls=[1], retry_after=1.5)])
    )
    with api(emulator) as client:
        limited = client.post(MODEL_PATH, json=body(image_server))
        accepted = client.post(MODEL_PATH, json=body(image_server))
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1.5"
    assert accepted.status_code == 200
    stats = emulator.stats
    assert (stats.submits_received, stats.submits_accepted) == (2, 1)
    assert stats.faults_fired == {"rate_limit": 1}


def test_server_error_fault_every_nth_call_with_status_code(emulator_factory):
    emulator = emulator_factory(
        faults=FaultPlan([Fault("server_error", "status", every=2, status_code=503)])
    )
    with api(emulator) as client:
        codes = [client.get("/v1/requests/x/status").status_code for _ in range(4)]
        failed = client.get("/v1/requests/x/status")
        body_of_failure = client.get("/v1/requests/x/status").json()
    assert codes == [404, 503, 404, 503]
    assert failed.status_code == 404
    assert body_of_failure["error_code"] == 500001


def test_slow_fault_delays_the_answer(emulator_factory):
    emulator = emulator_factory(
        faults=FaultPlan([Fault("slow", "model", calls=[1], delay_seconds=0.3)])
    )
    with api(emulator) as client:
        started = time.monotonic()
        client.get(MODEL_PATH)
        slow = time.monotonic() - started
        started = time.monotonic()
        client.get(MODEL_PATH)
        fast = time.monotonic() - started
    assert slow >= 0.3 and fast < 0.2


def test_drop_fault_closes_the_connection_without_an_answer(emulator_factory):
    emulator = emulator_factory(faults=FaultPlan([Fault("drop", "result", calls=[1])]))
    with api(emulator) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/v1/requests/x/result")
        assert client.get("/v1/requests/x/result").status_code == 404


@pytest.mark.parametrize("kind", ["server_error", "drop"])
def test_after_accept_faults_create_the_job_then_fail(emulator_factory, image_server, kind):
    emulator = emulator_factory(
        faults=FaultPlan([Fault(kind, "submit", calls=[1], after_accept=True)])
    )
    with api(emulator) as client:
        if kind == "drop":
            with pytest.raises(httpx.RemoteProtocolError):
                client.post(MODEL_PATH, json=body(image_server))
        else:
            assert client.post(MODEL_PATH, json=body(image_server)).status_code == 500
    stats = emulator.stats
    assert (stats.submits_received, stats.submits_accepted) == (1, 1)
    assert sum(stats.jobs_by_status.values()) == 1


def test_fail_job_fault_fails_only_the_targeted_job(emulator_factory, image_server):
    emulator = emulator_factory(faults=FaultPlan.parse("job:fail_job@2"))
    with api(emulator) as client:
        ids = [submit(client, body(image_server)) for _ in range(3)]
        statuses = [wait_done(client, request_id)["status"] for request_id in ids]
        error = result(client, ids[1]).json()["error"]
    assert statuses == ["completed", "failed", "completed"]
    assert "fail_job" in error
    assert emulator.job(ids[1]).fault == "fail_job"


def test_stuck_fault_keeps_a_job_queued_until_cancelled(emulator_factory, image_server):
    emulator = emulator_factory(faults=FaultPlan([Fault("stuck", calls=[1])]))
    with api(emulator) as client:
        stuck = submit(client, body(image_server))
        normal = submit(client, body(image_server))
        assert wait_done(client, normal)["status"] == "completed"
        still = client.get(f"/v1/requests/{stuck}/status").json()
        cancelled = client.post(f"/v1/requests/{stuck}/cancel").json()
    assert still["status"] == "in_queue" and still["queue_position"] == 1
    assert cancelled["outcome"] == "cancelled"
    assert emulator.stats.fetched_input_urls == [image_server.url_for("wide.png")]


def test_expire_output_fault_loses_result_and_files_at_completion(emulator_factory, image_server):
    emulator = emulator_factory(faults=FaultPlan([Fault("expire_output", calls=[1])]))
    with api(emulator) as client:
        request_id = submit(client, body(image_server))
        assert wait_done(client, request_id)["status"] == "completed"
        answer = result(client, request_id)
        file = client.get(f"/files/{request_id}/0.png")
    assert (answer.status_code, answer.json()["error_code"]) == (404, 404001)
    assert file.status_code == 404


def test_files_faults_and_times_cap(emulator_factory, image_server):
    emulator = emulator_factory(faults=FaultPlan.parse("files:server_error:times=2"))
    with api(emulator) as client:
        request_id = submit(client, body(image_server))
        wait_done(client, request_id)
        url = result(client, request_id).json()["output"]["image"]
        codes = [client.get(url).status_code for _ in range(3)]
    assert codes == [500, 500, 200]
    assert emulator.stats.calls["output"] == 3
    assert emulator.stats.faults_fired == {"server_error": 2}


def test_probability_faults_follow_the_seed(emulator_factory):
    outcomes = []
    for _ in range(2):
        emulator = emulator_factory(seed=11, faults=FaultPlan.parse("status:server_error@p=0.5"))
        with api(emulator) as client:
            outcomes.append([client.get("/v1/requests/x/status").status_code for _ in range(30)])
    assert outcomes[0] == outcomes[1]
    assert 5 < outcomes[0].count(500) < 25 and set(outcomes[0]) == {404, 500}


def test_set_faults_at_runtime_counts_from_then(emulator):
    with api(emulator) as client:
        client.get(MODEL_PATH)
        emulator.set_faults("model:server_error@1")
        failed = client.get(MODEL_PATH)
        recovered = client.get(MODEL_PATH)
        emulator.set_faults(None)
    assert (failed.status_code, recovered.status_code) == (500, 200)
    assert emulator.faults == FaultPlan()


# -- fault plans ------------------------------------------------------------------


def test_fault_spec_parses_and_round_trips():
    plan = FaultPlan.parse(
        "submit:rate_limit@1:retry_after=0.1, status:server_error@every=3:status=502,"
        "job:fail_job@p=0.1, result:drop@1-3+7, *:slow:delay=0.5:times=10,"
        "submit:drop@2:after_accept, output:slow@1:delay=1"
    )
    assert plan.faults == (
        Fault("rate_limit", "submit", calls=[1], retry_after=0.1),
        Fault("server_error", "status", every=3, status_code=502),
        Fault("fail_job", "job", probability=0.1),
        Fault("drop", "result", calls=[1, 2, 3, 7]),
        Fault("slow", "*", delay_seconds=0.5, times=10),
        Fault("drop", "submit", calls=[2], after_accept=True),
        Fault("slow", "files", calls=[1], delay_seconds=1.0),
    )
    assert FaultPlan.parse(plan.to_spec()) == plan
    assert FaultPlan.from_json(json.dumps(plan.to_json())) == plan
    assert FaultPlan.from_json({"spec": "job:stuck"}) == FaultPlan([Fault("stuck")])
    assert FaultPlan.parse("") == FaultPlan()


@pytest.mark.parametrize(
    "spec",
    [
        "submit:explode",
        "status:rate_limit:wobble=1",
        "status:server_error@1:after_accept",
        "status:slow",
        "status:rate_limit:status=503",
        "job:rate_limit",
        "nowhere:drop",
        "submit",
        "status:drop@p=1.5",
    ],
)
def test_bad_fault_specs_are_refused(spec):
    with pytest.raises(ValueError):
        FaultPlan.parse(spec)


# -- control endpoints, CLI, lifecycle --------------------------------------------------


def test_control_endpoints_drive_an_emulator_from_outside(emulator, image_server):
    with api(emulator) as client, httpx.Client(base_url=emulator.base_url) as control:
        submit(client, body(image_server))
        stats = EmulatorStats.from_json(control.get("/_emulator/stats").json())
        set_plan = control.post("/_emulator/faults", json={"spec": "status:server_error@1"})
        faulted = client.get("/v1/requests/x/status")
        bad = control.post("/_emulator/faults", json={"faults": [{"kind": "nope"}]})
        assert control.post("/_emulator/reset").status_code == 200
        after_reset = control.get("/_emulator/stats").json()
        plan = FaultPlan([Fault("rate_limit", "model", calls=[1])])
        control.post("/_emulator/faults", json=plan.to_json())
        limited = client.get(MODEL_PATH)
    assert stats.calls["submit"] == 1 and stats.submits_accepted == 1
    assert set_plan.json()["spec"] == "status:server_error@1"
    assert faulted.status_code == 500
    assert bad.status_code == 400 and "nope" in bad.json()["error_message"]
    assert after_reset["calls"] == dict.fromkeys(after_reset["calls"], 0)
    assert after_reset["submits_accepted"] == 0 and after_reset["jobs_by_status"] != {}
    assert limited.status_code == 429
    assert emulator.faults == plan


def test_stop_is_fast_with_open_connections_and_a_slow_answer_in_flight(image_server):
    emulator = EmulatorServer(
        EmulatorConfig(time_scale=1.0, faults=FaultPlan.parse("model:slow:delay=30"))
    ).start()
    slow_outcome: list[BaseException] = []

    def ask_slowly() -> None:
        with api(emulator) as slow_client:
            try:
                slow_client.get(MODEL_PATH)
            except httpx.HTTPError as exc:
                slow_outcome.append(exc)

    with api(emulator) as idle, api(emulator) as client:
        idle.get("/v1/requests/x/status")  # leaves a keep-alive connection open and idle
        request_id = submit(client, body(image_server))  # a job drawn at ~17 s
        wait_for_status(client, request_id, "in_progress")
        waiting = threading.Thread(target=ask_slowly, daemon=True)
        waiting.start()
        # In flight: the emulator has it (a fixed sleep was too short on a loaded machine,
        # and the stop then refused the connection instead of dropping the answer).
        deadline = time.monotonic() + 10
        while emulator.stats.calls["model"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        emulator.stop()
        stopped_in = time.monotonic() - started
        waiting.join(timeout=5)
        with pytest.raises(httpx.TransportError):
            idle.get("/v1/requests/x/status")
    # Not a speed test: without the fix, stop waited for the 30 s answer and the ~17 s job.
    assert stopped_in < 5
    assert not waiting.is_alive()
    assert len(slow_outcome) == 1 and isinstance(slow_outcome[0], httpx.RemoteProtocolError)
    assert emulator.job(request_id).status == "in_progress"


def test_module_main_serves_until_interrupted():
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect_nanobanana.emulator",
            "--port",
            "0",
            "--token",
            "tok",
            "--time-scale",
            "0.01",
            "--faults",
            "model:rate_limit@1",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        banner = [process.stdout.readline() for _ in range(7)]
        base_url = banner[0].rsplit(" ", 1)[1].strip()
        headers = {"Authorization": "Bearer tok"}
        first = httpx.get(f"{base_url}{MODEL_PATH}", headers=headers)
        second = httpx.get(f"{base_url}{MODEL_PATH}", headers=headers)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
    assert base_url.startswith("http://127.0.0.1:")
    assert f"export RUNCOMFY_BASE_URL={base_url}\n" in banner
    assert "export RUNCOMFY_API_TOKEN=tok\n" in banner
    assert "export RUNCOMFY_POLL_TIME_SCALE=0.01\n" in banner
    assert "# faults: model:rate_limit@1\n" in banner
    assert (first.status_code, second.status_code) == (429, 200)


def _png_data_uri(colour: tuple[int, int, int], size: tuple[int, int] = (300, 200)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _output_image(client: httpx.Client, request_id: str) -> Image.Image:
    result = client.get(f"/v1/requests/{request_id}/result").json()
    return Image.open(io.BytesIO(client.get(result["output"]["image"]).content)).convert("RGB")


def test_data_uri_inputs_are_accepted_and_the_output_is_made_from_the_first(emulator):
    red, blue = _png_data_uri((220, 30, 30)), _png_data_uri((30, 30, 220))
    tall = _png_data_uri((30, 30, 220), (90, 160))
    with api(emulator) as client:
        ids = {
            name: submit(client, {"prompt": "Add snow", "image_urls": urls})
            for name, urls in {
                "red": [red],
                "blue": [blue, red],
                "again": [red],
                "tall": [tall],
            }.items()
        }
        for request_id in ids.values():
            assert wait_done(client, request_id)["status"] == "completed"
        outputs = {name: _output_image(client, request_id) for name, request_id in ids.items()}
    # Auto ratio follows the first input: 3:2 landscape, 9:16 portrait, at the table's size.
    assert outputs["red"].size == OUTPUT_PIXEL_SIZES["3:2"]["1K"]
    assert outputs["tall"].size == OUTPUT_PIXEL_SIZES["9:16"]["1K"]
    # Derived from the first input: same prompt and size, yet the red and the blue picture differ.
    red_pixel, blue_pixel = (outputs[name].getpixel((600, 300)) for name in ("red", "blue"))
    assert red_pixel != blue_pixel
    # Deterministic: the same input and prompt give the same picture.
    assert outputs["again"].tobytes() == outputs["red"].tobytes()
    # The stats name an inline input by type and length, never by its payload.
    fetched = emulator.stats.fetched_input_urls
    assert len(fetched) == 5 and all(len(line) < 80 for line in fetched)
    assert fetched[0].startswith("data:image/png;base64,... (")
    assert emulator.job(ids["red"]).image_urls == (red,)


def test_the_prompt_picks_a_visible_deterministic_change(emulator):
    from prefect_nanobanana.emulator.images import effect_for

    prompts = [f"edit number {number}" for number in range(40)]
    assert len({effect_for(prompt) for prompt in prompts}) == 6  # every effect is reachable
    assert [effect_for(prompt) for prompt in prompts] == [effect_for(p) for p in prompts]
    by_effect = {effect_for(prompt): prompt for prompt in reversed(prompts)}
    source = _png_data_uri((200, 120, 40), (400, 400))
    with api(emulator) as client:
        ids = {
            effect: submit(client, {"prompt": by_effect[effect], "image_urls": [source]})
            for effect in ("invert", "posterise")
        }
        for request_id in ids.values():
            wait_done(client, request_id)
        centres = {
            effect: _output_image(client, request_id).getpixel((512, 300))
            for effect, request_id in ids.items()
        }
    # The input's colour, changed as the effect says (a flat colour survives resizing exactly).
    assert centres == {"invert": (55, 135, 215), "posterise": (192, 64, 0)}


def test_a_bad_data_uri_fails_the_job_with_a_short_reason(emulator):
    with api(emulator) as client:
        not_base64 = submit(client, {"prompt": "x", "image_urls": ["data:image/png;base64,@@@"]})
        not_image = submit(
            client,
            {"prompt": "x", "image_urls": ["data:image/png;base64," + "QUFB" * 1000]},
        )
        first, second = wait_done(client, not_base64), wait_done(client, not_image)
        reasons = [
            client.get(f"/v1/requests/{request_id}/result").json()["error"]
            for request_id in (not_base64, not_image)
        ]
    assert (first["status"], second["status"]) == ("failed", "failed")
    assert "not valid base64" in reasons[0]
    assert "not an image" in reasons[1] and len(reasons[1]) < 200


def test_a_body_over_the_request_cap_gets_413_and_the_connection_stays_usable(
    emulator_factory,
):
    emulator = emulator_factory(max_request_bytes=1000)
    with api(emulator, "test-token") as client:
        big = client.post(MODEL_PATH, json={"prompt": "x", "image_urls": ["a" * 5000]})
        after = client.get("/_emulator/stats")
    assert big.status_code == 413 and big.json()["error_code"] == 422001
    assert "URLs instead of inline data: URIs" in big.json()["error_message"]
    assert after.status_code == 200 and after.json()["submits_accepted"] == 0


def test_print_env_starts_in_the_background_for_eval(tmp_path):
    log_file = tmp_path / "emulator.log"
    script = (
        f'eval "$({sys.executable} -m prefect_nanobanana.emulator --port 0 --token tok '
        f'--time-scale 0.1 --print-env --log-file {log_file})"\n'
        'echo "$RUNCOMFY_BASE_URL $RUNCOMFY_API_TOKEN $RUNCOMFY_POLL_TIME_SCALE '
        '$NANOBANANA_EMULATOR_PID"\n'
    )
    done = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    base_url, token, scale, pid = done.stdout.split()
    try:
        answer = httpx.get(f"{base_url}{MODEL_PATH}", headers={"Authorization": f"Bearer {token}"})
    finally:
        os.kill(int(pid), signal.SIGTERM)
    assert base_url.startswith("http://127.0.0.1:") and (token, scale) == ("tok", "0.1")
    assert answer.status_code == 200


def test_print_env_says_why_when_the_port_is_taken(emulator, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect_nanobanana.emulator",
            "--port",
            str(emulator.port),
            "--print-env",
            "--log-file",
            str(tmp_path / "emulator.log"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert f"cannot listen on 127.0.0.1:{emulator.port}" in done.stderr


def test_help_names_the_command_people_type():
    done = subprocess.run(
        [sys.executable, "-m", "prefect_nanobanana.emulator", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.startswith("usage: nanobanana emulator ")
    assert "--print-env" in done.stdout
