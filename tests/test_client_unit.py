"""Narrow unit tests of the client's parsing and retry decisions (respx; no server).

The behaviour against a real HTTP server is in test_client_emulator.py.
"""

from __future__ import annotations

import httpx
import pytest
import respx
from pydantic import ValidationError

from prefect_nanobanana import (
    AsyncRunComfyClient,
    AuthenticationError,
    InsufficientBalanceError,
    InvalidRequestError,
    NanoBananaEditInput,
    NotFoundError,
    PermissionDeniedError,
    RequestResult,
    RequestStatus,
    RetryPolicy,
    RunComfyClient,
    RunDurationEstimator,
    ServerError,
    SubmitOutcomeUnknownError,
)
from prefect_nanobanana.client.polling import PollingPolicy, PollState, next_poll_delay

BASE = "http://api.test"
TOKEN = "sk-unit-secret-token"
EDIT = {"prompt": "make it blue", "image_urls": ["https://example.com/a.png"]}
SUBMIT_PATH = f"{BASE}/v1/models/google/nano-banana/pro/edit"
FAST_RETRIES = RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.01)


@pytest.fixture
def client():
    with RunComfyClient(api_token=TOKEN, base_url=BASE, retry_policy=FAST_RETRIES) as client:
        yield client


@pytest.mark.parametrize(
    "changes",
    [
        {"prompt": ""},
        {"prompt": "   "},
        {"image_urls": []},
        {"image_urls": [f"https://e.com/{i}.png" for i in range(21)]},
        {"num_images": 5},
        {"num_images": 0},
        {"aspect_ratio": "7:3"},
        {"resolution": "8K"},
        {"output_format": "gif"},
        {"unknown_field": 1},
    ],
)
def test_edit_input_rejects_what_the_schema_forbids(changes):
    with pytest.raises(ValidationError):
        NanoBananaEditInput(**{**EDIT, **changes})


def test_edit_input_defaults_match_the_schema():
    edit = NanoBananaEditInput(**EDIT)
    assert edit.model_dump() == {
        **EDIT,
        "aspect_ratio": "auto",
        "resolution": "1K",
        "output_format": "png",
        "num_images": 1,
        "sync_mode": False,
    }
    NanoBananaEditInput(**{**EDIT, "image_urls": ["https://e.com/x.png"] * 20, "num_images": 4})


def test_status_aliases_are_normalised_and_extra_fields_kept():
    status = RequestStatus.model_validate(
        {"request_id": "r1", "status": "Succeeded", "new_field": 7}
    )
    assert status.status == "completed"
    assert status.is_terminal
    assert status.model_extra == {"new_field": 7}
    assert RequestStatus(request_id="r", status="canceled").status == "cancelled"


def test_result_collects_every_output_url_in_order():
    result = RequestResult.model_validate(
        {
            "request_id": "r1",
            "status": "completed",
            "output": {
                "videos": ["https://v/2.mp4"],
                "images": ["https://i/1.png", "data:image/png;base64,AAAA"],
                "image": "https://i/0.png",
                "video": "https://v/1.mp4",
            },
            "cost": 0.3,
            "created_at": "2026-11-25T10:00:00Z",
        }
    )
    assert result.output_urls == [
        "https://i/0.png",
        "https://i/1.png",
        "data:image/png;base64,AAAA",
        "https://v/1.mp4",
        "https://v/2.mp4",
    ]
    assert result.model_dump()["output_urls"] == result.output_urls
    assert result.cost == 0.3
    assert result.created_at is not None and result.created_at.year == 2026


@respx.mock
def test_http_200_with_error_code_is_an_authentication_error(client):
    respx.get(f"{BASE}/v1/requests/r1/status").respond(
        200, json={"error_code": 400004, "error_message": "token revoked"}
    )
    with pytest.raises(AuthenticationError) as caught:
        client.status("r1")
    assert caught.value.error_code == 400004
    assert caught.value.request_id == "r1"
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("http_status", "body", "error_class"),
    [
        (400, {"error_code": 400002, "error_message": "no money"}, InsufficientBalanceError),
        (403, {"error_code": 403001}, PermissionDeniedError),
        (404, {"error_code": 404001}, NotFoundError),
        (400, {"error_code": 400001, "message": "bad model"}, InvalidRequestError),
        (422, {"error_code": 422001, "detail": [{"loc": ["prompt"]}]}, InvalidRequestError),
        (401, {"error": "unauthorised"}, AuthenticationError),
    ],
)
@respx.mock
def test_error_mapping_and_no_retry_for_permanent_errors(client, http_status, body, error_class):
    route = respx.get(f"{BASE}/v1/requests/r1/result").respond(http_status, json=body)
    with pytest.raises(error_class) as caught:
        client.result("r1")
    assert route.call_count == 1
    assert caught.value.status_code == http_status
    assert "gave up" not in str(caught.value)  # the server's answer, not a give-up
    if "detail" in body:
        assert caught.value.detail == body["detail"]
        assert "prompt" in str(caught.value)


