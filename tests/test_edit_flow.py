"""The edit flow end to end: real Prefect runs (in-process and in child processes) and the
emulator over real HTTP. Crash, rerun and cancellation are real: processes are killed and
runs cancelled through Prefect's API and runner, never simulated by calling internals."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from PIL import Image
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.exceptions import ParameterTypeError, TerminationSignal
from prefect.logging.handlers import APILogWorker
from prefect.states import Cancelling, State

from prefect_nanobanana import (
    EditImageResult,
    RunComfyCredentials,
    ServerError,
    WaitTimeoutError,
    edit_image,
)
from prefect_nanobanana.emulator import Fault, FaultPlan
from prefect_nanobanana.guard.protocol import abandons_request
from prefect_nanobanana.observe import (
    EVENT_CANCELLED,
    EVENT_COMPLETED,
    EVENT_SUBMITTED,
    OUTCOME_TABLE_KEY,
)
from prefect_nanobanana.tasks import RECORD_LABEL_PREFIX, cancel_recorded_requests, submit_edit

pytestmark = pytest.mark.prefect

SECRET = "rc-flow-secret-93c7d2"

# A child process that runs an existing flow run, as a worker would, and prints its result.
RUN_FLOW_RUN = """
import sys, uuid
from prefect.flow_engine import load_flow_run, run_flow
from prefect_nanobanana.flows import edit_image

result = run_flow(edit_image, flow_run=load_flow_run(uuid.UUID(sys.argv[1])))
print("RESULT " + result.model_dump_json())
"""

SERVE = """
from prefect_nanobanana.flows import edit_image

edit_image.serve(name="cancel-test", print_starting_message=False)
"""


def flow_run_id(state: State) -> UUID:
    return state.state_details.flow_run_id


def read_flow_run(run_id: UUID) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def create_edit_run(image_server: Any, **parameters: Any) -> FlowRun:
    """A flow run of `edit_image` created through the API, as a trigger would, not yet run."""
    with get_client(sync_client=True) as client:
        return client.create_flow_run(
            edit_image,
            parameters={
                "prompt": "paint it teal",
                "image_urls": [image_server.url_for("wide.png")],
                **parameters,
            },
        )


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def recorded_request_id(run_id: UUID) -> str | None:
    """The request id the run recorded in its labels once the submit answered."""
    for key, value in (read_flow_run(run_id).labels or {}).items():
        if key.startswith(RECORD_LABEL_PREFIX) and value not in ("submitting", "not-submitted"):
            return value
    return None


def run_logs(run_id: UUID) -> list[str]:
    APILogWorker.drain_all()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return [log.message for log in logs]


def run_artifacts(run_id: UUID) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )


async def _request_events(request_id: str) -> list[Any]:
    from prefect.client.orchestration import get_client as get_async_client

    async with get_async_client() as client:
        page = await client.read_events(
            filter=EventFilter(
                event=EventNameFilter(prefix=["nanobanana.request."]),
                resource=EventResourceFilter(id=[f"runcomfy.request.{request_id}"]),
            ),
            limit=50,
        )
    return page.events


def request_events(request_id: str, expected: set[str]) -> list[Any]:
    """The request's events once all of `expected` arrived (the server stores them async)."""

    def arrived() -> list[Any] | None:
        events = asyncio.run(_request_events(request_id))
        return events if expected <= {event.event for event in events} else None

    return wait_for(arrived, 30, f"events {expected} of {request_id}")


