"""The Prefect tasks against the emulator over real HTTP and Prefect's test harness."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from uuid import UUID, uuid4

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import Failed, State

from prefect_nanobanana import (
    AuthenticationError,
    JobFailedError,
    NotFoundError,
    RateLimitedError,
    RunComfyCredentials,
    ServerError,
    SubmitOutcomeUnknownError,
)
from prefect_nanobanana.emulator import Fault, FaultPlan
from prefect_nanobanana.tasks import (
    acancel_request,
    aget_request_result,
    aget_request_status,
    asubmit_edit,
    await_for_request,
    cancel_request,
    get_request_result,
    get_request_status,
    recorded_request_ids,
    retry_if_transient,
    submit_edit,
    wait_for_request,
)

pytestmark = pytest.mark.prefect


def edit(image_server, **options: Any) -> dict[str, Any]:
    return {"prompt": "paint it teal", "image_urls": [image_server.url_for("wide.png")], **options}


def unique_key(name: str) -> str:
    """Explicit job keys outlive a test in the result store: keep each test's own."""
    return f"{name}-{uuid4().hex[:8]}"


def flow_run_id(state: State) -> UUID:
    return state.state_details.flow_run_id


def task_runs_of(run_id: UUID) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )


def test_retry_condition_retries_only_transient_client_errors():
    def check(error: BaseException) -> bool:
        return retry_if_transient(None, None, Failed(data=error))

    assert check(ServerError("boom"))
    assert check(RateLimitedError("slow down"))
    assert not check(AuthenticationError("bad token"))
    assert not check(SubmitOutcomeUnknownError("maybe"))
    assert not check(ValueError("not ours"))


def test_submit_and_wait_in_a_flow(prefect_harness, use_emulator, emulator, image_server):
    use_emulator(emulator)

    @flow
    def edit_once():
        submitted = submit_edit(edit(image_server, num_images=2))
        return submitted, wait_for_request(submitted.request_id, resolution="1K")

    state = edit_once(return_state=True)
    submitted, outcome = state.result()
    assert not submitted.resumed
    assert outcome.request_id == submitted.request_id
    assert outcome.status == "completed"
    assert outcome.statuses[-1] == "completed"
    assert len(outcome.output_urls) == 2
    assert outcome.cost == pytest.approx(0.30)
    assert emulator.stats.submits_accepted == 1

    names = {task_run.name for task_run in task_runs_of(flow_run_id(state))}
    assert f"submit-edit-{submitted.job_key}" in names
    assert f"wait-{submitted.request_id}" in names


def test_the_same_job_is_submitted_once(prefect_harness, use_emulator, emulator, image_server):
    use_emulator(emulator)

    @flow
    def submit_twice():
        return submit_edit(edit(image_server)), submit_edit(edit(image_server))

    first, second = submit_twice()
    assert not first.resumed
    assert second.resumed
    assert second.request_id == first.request_id
    assert second.job_key == first.job_key

    @flow
    def submit_with_key(job_key: str):
        return submit_edit(edit(image_server), job_key=job_key)

    job_key = unique_key("nightly-teal")
    one = submit_with_key(job_key)
    state = submit_with_key(job_key, return_state=True)
    other = state.result()
    # Another run with the same key adopts the request: not paid again, not its own.
    assert other.adopted and not other.resumed and other.request_id == one.request_id
    assert emulator.stats.submits_accepted == 2
    # The second run now owns the request too: its cancellation hook must find it.
    with get_client(sync_client=True) as client:
        labels = client.read_flow_run(flow_run_id(state)).labels
    assert recorded_request_ids(labels) == [one.request_id]


def test_an_unknown_submit_outcome_is_never_retried_or_repeated(
    prefect_harness, use_emulator, emulator_factory, image_server
):
    emulator = use_emulator(
        emulator_factory(
            faults=FaultPlan([Fault("drop", endpoint="submit", calls=[1], after_accept=True)])
        )
    )

    @flow
    def submit_with_key(job_key: str):
        return submit_edit(edit(image_server), job_key=job_key)

    job_key = unique_key("lost-answer")
    state = submit_with_key(job_key, return_state=True)
    with pytest.raises(SubmitOutcomeUnknownError, match="NOT resubmitted"):
        state.result()
    (task_run,) = task_runs_of(flow_run_id(state))
    assert task_run.run_count == 1
    assert emulator.stats.submits_accepted == 1

    # Another run with the same key finds the marker: it refuses, and says how to check.
    with pytest.raises(SubmitOutcomeUnknownError, match=r"request history.*new job_key"):
        submit_with_key(job_key)
    assert emulator.stats.submits_received == 1