@respx.mock
def test_reads_are_retried_on_5xx_and_429_then_succeed(client):
    route = respx.get(f"{BASE}/v1/requests/r1/status").mock(
        side_effect=[
            httpx.Response(500, json={"error_code": 500001}),
            httpx.Response(429, headers={"Retry-After": "0"}),
            httpx.ConnectError("refused"),
            httpx.Response(200, json={"status": "in_queue", "queue_position": 2}),
        ]
    )
    status = client.status("r1")
    assert route.call_count == 4
    assert status.status == "in_queue" and status.queue_position == 2


@respx.mock
def test_reads_give_up_after_max_attempts(client):
    route = respx.get(f"{BASE}/v1/requests/r1/status").respond(503)
    with pytest.raises(ServerError) as caught:
        client.status("r1")
    assert route.call_count == FAST_RETRIES.max_attempts
    assert "; gave up after 4 attempts in 0." in str(caught.value)
    assert "total_timeout" not in str(caught.value)  # the attempts ran out, not the time


@respx.mock
def test_submit_5xx_is_outcome_unknown_and_never_resubmitted(client):
    route = respx.post(SUBMIT_PATH).respond(500, json={"error_code": 500001})
    with pytest.raises(SubmitOutcomeUnknownError) as caught:
        client.submit_edit(EDIT)
    assert route.call_count == 1
    assert "NOT resubmitted" in str(caught.value)


@respx.mock
def test_submit_read_timeout_is_outcome_unknown(client):
    route = respx.post(SUBMIT_PATH).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(SubmitOutcomeUnknownError):
        client.submit_edit(EDIT)
    assert route.call_count == 1


@respx.mock
def test_submit_is_retried_when_provably_not_sent(client):
    route = respx.post(SUBMIT_PATH).mock(
        side_effect=[
            httpx.ConnectError("refused"),
            httpx.Response(429),
            httpx.Response(200, json={"request_id": "r9", "status_url": "u"}),
        ]
    )
    handle = client.submit_edit(EDIT)
    assert handle.request_id == "r9"
    assert route.call_count == 3


@respx.mock
def test_submit_sends_the_token_and_the_validated_body(client):
    route = respx.post(SUBMIT_PATH).respond(200, json={"request_id": "r1"})
    client.submit_edit(NanoBananaEditInput(**EDIT, num_images=2))
    request = route.calls.last.request
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert b'"num_images":2' in request.content


def test_bad_input_fails_before_any_request(client):
    with respx.mock(assert_all_called=False) as router:
        route = router.post(SUBMIT_PATH).respond(200, json={"request_id": "r1"})
        with pytest.raises(ValidationError):
            client.submit_edit({**EDIT, "num_images": 5})
        assert route.call_count == 0