def test_edit_end_to_end_with_nothing_configured(
    prefect_harness, use_emulator, emulator, image_server
):
    use_emulator(emulator)
    state = edit_image(
        prompt="paint it teal",
        image_urls=[image_server.url_for("wide.png")],
        aspect_ratio="16:9",
        num_images=2,
        return_state=True,
    )
    result = state.result()
    assert isinstance(result, EditImageResult)
    assert not result.resumed
    assert result.statuses[-1] == "completed"
    assert len(result.output_urls) == 2
    assert all(url.startswith(emulator.base_url) for url in result.output_urls)
    assert result.cost == pytest.approx(0.30)
    assert result.submitted_at <= result.finished_at
    assert result.seconds is not None and result.seconds >= 0
    assert emulator.stats.submits_accepted == 1

    run_id = flow_run_id(state)
    assert recorded_request_id(run_id) == result.request_id

    artifacts = run_artifacts(run_id)
    link = next(a for a in artifacts if a.key == f"runcomfy-request-{result.request_id}")
    assert f"/v1/requests/{result.request_id}/result" in link.data
    (table,) = [a for a in artifacts if a.key == OUTCOME_TABLE_KEY]
    assert result.request_id in table.data and '"status": "completed"' in table.data

    events = request_events(result.request_id, {EVENT_SUBMITTED, EVENT_COMPLETED})
    for event in events:
        related = {resource.id for resource in event.related}
        assert f"prefect.flow-run.{run_id}" in related


def test_invalid_inputs_fail_before_anything_is_paid(
    prefect_harness, use_emulator, emulator, image_server
):
    use_emulator(emulator)
    with pytest.raises(ParameterTypeError):
        edit_image(prompt="x", image_urls=[image_server.url_for("wide.png")], num_images=5)
    with pytest.raises(ParameterTypeError):
        edit_image(prompt="x", image_urls=[image_server.url_for("wide.png")], resolution="8K")
    with pytest.raises(ValueError, match="image_urls"):
        edit_image(prompt="x", image_urls=[])
    # Refused by the parameters' schema, as the UI's run form refuses them.
    with pytest.raises(ParameterTypeError):
        edit_image(prompt="", image_urls=[image_server.url_for("wide.png")])
    with pytest.raises(ParameterTypeError):
        edit_image(prompt="x", image_urls=[image_server.url_for("wide.png")], timeout_seconds=0)
    assert emulator.stats.calls["submit"] == 0


@pytest.mark.parametrize(
    ("error", "abandons"),
    [
        (KeyboardInterrupt(), True),
        (TerminationSignal(signal.SIGTERM), True),
        (asyncio.CancelledError(), True),
        (TimeoutError(), True),
        (WaitTimeoutError("late", request_id="r"), True),
        (ServerError("API down for a while"), False),
        (RuntimeError("bug"), False),
    ],
)
def test_which_endings_withdraw_the_request(error, abandons):
    # Ctrl-C, SIGTERM, task cancellation and timeouts end the run for good; other errors
    # leave the request for a retry of the flow run to resume.
    assert abandons_request(error) is abandons


