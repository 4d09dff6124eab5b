"""The client against the emulator over real HTTP on loopback: no mocking of our own HTTP."""

from __future__ import annotations

import base64
import io
import logging

import httpx
import pytest
from PIL import Image

from prefect_nanobanana import (
    OUTPUT_PIXEL_SIZES,
    AsyncRunComfyClient,
    AuthenticationError,
    InsufficientBalanceError,
    InvalidRequestError,
    JobCancelledError,
    JobFailedError,
    NotFoundError,
    PermissionDeniedError,
    PollingPolicy,
    RateLimitedError,
    RetryPolicy,
    RunComfyClient,
    ServerError,
    SubmitOutcomeUnknownError,
    WaitTimeoutError,
)
from prefect_nanobanana.emulator import Fault, FaultPlan

FAST_RETRIES = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.2)
TIME_SCALE = 0.005


def make_client(emulator, token: str, **options) -> RunComfyClient:
    options.setdefault("retry_policy", FAST_RETRIES)
    options.setdefault("polling_policy", PollingPolicy(time_scale=TIME_SCALE))
    return RunComfyClient(api_token=token, base_url=emulator.base_url, **options)


def edit(image_server, **options) -> dict:
    return {"prompt": "paint it teal", "image_urls": [image_server.url_for("wide.png")], **options}


def fetch_image(url: str) -> Image.Image:
    if url.startswith("data:"):
        data = base64.b64decode(url.split(",", 1)[1])
    else:
        response = httpx.get(url)
        response.raise_for_status()
        data = response.content
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(
    ("output_format", "aspect_ratio", "resolution", "pil_format"),
    [
        ("png", "1:1", "1K", "PNG"),
        ("jpeg", "16:9", "1K", "JPEG"),
        ("webp", "9:16", "2K", "WEBP"),
        ("png", "21:9", "1K", "PNG"),
        ("jpeg", "4:5", "1K", "JPEG"),
    ],
)
def test_happy_path_produces_images_of_the_documented_size(
    emulator, emulator_token, image_server, output_format, aspect_ratio, resolution, pil_format
):
    with make_client(emulator, emulator_token) as client:
        handle = client.submit_edit(
            edit(
                image_server,
                output_format=output_format,
                aspect_ratio=aspect_ratio,
                resolution=resolution,
            )
        )
        result = client.wait(handle.request_id, timeout=30, resolution=resolution)
    assert result.status == "completed"
    assert len(result.output_urls) == 1
    image = fetch_image(result.output_urls[0])
    assert image.format == pil_format
    assert image.size == OUTPUT_PIXEL_SIZES[aspect_ratio][resolution]
    assert result.created_at is not None and result.finished_at is not None
    assert result.cost is not None and result.cost > 0


def test_num_images_and_sync_mode_data_uris(emulator, emulator_token, image_server):
    with make_client(emulator, emulator_token) as client:
        handle = client.submit_edit(
            edit(image_server, num_images=3, sync_mode=True, aspect_ratio="3:2")
        )
        result = client.wait(handle.request_id, timeout=30)
    assert len(result.output_urls) == 3
    assert all(url.startswith("data:image/png;base64,") for url in result.output_urls)
    assert {fetch_image(url).size for url in result.output_urls} == {(1264, 848)}


def test_wait_logs_each_status_change_with_queue_position(
    emulator_factory, emulator_token, image_server, caplog
):
    emulator = emulator_factory(workers=1, fixed_duration_seconds=0.3)
    caplog.set_level(logging.INFO, logger="prefect_nanobanana.client")
    seen = []
    with make_client(emulator, emulator_token) as client:
        first = client.submit_edit(edit(image_server))
        second = client.submit_edit(edit(image_server))
        result = client.wait(second.request_id, timeout=30, on_status=seen.append)
        client.wait(first.request_id, timeout=30)
    assert result.status == "completed"
    statuses = [status.status for status in seen]
    assert statuses[0] == "in_queue" and seen[0].queue_position == 1
    assert statuses[-2:] == ["in_progress", "completed"]
    assert any("queue position 1" in record.getMessage() for record in caplog.records)
    assert emulator.stats.calls["status"] < 30


