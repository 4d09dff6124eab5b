"""What a batch run leaves on a real Prefect server: events, assets, artifacts, an automation.

Against the session's deployment stack (a real `prefect server`, process workers,
`prefect deploy`): the automation of `deployments/automations.yaml` is created with
`prefect automation create`, the nightly-batch deployment runs a manifest with one
good row and three unstageable ones, and the server then holds one event shape for
every row, an asset materialization for the archived output (lineage to its input,
made by the model) and a paused nightly deployment.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from prefect_nanobanana.client import NANO_BANANA_EDIT_MODEL_ID
from prefect_nanobanana.observe import (
    BATCH_REPORT_KEY,
    EVENT_ARCHIVED,
    EVENT_COMPLETED,
    EVENT_ROW_FAILED,
    EVENT_SUBMITTED,
    PAYLOAD_KEYS,
)
from prefect_nanobanana.previews import ASSET_MATERIALIZED
from tests.fixtures.deployments import NIGHTLY, REPO, RUN_SECONDS, TOKEN, Stack

AUTOMATIONS_FILE = REPO / "deployments" / "automations.yaml"
AUTOMATION = "nanobanana-pause-nightly-batch-on-failures"
SECONDS_FOR_THE_SERVER = 60


def _events(stack: Stack, flow_run_id: str, names: set[str], count: int) -> list[dict[str, Any]]:
    """Events of `names` related to the flow run, once the server has `count` of them."""
    deadline = time.monotonic() + SECONDS_FOR_THE_SERVER
    while True:
        answer = httpx.post(
            f"{stack.api_url}/events/filter",
            json={
                "filter": {
                    "event": {"name": sorted(names)},
                    "any_resource": {"id": [f"prefect.flow-run.{flow_run_id}"]},
                    "occurred": {"since": "2000-01-01T00:00:00Z"},
                },
                "limit": 50,
            },
            timeout=10,
        )
        answer.raise_for_status()
        events = answer.json()["events"]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def _related(event: dict[str, Any], role: str) -> list[str]:
    return [
        r["prefect.resource.id"] for r in event["related"] if r["prefect.resource.role"] == role
    ]


@pytest.fixture(scope="module")
def automation(stack: Stack) -> Iterator[str]:
    """The repository's automation file, created on the server as an operator would."""
    from prefect.client.orchestration import get_client

    prefect = str(Path(sys.executable).with_name("prefect"))
    created = subprocess.run(
        [prefect, "automation", "create", "--from-file", str(AUTOMATIONS_FILE)],
        env=stack.env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    try:
        yield AUTOMATION
    finally:
        with get_client(sync_client=True) as client:
            for found in client.read_automations_by_name(AUTOMATION):
                client.delete_automation(found.id)
            nightly = client.read_deployment_by_name(NIGHTLY)
            client.resume_deployment(nightly.id)


@pytest.fixture(scope="module")
def failing_batch(stack: Stack, automation: str) -> Any:
    """The nightly deployment run on one good row and three rows that cannot be staged."""
    from prefect.deployments import run_deployment

    (stack.images / "notes.txt").write_text("not an image\n")
    rows = [{"id": "lighthouse", "prompt": "add a lighthouse", "images": ["images/a.png"]}] + [
        {"id": f"broken-{index}", "prompt": "rain", "images": ["images/notes.txt"]}
        for index in range(1, 4)
    ]
    manifest = stack.images.parent / "observability.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    flow_run = run_deployment(
        NIGHTLY,
        parameters={"manifest_uri": str(manifest)},
        timeout=RUN_SECONDS,
        poll_interval=0.5,
        as_subflow=False,
        _sync=True,
    )
    assert flow_run.state is not None and flow_run.state.is_failed(), stack.log_tail()
    return flow_run