def test_a_run_that_times_out_cancels_its_queued_request(
    prefect_harness, use_emulator, emulator_factory, image_server
):
    emulator = use_emulator(emulator_factory(faults=FaultPlan([Fault("stuck", endpoint="job")])))
    state = edit_image(
        prompt="paint it teal",
        image_urls=[image_server.url_for("wide.png")],
        timeout_seconds=0.5,
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(WaitTimeoutError):
        state.result()
    request_id = recorded_request_id(flow_run_id(state))
    assert emulator.job(request_id).status == "cancelled"
    assert emulator.stats.cancel_outcomes["cancelled"] == 1
    request_events(request_id, {EVENT_CANCELLED})


def test_a_running_request_is_reported_not_cancelled(
    prefect_harness, use_emulator, emulator_factory, image_server, caplog
):
    emulator = use_emulator(emulator_factory(fixed_duration_seconds=30))
    caplog.set_level(logging.INFO)
    state = edit_image(
        prompt="paint it teal",
        image_urls=[image_server.url_for("wide.png")],
        timeout_seconds=0.5,
        return_state=True,
    )
    assert state.is_failed()
    request_id = recorded_request_id(flow_run_id(state))
    assert emulator.job(request_id).status == "in_progress"
    assert emulator.stats.cancel_attempts == 0
    assert f"RunComfy request {request_id} is already running" in caplog.text


def test_the_cancellation_hook_reads_the_run_back_from_the_api(
    prefect_harness, use_emulator, emulator_factory, image_server, monkeypatch
):
    emulator = use_emulator(
        emulator_factory(api_tokens=(SECRET,), faults=FaultPlan([Fault("stuck", endpoint="job")]))
    )
    RunComfyCredentials(api_token=SECRET, base_url=emulator.base_url).save(
        "hook-credentials", overwrite=True
    )

    @flow
    def submit_then_die(image_url: str, credentials: str) -> None:
        submit_edit(
            {"prompt": "teal", "image_urls": [image_url]}, RunComfyCredentials.load(credentials)
        )
        raise RuntimeError("the flow's process went away")

    state = submit_then_die(image_server.url_for("wide.png"), "hook-credentials", return_state=True)
    request_id = recorded_request_id(flow_run_id(state))
    assert emulator.job(request_id).status == "in_queue"

    # The runner's process knows nothing: no labels, no parameters, no usable env token.
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "not-the-token")
    stale = FlowRun(id=flow_run_id(state), flow_id=uuid4(), name="seen-from-the-runner")
    cancel_recorded_requests(edit_image, stale, Cancelling())

    assert emulator.job(request_id).status == "cancelled"
    assert emulator.stats.cancel_outcomes["cancelled"] == 1


def test_a_rerun_after_a_crash_resumes_without_resubmitting(
    prefect_harness, use_emulator, emulator_factory, image_server
):
    # Still running when the kill lands, however long the run's start and its record take.
    emulator = use_emulator(emulator_factory(fixed_duration_seconds=6))
    flow_run = create_edit_run(image_server)
    command = [sys.executable, "-c", RUN_FLOW_RUN, str(flow_run.id)]

    child = subprocess.Popen(command, env=prefect_harness.env(), stdout=subprocess.DEVNULL)
    try:
        request_id = wait_for(lambda: recorded_request_id(flow_run.id), 60, "the recorded submit")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert emulator.stats.submits_accepted == 1
    assert emulator.job(request_id).status == "in_progress"
    assert not read_flow_run(flow_run.id).state.is_final()

    rerun = subprocess.run(
        command, env=prefect_harness.env(), capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    line = next(line for line in rerun.stdout.splitlines() if line.startswith("RESULT "))
    result = EditImageResult.model_validate(json.loads(line.removeprefix("RESULT ")))
    assert result.request_id == request_id
    assert result.resumed
    assert result.statuses[-1] == "completed"
    assert emulator.stats.submits_received == 1
    assert emulator.stats.submits_accepted == 1
    assert read_flow_run(flow_run.id).state.is_completed()


def test_a_retried_parent_flow_does_not_pay_for_its_subflows_edits_again(
    prefect_harness, use_emulator, emulator, image_server, tmp_path
):
    """Retrying a parent reruns its subflows as fresh flow runs: they resume their requests.

    Prefect starts a new run of a subflow that failed, or completed without a
    persisted result, when its parent is retried. A default job key scoped by the
    subflow's own run id paid for every edit of an ETL flow again when a later step
    failed; scoped by the parent's task run, the retry finds the requests.
    """
    from prefect_nanobanana.flows import edit_and_archive

    use_emulator(emulator)
    picture = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), "teal").save(picture)
    results: list[Any] = []

    @flow(retries=1, retry_delay_seconds=0)
    def product_photos() -> None:
        results.append(
            edit_image(prompt="paint it teal", image_urls=[image_server.url_for("wide.png")])
        )
        results.append(
            edit_and_archive(
                prompt="add snow", images=[str(picture)], archive_uri=str(tmp_path / "archive")
            )
        )
        if len(results) == 2:
            raise RuntimeError("loading the warehouse failed")

    assert product_photos(return_state=True).is_completed()
    # Both subflows ran again on the retry, and neither paid again.
    assert len(results) == 4
    assert emulator.stats.submits_received == 2
    assert [result.request_id for result in results[2:]] == [
        result.request_id for result in results[:2]
    ]
    assert Path(results[3].output_locations[0]).is_file()