def test_token_is_never_in_repr_and_env_fallback(monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    monkeypatch.setenv("RUNCOMFY_BASE_URL", "http://from-env.test/")
    client = RunComfyClient()
    assert client.base_url == "http://from-env.test"
    assert TOKEN not in repr(client)
    assert TOKEN not in repr(client._http.headers)
    client.close()
    monkeypatch.delenv("RUNCOMFY_API_TOKEN")
    with pytest.raises(AuthenticationError, match="RUNCOMFY_API_TOKEN"):
        RunComfyClient(base_url=BASE)


def test_retry_after_is_honoured_and_backoff_has_full_jitter():
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    assert policy.delay(1, retry_after=2.5) == 2.5
    assert policy.delay(1, retry_after=100) == 8.0
    delays = [policy.delay(4) for _ in range(200)]
    assert all(0 <= delay <= 8.0 for delay in delays)
    assert max(delays) > 4.0 and min(delays) < 4.0


def test_poll_schedule_is_quiet_while_a_job_cannot_be_done_yet():
    policy = PollingPolicy()
    early = PollState("in_progress", 1, 1.0, earliest_run_seconds=12.0)
    assert next_poll_delay(early, policy) == pytest.approx(11.0)
    late = PollState("in_progress", 2, 11.9, earliest_run_seconds=12.0)
    assert next_poll_delay(late, policy) == pytest.approx(policy.dense_interval)
    queued = [next_poll_delay(PollState("in_queue", n, 0.0), policy) for n in range(1, 12)]
    assert queued == sorted(queued) and queued[0] == policy.initial_interval
    assert queued[-1] == policy.max_interval
    scaled = PollingPolicy(time_scale=0.01)
    late_scaled = PollState("in_progress", 2, 0.1199, earliest_run_seconds=0.12)
    assert next_poll_delay(late_scaled, scaled) == pytest.approx(policy.dense_interval * 0.01)


def test_a_resumed_wait_does_not_sleep_as_if_the_job_had_just_started():
    import logging
    from datetime import datetime, timedelta, timezone

    from prefect_nanobanana.client.waiting import WaitTracker

    def first_delay(submitted_at: datetime | None) -> float:
        tracker = WaitTracker(
            "r1",
            timeout=None,
            policy=PollingPolicy(),
            estimator=RunDurationEstimator(),
            resolution="1K",
            logger=logging.getLogger("test"),
            on_status=None,
            submitted_at=submitted_at,
        )
        delay = tracker.observe(RequestStatus(request_id="r1", status="in_progress"))
        assert delay is not None
        return delay

    policy = PollingPolicy()
    fresh = first_delay(None)  # just submitted: quiet until a 1K run could be done
    assert fresh == pytest.approx(policy.earliest_run_seconds["1K"], abs=0.05)
    # Submitted 16 s ago (a retried task, a rerun): it may be nearly done; poll densely.
    resumed = first_delay(datetime.now(timezone.utc) - timedelta(seconds=16))
    assert resumed <= policy.dense_range[1] + 0.05 < fresh / 4


def test_duration_estimator_learns_a_low_quantile_after_a_few_jobs():
    policy = PollingPolicy()
    estimator = RunDurationEstimator()
    assert estimator.earliest_run("1K", policy) == policy.earliest_run_seconds["1K"]
    for seconds in (20.0, 18.0, 22.0, 19.0, 21.0):
        estimator.record("1K", seconds)
    assert 18.0 <= estimator.earliest_run("1K", policy) < 19.0
    assert estimator.earliest_run(None, policy) is None


def test_duration_estimator_starts_from_run_times_an_earlier_run_saw():
    policy = PollingPolicy(time_scale=0.5)
    earlier = RunDurationEstimator()
    for seconds in (5.0, 5.5, 6.0, 6.5):  # scaled: 10-13 model seconds, reports say 17.5
        earlier.record("1K", seconds)
    saved = earlier.recorded(policy.time_scale)
    assert saved == {"1K": [10.0, 11.0, 12.0, 13.0]}

    fresh = RunDurationEstimator()
    fresh.seed(saved, policy.time_scale)
    assert fresh.earliest_run("1K", policy) == earlier.earliest_run("1K", policy)
    assert fresh.earliest_run("1K", policy) < policy.prior_earliest_run("1K")
    # What it saw itself is what it saves: seeded samples are never saved twice.
    assert fresh.recorded() == {}
    fresh.record("1K", 7.0)
    assert fresh.recorded(policy.time_scale) == {"1K": [14.0]}


def test_seeded_run_times_give_way_to_the_runs_own():
    estimator = RunDurationEstimator(window=4, min_samples=3)
    estimator.record("1K", 30.0)
    estimator.seed({"1K": [1.0, 2.0, 3.0, 4.0]})  # older than what the run saw itself
    estimator.record("1K", 31.0)
    estimator.record("1K", 32.0)
    estimator.record("1K", 33.0)
    assert estimator.earliest_run("1K", PollingPolicy()) > 25.0


def test_polls_after_the_quiet_window_are_spent_where_runs_end():
    policy = PollingPolicy()
    estimator = RunDurationEstimator()
    for seconds in (26.0, 28.0, 29.0, 30.0, 30.5, 31.0, 32.0, 34.0, 36.0, 38.0):
        estimator.record("2K", seconds)
    quiet = estimator.earliest_run("2K", policy)
    spacing = [estimator.dense_interval("2K", policy, t, quiet) for t in (quiet, 33.0, 40.0)]
    # Right after the quiet window few runs end: poll calmly; past the median, densely.
    assert spacing[0] > policy.dense_interval > spacing[1] > spacing[2]
    shortest, longest = policy.dense_range
    assert all(shortest <= gap <= longest for gap in spacing)
    # An unknown resolution has no law to follow, nor has a job whose start is vague.
    assert estimator.dense_interval(None, policy, 10.0, 5.0) == policy.dense_interval
    vague = estimator.dense_interval("2K", policy, quiet, quiet, uncertainty=5.0)
    assert vague == policy.dense_interval


def test_runs_known_only_within_bounds_are_learned_not_dropped():
    policy = PollingPolicy()
    estimator = RunDurationEstimator()
    for seconds in (10.0, 10.5, 11.0):  # the batch's first jobs: their starts were seen
        estimator.record("1K", seconds)
    exact_only = estimator.earliest_run("1K", policy)
    for _ in range(20):  # the queued ones slept through their start: 25-35 s each
        estimator.record_between("1K", 25.0, 35.0)
    assert exact_only < 11.0 < estimator.earliest_run("1K", policy) < 25.0
    saved = estimator.recorded()
    assert saved["1K"][:3] == [10.0, 10.5, 11.0] and saved["1K"][3] == [25.0, 35.0]

    fresh = RunDurationEstimator()
    fresh.seed(saved)
    assert fresh.earliest_run("1K", policy) == pytest.approx(estimator.earliest_run("1K", policy))


def test_bounds_centre_the_fit_where_the_runs_lie():
    import math

    from prefect_nanobanana.client.polling import _fit_log_normal

    fitted = _fit_log_normal([(10.0, 10.0), (10.0, 10.0), (10.0, 10.0)] + [(9.0, 11.0)] * 30)
    assert math.exp(fitted.mean) == pytest.approx(10.0, rel=0.02)
    # Bounds alone that share a moment do not collapse the spread to nothing.
    vague = _fit_log_normal([(25.0, 35.0)] * 20)
    assert math.exp(vague.mean) == pytest.approx(29.6, rel=0.02) and vague.stdev > 0.08
    # Runs known exactly keep the plain sample fit (mean and stdev of the logs).
    exact = _fit_log_normal([(10.0, 10.0), (20.0, 20.0)])
    assert exact.mean == pytest.approx((math.log(10) + math.log(20)) / 2)
    assert exact.stdev == pytest.approx(abs(math.log(20) - math.log(10)) / math.sqrt(2))


def test_the_fit_stops_once_it_has_converged_with_the_fit_it_would_reach(monkeypatch):
    """The fit runs on the event loop after every finished job of a batch: rounds that
    change nothing are not run."""
    import math
    import random
    from statistics import NormalDist

    from prefect_nanobanana.client import polling

    rng = random.Random(7)
    runs = []
    for _ in range(200):
        seconds = math.exp(rng.gauss(3.0, 0.3))
        if rng.random() < 0.2:
            runs.append((seconds, seconds))
        else:
            low = seconds * rng.uniform(0.85, 1.0)
            runs.append((low, low * rng.uniform(1.02, 1.3)))
    passes = [0]

    class Counted(NormalDist):
        def cdf(self, x: float) -> float:
            passes[0] += 1
            return super().cdf(x)

    monkeypatch.setattr(polling, "NormalDist", Counted)
    fitted = polling._fit_log_normal(runs)
    converging = passes[0]
    monkeypatch.setattr(polling, "_EM_TOLERANCE", 0.0)
    passes[0] = 0
    every_round = polling._fit_log_normal(runs)
    assert fitted.mean == pytest.approx(every_round.mean, abs=1e-8)
    assert fitted.stdev == pytest.approx(every_round.stdev, abs=1e-8)
    assert converging * 3 < passes[0], (converging, passes[0])


def test_a_queued_job_that_slept_through_its_start_gives_its_runs_bounds():
    import logging
    from datetime import datetime, timedelta, timezone

    from prefect_nanobanana.client.waiting import WaitTracker

    now = [0.0]
    estimator = RunDurationEstimator()
    tracker = WaitTracker(
        "r1",
        timeout=None,
        policy=PollingPolicy(),
        estimator=estimator,
        resolution="1K",
        logger=logging.getLogger("test"),
        on_status=None,
        clock=lambda: now[0],
    )
    tracker.observe(RequestStatus(request_id="r1", status="in_queue", queue_position=1))
    now[0] = 30.0  # the next poll finds it running: it started somewhere in 0-30 s
    tracker.observe(RequestStatus(request_id="r1", status="in_progress"))
    now[0] = 50.2
    created = datetime(2026, 12, 1, tzinfo=timezone.utc)
    tracker.finish(
        RequestResult(
            request_id="r1",
            status="completed",
            created_at=created,
            finished_at=created + timedelta(seconds=50),  # the server's own clock
        )
    )
    ((low, high),) = estimator.recorded()["1K"]
    assert (low, high) == (pytest.approx(20.0), pytest.approx(50.0))


async def test_async_client_retries_reads_like_the_sync_one():
    async with AsyncRunComfyClient(
        api_token=TOKEN, base_url=BASE, retry_policy=FAST_RETRIES
    ) as client:
        with respx.mock:
            route = respx.get(f"{BASE}/v1/requests/r1/result").mock(
                side_effect=[
                    httpx.Response(502),
                    httpx.Response(
                        200, json={"status": "completed", "output": {"image": "https://x/0.png"}}
                    ),
                ]
            )
            result = await client.result("r1")
    assert route.call_count == 2
    assert result.output_urls == ["https://x/0.png"]


async def test_async_submit_429_then_accepted():
    async with AsyncRunComfyClient(
        api_token=TOKEN, base_url=BASE, retry_policy=FAST_RETRIES
    ) as client:
        with respx.mock:
            route = respx.post(SUBMIT_PATH).mock(
                side_effect=[httpx.Response(429), httpx.Response(200, json={"request_id": "a1"})]
            )
            handle = await client.submit_edit(EDIT)
    assert handle.request_id == "a1" and route.call_count == 2


@respx.mock
def test_a_429_pauses_every_call_of_the_client():
    import threading
    import time

    client = RunComfyClient(api_token=TOKEN, base_url=BASE, retry_policy=RetryPolicy(max_delay=5))

    first_attempt_seen = threading.Event()
    other_called_at: list[float] = []

    def rate_limited_once(request):
        if not first_attempt_seen.is_set():
            first_attempt_seen.set()
            return httpx.Response(429, headers={"Retry-After": "0.4"})
        return httpx.Response(200, json={"status": "in_queue"})

    def other_call(request):
        other_called_at.append(time.monotonic())
        return httpx.Response(200, json={"status": "in_queue"})

    respx.get(f"{BASE}/v1/requests/r1/status").mock(side_effect=rate_limited_once)
    respx.get(f"{BASE}/v1/requests/r2/status").mock(side_effect=other_call)
    worker = threading.Thread(target=client.status, args=("r1",))
    worker.start()
    first_attempt_seen.wait(5)
    deadline = time.monotonic() + 5  # the worker has recorded the 429 before the other call
    while not client._paused_until and time.monotonic() < deadline:
        time.sleep(0.001)
    paused_until = client._paused_until
    assert paused_until, "the 429 paused nothing"
    client.status("r2")
    worker.join()
    # The other call went out only once the pause was over.
    assert len(other_called_at) == 1 and other_called_at[0] >= paused_until


@respx.mock
def test_wait_tolerates_an_unknown_status_and_logs_it(caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="prefect_nanobanana.client")
    client = RunComfyClient(
        api_token=TOKEN, base_url=BASE, polling_policy=PollingPolicy(time_scale=0.001)
    )
    respx.get(f"{BASE}/v1/requests/r1/status").mock(
        side_effect=[
            httpx.Response(200, json={"status": "warming_up"}),
            httpx.Response(200, json={"status": "warming_up"}),
            httpx.Response(200, json={"status": "succeeded"}),
        ]
    )
    respx.get(f"{BASE}/v1/requests/r1/result").respond(
        200, json={"status": "succeeded", "output": {"images": ["https://x/0.png"]}}
    )
    result = client.wait("r1", timeout=5)
    assert result.status == "completed" and result.output_urls == ["https://x/0.png"]
    assert sum("unknown status 'warming_up'" in r.getMessage() for r in caplog.records) == 1


def test_queue_wait_predicts_a_start_from_the_batchs_running_jobs():
    policy = PollingPolicy()
    estimator = RunDurationEstimator()
    assert estimator.queue_wait(1, now=0.0, policy=policy) is None  # nothing of ours runs
    for seconds in (9.5, 10.0, 10.5, 9.8, 10.2, 10.1, 9.9):
        estimator.record("1K", seconds)
    estimator.job_started("a", "1K", after=0.0)
    estimator.job_started("b", "1K", after=0.0)
    earliest, expected = estimator.queue_wait(1, now=2.0, policy=policy)
    assert 0 < earliest <= expected
    assert 6.5 < expected < 8.5  # one of two 10 s runs started 2 s ago ends in about 8 s
    later = estimator.queue_wait(3, now=2.0, policy=policy)[1]
    assert later > expected + 4  # past all running jobs: a mean run per worker more
    estimator.job_ended("a")
    estimator.job_ended("b")
    assert estimator.queue_wait(1, now=2.0, policy=policy) is None


def test_a_queued_job_sleeps_through_its_predicted_wait_but_not_past_its_end():
    policy = PollingPolicy()
    queued = PollState(
        "in_queue",
        1,
        0.0,
        queue_position=20,
        earliest_run_seconds=12.0,
        queue_earliest_start=30.0,
        queue_expected_start=40.0,
    )
    delay = next_poll_delay(queued, policy)
    assert delay == pytest.approx(policy.queue_sleep_fraction * 40.0)
    assert delay <= 30.0 + 12.0
    soon = PollState("in_queue", 1, 0.0, queue_earliest_start=0.5, queue_expected_start=1.0)
    assert next_poll_delay(soon, policy) == policy.max_interval


def test_output_hosts_come_from_the_environment_when_not_given(monkeypatch):
    from prefect_nanobanana.client.client import output_hosts_for

    monkeypatch.delenv("RUNCOMFY_OUTPUT_HOSTS", raising=False)
    assert output_hosts_for("http://127.0.0.1:9000") == ("*.runcomfy.net", "127.0.0.1:9000")
    monkeypatch.setenv("RUNCOMFY_OUTPUT_HOSTS", "cdn.example.net, 127.0.0.1:9001")
    assert output_hosts_for("http://127.0.0.1:9000") == ("cdn.example.net", "127.0.0.1:9001")
    assert output_hosts_for(None, ["given.example.net"]) == ("given.example.net",)


def test_a_deadline_inside_another_only_shortens_it():
    import time

    from prefect_nanobanana.deadline import call_deadline

    start = time.monotonic()
    with call_deadline(5) as outer:
        assert outer is not None and start + 5 <= outer < start + 6
        with call_deadline(60) as inner:
            assert inner == outer
        with call_deadline(60, until=start + 2) as until:
            assert until == start + 2
        with call_deadline(1) as shorter:
            assert shorter < outer
    with call_deadline(None) as unbounded:
        assert unbounded is None


async def test_an_idle_connection_the_server_closed_is_seen_without_asking_for_its_socket_again():
    """httpcore asks every idle pooled connection `is_readable` on each request: the answer
    must follow the socket (the server's close makes it readable), from the socket kept
    when the connection was made."""
    import socket

    import httpcore

    from prefect_nanobanana.deadline import _AsyncDeadlineStream

    ours, server_side = socket.socketpair()

    class Stream(httpcore.AsyncNetworkStream):
        asked: list[str] = []

        def get_extra_info(self, info: str) -> object:
            self.asked.append(info)
            return ours if info == "socket" else None

    stream = _AsyncDeadlineStream(Stream())
    try:
        assert [stream.get_extra_info("is_readable") for _ in range(3)] == [False] * 3
        server_side.close()
        assert stream.get_extra_info("is_readable") is True
        assert Stream.asked == ["socket"]
    finally:
        ours.close()
    assert stream.get_extra_info("is_readable") is True  # closed: as if it ended