def test_cancel_while_queued_and_while_in_progress(emulator_factory, emulator_token, image_server):
    emulator = emulator_factory(workers=1, fixed_duration_seconds=1.0)
    with make_client(emulator, emulator_token) as client:
        running = client.submit_edit(edit(image_server))
        queued = client.submit_edit(edit(image_server))
        while client.status(running.request_id).status != "in_progress":
            pass
        assert client.cancel(queued.request_id).outcome == "cancelled"
        assert client.cancel(running.request_id).outcome == "not_cancellable"
        with pytest.raises(JobCancelledError) as caught:
            client.wait(queued.request_id, timeout=10)
        assert caught.value.request_id == queued.request_id
        assert client.wait(running.request_id, timeout=10).status == "completed"


def test_failed_job_carries_the_server_message(emulator_factory, emulator_token, image_server):
    emulator = emulator_factory(faults=FaultPlan([Fault("fail_job", endpoint="submit")]))
    with make_client(emulator, emulator_token) as client:
        handle = client.submit_edit(edit(image_server))
        with pytest.raises(JobFailedError) as caught:
            client.wait(handle.request_id, timeout=10)
    assert caught.value.request_id == handle.request_id
    assert "failed:" in str(caught.value)


def test_unreachable_input_fails_the_job_without_echoing_the_signature(emulator, emulator_token):
    url = "http://127.0.0.1:9/missing.png?X-Amz-Signature=deadbeefsecret"
    with make_client(emulator, emulator_token) as client:
        handle = client.submit_edit({"prompt": "p", "image_urls": [url]})
        with pytest.raises(JobFailedError) as caught:
            client.wait(handle.request_id, timeout=10)
    assert "deadbeefsecret" not in str(caught.value)


def test_wait_timeout_names_the_request(emulator_factory, emulator_token, image_server):
    emulator = emulator_factory(faults=FaultPlan([Fault("stuck", endpoint="submit")]))
    with make_client(emulator, emulator_token) as client:
        handle = client.submit_edit(edit(image_server))
        with pytest.raises(WaitTimeoutError) as caught:
            client.wait(handle.request_id, timeout=0.5)
        client.cancel(handle.request_id)
    assert caught.value.request_id == handle.request_id
    assert caught.value.last_status == "in_queue"


def test_authentication_errors_never_show_the_token(emulator, image_server):
    secret = "sk-wrong-and-secret"
    with make_client(emulator, secret) as client, pytest.raises(AuthenticationError) as caught:
        client.submit_edit(edit(image_server))
    assert caught.value.error_code == 400004
    assert secret not in str(caught.value) and secret not in repr(caught.value)
    assert emulator.stats.submits_accepted == 0


def test_auth_error_sent_as_http_200(emulator_factory, image_server):
    emulator = emulator_factory(auth_errors_as_http_200=True)
    with make_client(emulator, "nope") as client, pytest.raises(AuthenticationError):
        client.status("anything")


def test_other_accounts_request_unknown_request_and_validation(
    emulator_factory, emulator_token, image_server
):
    emulator = emulator_factory(api_tokens=(emulator_token, "other-token"))
    with (
        make_client(emulator, emulator_token) as mine,
        make_client(emulator, "other-token") as theirs,
    ):
        handle = mine.submit_edit(edit(image_server))
        with pytest.raises(PermissionDeniedError) as denied:
            theirs.status(handle.request_id)
        assert denied.value.error_code == 403001
        with pytest.raises(NotFoundError) as missing:
            mine.result("no-such-request")
        assert missing.value.error_code == 404001
        with pytest.raises(InvalidRequestError) as invalid:
            mine.submit("google/nano-banana/pro/edit", {"prompt": "x", "image_urls": []})
        assert invalid.value.error_code == 422001 and invalid.value.detail
        with pytest.raises(InvalidRequestError) as bad_model:
            mine.submit("not/a/model", {"prompt": "x", "image_urls": ["https://e.com/a.png"]})
        assert bad_model.value.error_code == 400001


def test_insufficient_balance(emulator_factory, emulator_token, image_server):
    emulator = emulator_factory(balance_usd=0.1)
    client = make_client(emulator, emulator_token)
    with client, pytest.raises(InsufficientBalanceError) as caught:
        client.submit_edit(edit(image_server))
    assert caught.value.error_code == 400002
    assert "top it up" in str(caught.value)