def test_submit_edit_keys_an_inline_image_by_its_bytes(
    prefect_harness, use_emulator, emulator, tmp_path
):
    """`stage_images` without a staging store gives data: URIs; the default job key took them
    for a location, and the task run was left Pending by its name function's error."""
    from prefect_nanobanana.tasks import stage_images, wait_for_request

    use_emulator(emulator)
    picture = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), "teal").save(picture)

    @flow
    def edit_inline() -> tuple[str, str, str]:
        (staged,) = stage_images([str(picture)])
        assert staged.url.startswith("data:image/png;base64,")
        submitted = submit_edit({"prompt": "add snow", "image_urls": [staged.url]})
        # The same edit again in this run is the same job: adopted, not paid twice.
        again = submit_edit({"prompt": "add snow", "image_urls": [staged.url]})
        outcome = wait_for_request(submitted.request_id, submitted_at=submitted.submitted_at)
        return submitted.request_id, again.request_id, outcome.status

    request_id, again, status = edit_inline()
    assert (again, status) == (request_id, "completed")
    assert emulator.stats.submits_received == 1

    @flow
    def edit_over_http() -> None:
        submit_edit({"prompt": "add snow", "image_urls": ["http://cdn.example.com/a.png"]})

    # A source the key refuses fails the task run clearly; its name is the plain one.
    state = edit_over_http(return_state=True)
    with get_client(sync_client=True) as client:
        (task_run,) = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id(state)]))
        )
    assert task_run.name == "submit-edit" and task_run.state.is_failed()
    assert "refusing non-HTTPS URL" in task_run.state.message
    assert emulator.stats.submits_received == 1


