"""Cost safety end to end: the emulator over HTTP, the flows on Prefect's test server, the CLI.

A price before the first submit, a budget that holds during the run, and every cent
accounted for: these tests count what the emulator accepted and billed.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from pathlib import Path

import pytest

from prefect_nanobanana.cli import EXIT_OK, EXIT_OVER_BUDGET, main

pytestmark = pytest.mark.usefixtures("prefect_harness")

TIME_SCALE = 0.005
IMAGES = ("wide.png", "tall.jpg", "square.png")


def _jobs(image_server, count: int = 12) -> list[dict]:
    return [
        {
            "id": f"row-{index}",
            "prompt": f"variation {index}",
            "images": [image_server.url_for(IMAGES[index % 3])],
        }
        for index in range(count)
    ]


def _manifest(tmp_path: Path, image_server, count: int = 12) -> Path:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(job) for job in _jobs(image_server, count)))
    return manifest


class _Recorded(logging.Handler):
    """Keeps the messages of one logger: Prefect's run loggers do not reach caplog."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())


def _manifest_lines(location: str) -> list[dict]:
    return [json.loads(line) for line in Path(location).read_text().splitlines()]


async def test_an_estimate_over_the_budget_is_refused_before_any_submit(
    emulator_factory, use_emulator, image_server, tmp_path
):
    from prefect_nanobanana import BudgetExceededError, batch_edit

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    with pytest.raises(BudgetExceededError) as refused:
        await batch_edit(
            jobs=_jobs(image_server),
            archive_uri=str(tmp_path / "archive"),
            max_cost_usd=1.0,
            concurrency_limit_name="test-cost-refused",
        )
    message = str(refused.value)
    assert "$1.80" in message and "$1.00" in message and "12 rows" in message
    assert emulator.stats.calls["submit"] == 0
    assert emulator.stats.calls["model"] == 1


async def test_a_failed_price_lookup_refuses_under_a_budget_and_warns_without(
    emulator_factory, use_emulator, image_server, tmp_path, monkeypatch
):
    from prefect_nanobanana import BudgetExceededError, RetryPolicy, batch_edit

    # The flow's client gives up after two quick attempts instead of six slow ones.
    fast = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02)
    monkeypatch.setattr("prefect_nanobanana.client.client.RetryPolicy", lambda: fast)
    # Every price lookup answers 500, more often than the client retries.
    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE, faults="model:server_error"))
    options = {
        "jobs": _jobs(image_server, 2),
        "archive_uri": str(tmp_path / "archive"),
        "concurrency_limit_name": "test-cost-no-price",
    }
    with pytest.raises(BudgetExceededError, match="price lookup failed"):
        await batch_edit(**options, max_cost_usd=100.0)
    assert emulator.stats.calls["submit"] == 0
    warnings = _Recorded(logging.WARNING)
    run_logger = logging.getLogger("prefect.flow_runs")  # what get_run_logger() writes to
    run_logger.addHandler(warnings)
    try:
        result = await batch_edit(**options)
    finally:
        run_logger.removeHandler(warnings)
    assert result.archived == 2 and result.estimated_cost is None
    assert any("No cost estimate (the price lookup failed" in text for text in warnings.texts)