def test_submit_500_after_accept_is_outcome_unknown_with_exactly_one_submit(
    emulator_factory, emulator_token, image_server
):
    emulator = emulator_factory(
        faults=FaultPlan([Fault("server_error", endpoint="submit", calls=[1], after_accept=True)])
    )
    client = make_client(emulator, emulator_token)
    with client, pytest.raises(SubmitOutcomeUnknownError):
        client.submit_edit(edit(image_server))
    assert emulator.stats.submits_received == 1
    assert emulator.stats.submits_accepted == 1


def test_dropped_connection_on_submit_is_outcome_unknown(
    emulator_factory, emulator_token, image_server
):
    emulator = emulator_factory(
        faults=FaultPlan([Fault("drop", endpoint="submit", calls=[1], after_accept=True)])
    )
    client = make_client(emulator, emulator_token)
    with client, pytest.raises(SubmitOutcomeUnknownError):
        client.submit_edit(edit(image_server))
    assert emulator.stats.submits_received == 1


def test_submit_429_with_retry_after_is_retried(emulator_factory, emulator_token, image_server):
    emulator = emulator_factory(
        faults=FaultPlan([Fault("rate_limit", endpoint="submit", calls=[1, 2], retry_after=0.05)])
    )
    with make_client(emulator, emulator_token) as client:
        handle = client.submit_edit(edit(image_server))
        assert client.wait(handle.request_id, timeout=10).status == "completed"
    assert emulator.stats.submits_received == 3
    assert emulator.stats.submits_accepted == 1


def test_reads_survive_5xx_drops_and_slow_answers(emulator_factory, emulator_token, image_server):
    emulator = emulator_factory(
        faults=FaultPlan(
            [
                Fault("server_error", endpoint="status", every=2),
                Fault("drop", endpoint="result", calls=[1]),
                Fault("slow", endpoint="status", calls=[1], delay_seconds=0.3),
            ]
        )
    )
    with make_client(emulator, emulator_token) as client:
        handle = client.submit_edit(edit(image_server))
        result = client.wait(handle.request_id, timeout=20)
    assert result.status == "completed"
    assert emulator.stats.submits_accepted == 1


def test_reads_give_up_with_a_clear_error(emulator_factory, emulator_token):
    emulator = emulator_factory(faults=FaultPlan([Fault("rate_limit", endpoint="status")]))
    with make_client(emulator, emulator_token) as client, pytest.raises(RateLimitedError):
        client.status("whatever")
    assert emulator.stats.calls["status"] == FAST_RETRIES.max_attempts


def test_read_timeout_on_a_read_is_retried(emulator_factory, emulator_token, image_server):
    emulator = emulator_factory(
        faults=FaultPlan([Fault("slow", endpoint="status", calls=[1], delay_seconds=3.0)])
    )
    with make_client(emulator, emulator_token, timeout=1.0) as client:
        handle = client.submit_edit(edit(image_server))
        assert client.status(handle.request_id).request_id == handle.request_id
    assert emulator.stats.calls["status"] == 2


def test_persistent_5xx_on_reads_is_a_server_error(emulator_factory, emulator_token):
    emulator = emulator_factory(faults=FaultPlan([Fault("server_error", endpoint="result")]))
    with make_client(emulator, emulator_token) as client, pytest.raises(ServerError):
        client.result("x")


async def test_async_client_runs_many_edits_concurrently(
    emulator_factory, emulator_token, image_server
):
    import asyncio

    emulator = emulator_factory(workers=8, fixed_duration_seconds=0.2)
    async with AsyncRunComfyClient(
        api_token=emulator_token,
        base_url=emulator.base_url,
        retry_policy=FAST_RETRIES,
        polling_policy=PollingPolicy(time_scale=TIME_SCALE),
    ) as client:
        handles = await asyncio.gather(
            *(client.submit_edit(edit(image_server, output_format="jpeg")) for _ in range(8))
        )
        results = await asyncio.gather(
            *(client.wait(handle.request_id, timeout=20) for handle in handles)
        )
        cancel = await client.cancel(handles[0].request_id)
    assert [result.status for result in results] == ["completed"] * 8
    assert len({result.request_id for result in results}) == 8
    assert cancel.outcome == "not_cancellable"
    assert emulator.stats.submits_accepted == 8