def test_cancelling_a_served_run_cancels_its_queued_request(
    prefect_harness, use_emulator, emulator_factory, image_server
):
    emulator = use_emulator(emulator_factory(faults=FaultPlan([Fault("stuck", endpoint="job")])))
    runner = subprocess.Popen(
        [sys.executable, "-c", SERVE],
        env=prefect_harness.env(PREFECT_RUNNER_POLL_FREQUENCY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with get_client(sync_client=True) as client:
            deployment = wait_for(
                lambda: _deployment(client, "nano-banana-edit/cancel-test"), 60, "the deployment"
            )
            flow_run = client.create_flow_run_from_deployment(
                deployment.id,
                parameters={
                    "prompt": "paint it teal",
                    "image_urls": [image_server.url_for("wide.png")],
                },
            )
            request_id = wait_for(lambda: recorded_request_id(flow_run.id), 60, "the submit")
            assert emulator.job(request_id).status == "in_queue"

            client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
            final = wait_for(
                lambda: (state := client.read_flow_run(flow_run.id).state).is_final() and state,
                60,
                "the run to end",
            )
            # Before the runner stops: its shutdown kills a process still sending its logs.
            withdrawn = f"Cancelled queued RunComfy request {request_id}"
            wait_for(lambda: withdrawn in run_logs(flow_run.id), 30, "the run's logs")
    finally:
        runner.send_signal(signal.SIGTERM)
        try:
            runner.wait(timeout=30)
        except subprocess.TimeoutExpired:
            runner.kill()
    assert final.is_cancelled(), final
    assert emulator.job(request_id).status == "cancelled"
    assert emulator.stats.cancel_outcomes == {"cancelled": 1, "not_cancellable": 0}


def test_an_edit_stopped_before_its_submit_sends_nothing(
    prefect_harness, use_emulator, emulator, image_server
):
    from prefect_nanobanana.client import NanoBananaEditInput
    from prefect_nanobanana.flows.edit import run_edit
    from prefect_nanobanana.stop import Stop
    from prefect_nanobanana.tasks.requests import edit_job

    use_emulator(emulator)
    stop = Stop()
    stop.set("sigint")

    @flow
    def stopped_early() -> tuple[str, str | None]:
        edit = NanoBananaEditInput(prompt="p", image_urls=[image_server.url_for("wide.png")])
        outcome, _ = run_edit(
            RunComfyCredentials(),
            edit_job(edit, "stopped-early"),
            stop,
            timeout_seconds=60,
            daily_budget_usd=None,
            archive=None,
        )
        return outcome.status, outcome.request_id

    assert stopped_early() == ("not_started", None)
    assert emulator.stats.submits_received == 0


# A direct run in a process of its own, as a script or a notebook's kernel runs it.
DIRECT_RUN = """
import sys
from prefect_nanobanana.flows import edit_image

edit_image.with_options(flow_run_name=sys.argv[1])(
    prompt="paint it teal", image_urls=[sys.argv[2]], return_state=True
)
"""


@pytest.mark.parametrize("cancelled", [True, False], ids=["cancelling-then-sigterm", "sigterm"])
def test_a_stopped_edit_withdraws_its_queued_request_and_ends_as_it_was_asked(
    prefect_harness, use_emulator, emulator_factory, image_server, cancelled
):
    """What a runner does when its cancel intent is not acknowledged in time (1 s in Prefect
    3.9; 3.8 has no intent channel): the run is Cancelling on the API, then SIGTERM. The
    run handles both as its stop: the queued request is withdrawn, and the run ends
    Cancelled when it was cancelled, else as Prefect ends a terminated run (Crashed)."""
    emulator = use_emulator(emulator_factory(faults=FaultPlan([Fault("stuck", endpoint="job")])))
    name = f"stopped-edit-{uuid4().hex[:8]}"
    child = subprocess.Popen(
        [sys.executable, "-c", DIRECT_RUN, name, image_server.url_for("wide.png")],
        env=prefect_harness.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with get_client(sync_client=True) as client:
            run = wait_for(
                lambda: next(
                    iter(
                        client.read_flow_runs(
                            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name]))
                        )
                    ),
                    None,
                ),
                60,
                "the run",
            )
            request_id = wait_for(lambda: recorded_request_id(run.id), 60, "the submit")
            assert emulator.job(request_id).status == "in_queue"
            if cancelled:
                client.set_flow_run_state(run.id, Cancelling(), force=True)
            child.send_signal(signal.SIGTERM)
            assert child.wait(60) != 0 or cancelled
            final = client.read_flow_run(run.id).state
    finally:
        child.kill()
    assert final.is_cancelled() if cancelled else final.is_crashed(), final
    assert emulator.job(request_id).status == "cancelled"
    assert emulator.stats.cancel_outcomes == {"cancelled": 1, "not_cancellable": 0}
    assert f"letting go of RunComfy request {request_id}" in "\n".join(run_logs(run.id))
    request_events(request_id, {EVENT_CANCELLED})


def _deployment(client: Any, name: str) -> Any:
    try:
        return client.read_deployment_by_name(name)
    except Exception:
        return None


def test_a_token_sent_inline_through_the_api_is_used_and_the_run_says_where_it_is_kept(
    prefect_harness, emulator_factory, image_server, monkeypatch
):
    """Prefect stores a flow run's parameters as they were sent: the token is in its
    database then, whatever this package does, so the run warns (without the token)."""
    from prefect.flow_engine import load_flow_run, run_flow

    emulator = emulator_factory(api_tokens=(SECRET,))
    monkeypatch.setenv("RUNCOMFY_POLL_TIME_SCALE", str(emulator.config.time_scale))
    monkeypatch.delenv("RUNCOMFY_API_TOKEN", raising=False)
    inline = {"api_token": SECRET, "base_url": emulator.base_url, "request_timeout": 30}
    flow_run = create_edit_run(image_server, credentials=inline)
    result = run_flow(edit_image, flow_run=load_flow_run(flow_run.id))
    assert result.statuses[-1] == "completed"
    logs = run_logs(flow_run.id)
    assert any("came inline in this flow run's parameters" in message for message in logs)
    assert not [message for message in logs if SECRET in message]