async def test_a_refused_token_or_an_unreachable_api_stops_the_batch_before_its_rows(
    emulator_factory, use_emulator, image_server, tmp_path, monkeypatch
):
    """Each row found it out alone, after its own retries: a minute, a screen of warnings
    and "some rows failed" for what one price lookup had already said."""
    from prefect_nanobanana import (
        APIConnectionError,
        AuthenticationError,
        RetryPolicy,
        batch_edit,
    )

    fast = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02)
    monkeypatch.setattr("prefect_nanobanana.client.client.RetryPolicy", lambda: fast)
    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    options = {
        "jobs": _jobs(image_server, 3),
        "archive_uri": str(tmp_path / "archive"),
        "concurrency_limit_name": "test-stop-early",
    }
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "sk-refused")
    with pytest.raises(AuthenticationError):
        await batch_edit(**options)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("RUNCOMFY_BASE_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(APIConnectionError):
        await batch_edit(**options)
    assert emulator.stats.calls["submit"] == 0 and emulator.stats.calls["model"] == 1


async def test_the_budget_holds_during_the_run_when_bills_exceed_the_listed_price(
    emulator_factory, use_emulator, image_server, tmp_path, monkeypatch
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from prefect_nanobanana import batch_edit, observe

    emitted: list[tuple[str, dict]] = []
    real_emit = observe.emit_event

    def recording_emit(event: str, **fields):
        emitted.append((event, fields.get("payload") or {}))
        return real_emit(event, **fields)

    monkeypatch.setattr(observe, "emit_event", recording_emit)

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE, bill_multiplier=2.0))
    archive = tmp_path / "archive"
    options = {
        "jobs": _jobs(image_server),
        "archive_uri": str(archive),
        "max_concurrency": 3,
        "concurrency_limit_name": "test-cost-budget-holds",
        "allow_partial": True,
    }
    state = await batch_edit(**options, max_cost_usd=2.0, return_state=True)
    result = await state.result()

    paid = emulator.stats.submits_accepted
    assert 0 < paid < 12
    # Overshoot bounded by the rows in flight: each may bill more than its estimate.
    assert emulator.stats.spent_usd <= 2.0 + 3 * 0.30 + 1e-9
    assert result.archived == paid and result.over_budget == 12 - paid
    assert result.estimated_cost == pytest.approx(1.80)
    lines = _manifest_lines(result.results_manifest)
    assert len(lines) == 12
    held = [line for line in lines if line["status"] != "archived"]
    assert len(held) == 12 - paid
    assert all(
        line["status"] == "over_budget" and "held back by the budget" in line["error"]
        for line in held
    )
    assert all(line["request_id"] is None and line["cost"] is None for line in held)
    archived = [line for line in lines if line["status"] == "archived"]
    assert all(line["cost"] == pytest.approx(0.30) for line in archived)
    assert all(line["estimated_cost"] == pytest.approx(0.15) for line in archived)
    assert result.total_cost == pytest.approx(emulator.stats.spent_usd)
    over_budget_events = [payload for event, payload in emitted if event.endswith("over_budget")]
    assert sorted(payload["row"] for payload in over_budget_events) == sorted(
        line["row"] for line in held
    )
    completed = [payload for event, payload in emitted if event == "nanobanana.request.completed"]
    assert len(completed) == paid
    assert all(payload["cost"] == pytest.approx(0.30) for payload in completed)
    assert all(payload["estimated_cost"] == pytest.approx(0.15) for payload in completed)

    this_run = ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
    )
    async with get_client() as client:
        artifacts = {a.key: a.data for a in await client.read_artifacts(artifact_filter=this_run)}
    assert f"| 1K | {paid} | $" in artifacts["nanobanana-batch-cost"]
    assert "over_budget" in json.dumps(artifacts["nanobanana-batch-rows"])

    # Every cent accounted for: the ledger's bills sum to what the emulator billed.
    ledger = list((archive / "_ledger").glob("*.json"))
    billed = [json.loads(path.read_text()).get("cost") for path in ledger]
    assert sum(cost for cost in billed if cost) == pytest.approx(emulator.stats.spent_usd)

    # A rerun reports the earlier bills of the rows it skips, and pays only for the rest.
    again = await batch_edit(**options)
    skipped = [row for row in again.rows if row.status == "skipped"]
    assert len(skipped) == paid and all(row.cost == pytest.approx(0.30) for row in skipped)
    assert again.archived == 12 - paid and again.over_budget == 0
    assert emulator.stats.submits_accepted == 12
    assert again.total_cost == pytest.approx(emulator.stats.spent_usd)
    assert again.total_cost == pytest.approx(12 * 0.30)