def test_a_refused_submit_fails_at_once_and_frees_the_job_key(
    prefect_harness, use_emulator, emulator, image_server
):
    use_emulator(emulator)
    wrong = RunComfyCredentials(api_token="not-the-token")

    job_key = unique_key("refused-then-fixed")

    @flow
    def submit_with(credentials: RunComfyCredentials):
        return submit_edit(edit(image_server), credentials, job_key=job_key)

    state = submit_with(wrong, return_state=True)
    with pytest.raises(AuthenticationError, match="token was refused") as refused:
        state.result()
    assert "not-the-token" not in str(refused.value)
    (task_run,) = task_runs_of(flow_run_id(state))
    assert task_run.run_count == 1
    assert emulator.stats.calls["submit"] == 1

    fixed = submit_with(RunComfyCredentials())
    assert not fixed.resumed
    assert emulator.stats.submits_accepted == 1


def test_invalid_input_never_reaches_the_api(prefect_harness, use_emulator, emulator, image_server):
    use_emulator(emulator)

    @flow
    def submit_bad():
        return submit_edit(edit(image_server, num_images=9))

    with pytest.raises(ValueError, match="num_images"):
        submit_bad()
    assert emulator.stats.calls["submit"] == 0


def test_transient_poll_errors_are_retried_by_prefect(
    prefect_harness, use_emulator, emulator, image_server
):
    use_emulator(emulator)
    with RunComfyCredentials().get_client() as client:
        request_id = client.submit_edit(edit(image_server)).request_id
    # More 429s than the client's own six attempts: only a Prefect retry gets through.
    emulator.set_faults(
        FaultPlan([Fault("rate_limit", endpoint="status", calls=range(1, 7), retry_after=0)])
    )

    @flow
    def poll():
        return get_request_status.with_options(retry_delay_seconds=0)(request_id)

    state = poll(return_state=True)
    assert state.result().request_id == request_id
    (task_run,) = task_runs_of(flow_run_id(state))
    assert task_run.name == f"status-{request_id}"
    assert task_run.run_count == 2
    assert emulator.stats.calls["status"] == 7


def test_permanent_poll_errors_fail_at_once(prefect_harness, use_emulator, emulator):
    use_emulator(emulator)

    @flow
    def poll_unknown():
        return get_request_result.with_options(retry_delay_seconds=0)("no-such-request")

    state = poll_unknown(return_state=True)
    with pytest.raises(NotFoundError):
        state.result()
    (task_run,) = task_runs_of(flow_run_id(state))
    assert task_run.run_count == 1
    assert emulator.stats.calls["result"] == 1


def test_cancel_request_queued_and_running(
    prefect_harness, use_emulator, emulator_factory, image_server, caplog
):
    emulator = use_emulator(
        emulator_factory(
            workers=1,
            fixed_duration_seconds=30,
            faults=FaultPlan([Fault("stuck", endpoint="job", calls=[2])]),
        )
    )

    @flow
    def cancel_both():
        running = submit_edit(edit(image_server), job_key=unique_key("runs"))
        queued = submit_edit(edit(image_server), job_key=unique_key("waits"))
        deadline = time.monotonic() + 10
        while get_request_status(running.request_id).status != "in_progress":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return cancel_request(running.request_id), cancel_request(queued.request_id)

    caplog.set_level(logging.INFO)
    on_running, on_queued = cancel_both()
    assert on_queued.outcome == "cancelled"
    assert on_running.outcome == "not_cancellable"
    assert emulator.stats.cancel_outcomes == {"cancelled": 1, "not_cancellable": 1}
    assert f"{on_running.request_id} is already running" in caplog.text


def test_a_failed_job_leaves_a_failed_outcome(
    prefect_harness, use_emulator, emulator_factory, image_server
):
    emulator = use_emulator(
        emulator_factory(faults=FaultPlan([Fault("fail_job", endpoint="job", calls=[1])]))
    )

    @flow
    def edit_fails():
        submitted = submit_edit(edit(image_server))
        return wait_for_request(submitted.request_id)

    state = edit_fails(return_state=True)
    with pytest.raises(JobFailedError):
        state.result()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id(state)]))
        )
    tables = [artifact for artifact in artifacts if artifact.type == "table"]
    assert len(tables) == 1
    assert '"status": "failed"' in tables[0].data
    assert emulator.stats.jobs_by_status == {"failed": 1}


def test_async_twins(prefect_harness, use_emulator, emulator_factory, image_server):
    emulator = use_emulator(
        emulator_factory(faults=FaultPlan([Fault("stuck", endpoint="job", calls=[2])]))
    )

    @flow
    async def edit_async():
        submitted = await asubmit_edit(edit(image_server))
        again = await asubmit_edit(edit(image_server))
        outcome = await await_for_request(submitted.request_id)
        status = await aget_request_status(submitted.request_id)
        result = await aget_request_result(submitted.request_id)
        stuck = await asubmit_edit(edit(image_server), job_key=unique_key("stuck"))
        cancelled = await acancel_request(stuck.request_id)
        return submitted, again, outcome, status, result, cancelled

    submitted, again, outcome, status, result, cancelled = asyncio.run(edit_async())
    assert again.resumed and again.request_id == submitted.request_id
    assert outcome.status == status.status == result.status == "completed"
    assert result.output_urls == outcome.output_urls
    assert cancelled.outcome == "cancelled"
    assert emulator.stats.submits_accepted == 2