def test_a_pre_signed_url_as_a_parameter_is_warned_about_and_its_s3_form_stores_no_signature(
    prefect_harness, emulator_factory, use_emulator, s3_client, s3_bucket, tmp_path
):
    """Prefect stores a flow run's parameters as they were sent: a pre-signed URL given as
    one sits in its database, signature included, so the run warns once and names the
    s3:// form, which the flows sign inside the run."""
    import io

    from prefect_nanobanana import BatchJob, batch_edit, edit_and_archive

    use_emulator(emulator_factory())
    picture = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(picture, format="PNG")
    s3_client.put_object(Bucket=s3_bucket, Key="in/a.png", Body=picture.getvalue())
    location = f"s3://{s3_bucket}/in/a.png"
    signed = s3_client.generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket, "Key": "in/a.png"}, ExpiresIn=600
    )
    signature = signed.split("Signature=", 1)[1].split("&")[0]
    warning = "pre-signed URL came in this flow run's parameters"
    archive = str(tmp_path / "archive")

    plain = edit_and_archive(prompt="p", images=[location], archive_uri=archive, return_state=True)
    assert plain.is_completed()
    assert read_flow_run(flow_run_id(plain)).parameters["images"] == [location]
    assert not [message for message in run_logs(flow_run_id(plain)) if warning in message]

    runs = [
        edit_and_archive(prompt="p", images=[signed], archive_uri=archive, return_state=True),
        edit_image(prompt="p", image_urls=[signed], return_state=True),
        asyncio.run(
            batch_edit(
                jobs=[BatchJob(prompt="p", images=[signed])], archive_uri=archive, return_state=True
            )
        ),
    ]
    for state in runs:
        assert state.is_completed()
        run_id = flow_run_id(state)
        stored = json.dumps(read_flow_run(run_id).parameters)
        assert signature in stored  # as it was given: only the sender can keep it out
        logs = run_logs(run_id)
        (warned,) = [message for message in logs if warning in message]
        assert f"pass {location} instead" in warned
        assert not [message for message in logs if signature in message]


def test_no_log_artifact_or_parameter_shows_the_token(
    prefect_harness, emulator_factory, image_server, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="prefect")  # run loggers too, down to debug
    emulator = emulator_factory(api_tokens=(SECRET,))
    monkeypatch.setenv("RUNCOMFY_POLL_TIME_SCALE", str(emulator.config.time_scale))
    monkeypatch.delenv("RUNCOMFY_API_TOKEN", raising=False)
    credentials = RunComfyCredentials(api_token=SECRET, base_url=emulator.base_url)

    completed = edit_image(
        prompt="paint it teal",
        image_urls=[image_server.url_for("wide.png")],
        credentials=credentials,
        return_state=True,
    )
    refused = edit_image(
        prompt="paint it teal",
        image_urls=[image_server.url_for("wide.png")],
        credentials=RunComfyCredentials(api_token=SECRET + "-wrong", base_url=emulator.base_url),
        return_state=True,
    )
    assert completed.is_completed() and refused.is_failed()
    assert SECRET not in caplog.text  # every record, debug included, of every logger

    for state in (completed, refused):
        run_id = flow_run_id(state)
        logs = run_logs(run_id)
        assert any("Beginning flow run" in message for message in logs)
        assert not [message for message in logs if SECRET in message]
        for artifact in run_artifacts(run_id):
            assert SECRET not in json.dumps(artifact.data) + str(artifact.description)
        assert SECRET not in json.dumps(read_flow_run(run_id).parameters)
        assert not [message for message in logs if "came inline" in message]