def test_cli_batch_shows_a_failed_row_in_one_line_and_prefect_keeps_the_traceback(
    prefect_harness, emulator_factory, image_server, tmp_path
):
    """Prefect's console printed every failed row's and the flow run's traceback."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )

    from prefect_nanobanana.cli import EXIT_JOB_FAILED
    from tests.fixtures.scratch import run_cli

    emulator = emulator_factory(time_scale=TIME_SCALE, faults="job:fail_job@1")
    manifest = tmp_path / "two.jsonl"
    manifest.write_text("".join(json.dumps(job) + "\n" for job in _jobs(image_server, 2)))
    env = prefect_harness.env(
        RUNCOMFY_API_TOKEN=emulator.config.api_tokens[0],
        RUNCOMFY_BASE_URL=emulator.base_url,
        RUNCOMFY_POLL_TIME_SCALE=str(emulator.config.time_scale),
    )
    # As a person runs it: the console is the real one, not a test's capture of it.
    done = run_cli(["batch", str(manifest), "--archive", "archive"], cwd=tmp_path, env=env)
    assert done.returncode == EXIT_JOB_FAILED, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    ended = r"Flow run '([^']+)' - Encountered exception during execution: BatchFailedError"
    failed = re.search(ended, done.stderr)
    assert failed, done.stderr[-3000:]
    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[failed[1]]))
        )
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id]))
        )
    assert any("Traceback" in log.message and "BatchFailedError" in log.message for log in logs)


def test_cli_dry_run_prints_the_estimate_and_submits_nothing(
    emulator_factory, use_emulator, image_server, tmp_path, capsys
):
    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    manifest = _manifest(tmp_path, image_server)
    code = main(["batch", str(manifest), "--archive", str(tmp_path / "archive"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "12 rows to pay, 0 already done" in out
    assert "Estimated cost: $1.80" in out
    assert emulator.stats.calls["submit"] == 0
    assert not (tmp_path / "archive" / "_results").exists()


def test_cli_budget_and_spend_match_the_bills(
    emulator_factory, use_emulator, image_server, tmp_path, capsys
):
    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE, bill_multiplier=2.0))
    manifest = _manifest(tmp_path, image_server, 6)
    archive = str(tmp_path / "archive")
    refused = main(["batch", str(manifest), "--archive", archive, "--max-cost", "0.5"])
    assert refused == EXIT_OVER_BUDGET
    assert "$0.90" in capsys.readouterr().err
    assert emulator.stats.calls["submit"] == 0

    budget = ["--max-cost", "0.9", "--max-concurrency", "2"]
    held = main(["batch", str(manifest), "--archive", archive, *budget])
    out = capsys.readouterr().out
    assert held == EXIT_OVER_BUDGET  # rows held back, no allow_partial: the run failed
    assert "over_budget" in out and "over budget" in out
    assert 0 < emulator.stats.submits_accepted < 6

    assert main(["spend", "--archive", archive, "--json"]) == EXIT_OK
    spend = json.loads(capsys.readouterr().out)
    assert spend["total_billed_usd"] == pytest.approx(emulator.stats.spent_usd)
    assert len(spend["days"]) == 1
    assert main(["spend", "--archive", archive]) == EXIT_OK
    text = capsys.readouterr().out
    assert f"total billed ${emulator.stats.spent_usd:.2f}" in text
    assert main(["spend", "--archive", archive, "--since", "2999-01-01", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["total_billed_usd"] == 0


def test_single_edit_flows_refuse_an_estimate_over_the_budget(
    emulator_factory, use_emulator, image_server, tmp_path
):
    from prefect_nanobanana import BudgetExceededError, edit_and_archive, edit_image

    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    url = image_server.url_for("wide.png")
    with pytest.raises(BudgetExceededError, match=r"\$0\.60.*\$0\.50"):
        edit_image(prompt="teal", image_urls=[url], resolution="4K", num_images=2, max_cost_usd=0.5)
    with pytest.raises(BudgetExceededError, match=r"\$0\.30.*\$0\.20"):
        edit_and_archive(
            prompt="teal",
            images=[url],
            archive_uri=str(tmp_path / "a"),
            num_images=2,
            max_cost_usd=0.2,
        )
    assert emulator.stats.calls["submit"] == 0
    within = edit_image(prompt="teal", image_urls=[url], max_cost_usd=0.15)
    assert within.estimated_cost == pytest.approx(0.15) and within.cost == pytest.approx(0.15)


def test_cli_edit_refuses_over_the_budget(
    emulator_factory, use_emulator, image_server, tmp_path, capsys
):
    emulator = use_emulator(emulator_factory(time_scale=TIME_SCALE))
    argv = [
        "edit",
        "--prompt",
        "teal",
        "--image",
        image_server.url_for("wide.png"),
        "--out",
        str(tmp_path / "out"),
        "--resolution",
        "4K",
    ]
    assert main([*argv, "--max-cost", "0.2"]) == EXIT_OVER_BUDGET
    assert "$0.30" in capsys.readouterr().err
    assert emulator.stats.calls["submit"] == 0
    assert main([*argv, "--max-cost", "0.3"]) == EXIT_OK
    assert "Estimated cost $0.30" in (err := capsys.readouterr().err)
    assert "budget max cost $0.30)" in err