def test_every_event_has_one_payload_shape_with_the_rows_id(
    stack: Stack, failing_batch: Any
) -> None:
    run_id = str(failing_batch.id)
    failed = _events(stack, run_id, {EVENT_ROW_FAILED}, 3)
    assert sorted(event["payload"]["row_id"] for event in failed) == [
        "broken-1",
        "broken-2",
        "broken-3",
    ]
    for event in failed:
        assert set(PAYLOAD_KEYS) <= set(event["payload"])
        assert event["payload"]["status"] == "failed"
        assert "not an image" in event["payload"]["error"]
        assert event["resource"]["prefect.resource.id"] == (
            f"nanobanana.row.{run_id}.{event['payload']['row']}"
        )
        # Linked to the red task run of the row.
        assert len(_related(event, "task-run")) == 1

    (archived,) = _events(stack, run_id, {EVENT_ARCHIVED}, 1)
    payload = archived["payload"]
    assert (payload["row"], payload["row_id"], payload["status"]) == (1, "lighthouse", "archived")
    assert payload["cost"] == pytest.approx(0.15)
    assert Path(payload["metadata_location"]).is_file()
    assert [Path(location).is_file() for location in payload["output_locations"]] == [True]
    assert (
        archived["resource"]["prefect.resource.id"] == f"runcomfy.request.{payload['request_id']}"
    )

    request = _events(stack, run_id, {EVENT_SUBMITTED, EVENT_COMPLETED}, 2)
    assert {event["event"] for event in request} == {EVENT_SUBMITTED, EVENT_COMPLETED}
    for event in request:
        assert set(PAYLOAD_KEYS) <= set(event["payload"])
        assert event["payload"]["row_id"] == "lighthouse"
        assert event["payload"]["request_id"] == payload["request_id"]

    names = {EVENT_ROW_FAILED, EVENT_ARCHIVED, EVENT_SUBMITTED, EVENT_COMPLETED, ASSET_MATERIALIZED}
    every = _events(stack, run_id, names, 7)
    assert TOKEN not in json.dumps(every) and "signature=" not in json.dumps(every)


def test_each_archived_output_is_an_asset_made_from_its_inputs(
    stack: Stack, failing_batch: Any
) -> None:
    (materialized,) = _events(stack, str(failing_batch.id), {ASSET_MATERIALIZED}, 1)
    (archived,) = _events(stack, str(failing_batch.id), {EVENT_ARCHIVED}, 1)
    (output,) = [Path(location) for location in archived["payload"]["output_locations"]]
    assert materialized["resource"]["prefect.resource.id"] == output.as_uri()
    assert _related(materialized, "asset") == [(stack.images / "a.png").as_uri()]
    assert _related(materialized, "asset-materialized-by") == [NANO_BANANA_EDIT_MODEL_ID]
    payload = materialized["payload"]
    assert payload["request_id"] == archived["payload"]["request_id"]
    assert payload["prompt"] == "add a lighthouse"
    assert payload["cost"] == pytest.approx(0.15)
    # What the output cost, in Prefect's asset view: the request, model, resolution, bill.
    assert payload["model_id"] == NANO_BANANA_EDIT_MODEL_ID
    assert payload["resolution"] == "1K"
    assert payload["billed_cost_usd"] == pytest.approx(0.15)
    assert payload["sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
    with Image.open(output) as image:
        assert (payload["width"], payload["height"]) == image.size


def test_the_report_names_rows_by_id_without_secrets(stack: Stack, failing_batch: Any) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[failing_batch.id])
            )
        )
    (report,) = [artifact for artifact in artifacts if artifact.key == BATCH_REPORT_KEY]
    assert report.data.count("data:image/jpeg;base64,") == 2  # the good row: before, after
    for row_id in ("lighthouse", "broken-1", "broken-2", "broken-3"):
        assert row_id in report.data
    every = json.dumps([artifact.data for artifact in artifacts])
    assert TOKEN not in every and stack.store.upload_token not in every
    assert "signature=" not in every  # the staged inputs' signed URLs
    print(f"batch report artifact: {len(report.data)} characters for {len(artifacts)} artifacts")


def test_the_automation_pauses_the_nightly_deployment(stack: Stack, failing_batch: Any) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + SECONDS_FOR_THE_SERVER
    with get_client(sync_client=True) as client:
        while not (paused := client.read_deployment_by_name(NIGHTLY).paused):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert paused, stack.log_tail()


def test_a_rows_log_lines_are_in_its_task_run_and_name_it(stack: Stack, failing_batch: Any) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[failing_batch.id]))
        )
        task_runs = {
            run.id: run.name
            for run in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[failing_batch.id]))
            )
        }
    row_lines = [log for log in logs if log.message.startswith("row 1 (lighthouse): ")]
    messages = [log.message for log in row_lines]
    # The request's status lines (from the shared client) and where its outputs went.
    assert any(" is completed" in message for message in messages), messages
    assert any("archived to " in message and "metadata.json" in message for message in messages)
    assert {task_runs.get(log.task_run_id) for log in row_lines} == {"row-1 lighthouse"}
    assert {"row-2 broken-1", "row-3 broken-2", "row-4 broken-3"} <= set(task_runs.values())
