"""The `nanobanana` command against the emulator: raw verbs, edit, exit codes, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefect_nanobanana.cli import (
    EXIT_AUTH,
    EXIT_BAD_INPUT,
    EXIT_BALANCE,
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_NOT_SAVED,
    EXIT_OUTCOME_UNKNOWN,
    EXIT_TIMEOUT,
    main,
)
from prefect_nanobanana.emulator import Fault, FaultPlan

TIME_SCALE = 0.005


@pytest.fixture
def api(emulator_factory, use_emulator):
    """An emulator the CLI reaches through the RUNCOMFY_* variables, as a user's shell would."""

    def start(**config):
        return use_emulator(emulator_factory(time_scale=TIME_SCALE, **config))

    return start


def test_raw_verbs_print_json_for_scripts(api, image_server, capsys):
    emulator = api()
    url = image_server.url_for("square.png")
    assert main(["submit", "--prompt", "p", "--image", url, "--json"]) == 0
    request_id = json.loads(capsys.readouterr().out)["request_id"]
    assert main(["status", request_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["request_id"] == request_id
    while emulator.job(request_id).status != "completed":
        time.sleep(0.01)
    assert main(["result", request_id, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "completed" and len(result["output_urls"]) == 1
    assert main(["cancel", request_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outcome"] == "not_cancellable"


def test_result_download_saves_the_outputs(api, image_server, tmp_path, capsys):
    emulator = api()
    url = image_server.url_for("wide.png")
    assert main(["submit", "--prompt", "p", "--image", url, "--num-images", "2"]) == 0
    request_id = capsys.readouterr().out.strip()
    while emulator.job(request_id).status != "completed":
        time.sleep(0.01)
    assert main(["result", request_id, "--download", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    saved = [line.removeprefix("saved ") for line in lines if line.startswith("saved ")]
    assert lines[0] == f"{request_id}: completed" and lines[-1] == "cost $0.30"
    # Named by the request, directly in the folder, with the metadata beside them.
    assert [Path(path).name for path in saved] == [f"{request_id}-1.png", f"{request_id}-2.png"]
    assert all(Path(path).is_file() for path in saved)
    assert (tmp_path / f"{request_id}.metadata.json").is_file()


def test_result_of_a_failed_job_exits_as_a_failed_job(api, image_server, capsys):
    emulator = api(faults=FaultPlan([Fault("fail_job", endpoint="submit")]))
    assert main(["submit", "--prompt", "p", "--image", image_server.url_for("wide.png")]) == 0
    request_id = capsys.readouterr().out.strip()
    while emulator.job(request_id).status != "failed":
        time.sleep(0.01)
    assert main(["result", request_id]) == EXIT_JOB_FAILED
    assert capsys.readouterr().out.splitlines()[0] == f"{request_id}: failed"


def test_result_prints_status_outputs_and_cost(api, image_server, capsys):
    emulator = api()
    assert main(["submit", "--prompt", "p", "--image", image_server.url_for("wide.png")]) == 0
    request_id = capsys.readouterr().out.strip()
    while emulator.job(request_id).status != "completed":
        time.sleep(0.01)
    assert main(["result", request_id]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{request_id}: completed",
        f"output {emulator.base_url}/files/{request_id}/0.png",
        "cost $0.15",
    ]


def test_edit_stages_edits_and_saves(
    api, sample_images, loopback_store, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("NANOBANANA_STAGING_TOKEN", loopback_store.upload_token)
    api()
    code = main(
        [
            "edit",
            "--prompt",
            "noir",
            "--image",
            str(sample_images / "a.png"),
            "--aspect-ratio",
            "1:1",
            "--output-format",
            "webp",
            "--staging",
            loopback_store.base_url,
            "--out",
            str(tmp_path / "out"),
            "--json",
        ]
    )
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert Path(payload["outputs"][0]).suffix == ".webp"
    assert Path(payload["metadata"]).is_file()


@pytest.mark.parametrize(
    ("config", "argv_tail", "expected"),
    [
        ({}, ["--num-images", "7"], 2),  # argparse refuses it: usage error
        ({"balance_usd": 0.01}, [], EXIT_BALANCE),
        ({"faults": FaultPlan([Fault("fail_job", endpoint="submit")])}, [], EXIT_JOB_FAILED),
        (
            {"faults": FaultPlan([Fault("stuck", endpoint="submit")])},
            ["--timeout", "0.3"],
            EXIT_TIMEOUT,
        ),
        (
            {"faults": FaultPlan([Fault("server_error", endpoint="submit", after_accept=True)])},
            [],
            EXIT_OUTCOME_UNKNOWN,
        ),
    ],
)
def test_distinct_exit_codes(api, image_server, tmp_path, capsys, config, argv_tail, expected):
    api(**config)
    argv = [
        "edit",
        "--prompt",
        "p",
        "--image",
        image_server.url_for("square.png"),
        "--out",
        str(tmp_path),
        *argv_tail,
    ]
    if expected == 2:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == EXIT_BAD_INPUT
        return
    assert main(argv) == expected
    assert "error:" in capsys.readouterr().err


def test_bad_token_and_bad_input_exit_codes(api, image_server, monkeypatch, capsys):
    api()
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "sk-wrong-secret")
    assert main(["status", "x"]) == EXIT_AUTH
    err = capsys.readouterr().err
    assert "RUNCOMFY_API_TOKEN" in err and "sk-wrong-secret" not in err
    assert main(["edit", "--prompt", "p", "--image", "/no/such/file.png"]) == EXIT_BAD_INPUT
    assert "file.png" in capsys.readouterr().err


def test_a_base_url_that_is_no_url_is_refused_at_once_with_the_reason(api, monkeypatch, capsys):
    """It was tried as a host: six attempts, then "unreachable" (exit 8)."""
    emulator = api()
    with pytest.raises(SystemExit) as exited:
        main(["status", "req-1", "--base-url", "not-a-url"])
    assert exited.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "argument --base-url: 'not-a-url' is not an http:// or https:// URL" in err
    # The same check where the URL comes from the environment (or a block).
    monkeypatch.setenv("RUNCOMFY_BASE_URL", "not-a-url")
    assert main(["status", "req-1"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "RUNCOMFY_BASE_URL 'not-a-url' is not an http:// or https:// URL" in err
    assert "nothing was paid for" in err
    assert sum(emulator.stats.calls.values()) == 0


def test_an_out_that_names_a_file_is_refused_before_the_submit(api, image_server, tmp_path, capsys):
    """It was found only when saving: the edit paid for, then "nothing was paid for"."""
    emulator = api()
    taken = tmp_path / "photo.png"
    taken.write_bytes(b"not a folder")
    url = image_server.url_for("square.png")
    assert main(["edit", "--prompt", "p", "--image", url, "--out", str(taken)]) == EXIT_BAD_INPUT
    assert "photo.png" in capsys.readouterr().err
    assert emulator.stats.submits_received == 0


def test_a_failure_after_the_submit_names_the_request_and_never_says_unpaid(
    api, image_server, tmp_path, capsys
):
    # The job's outputs are gone the moment it completes: its result is a 404.
    emulator = api(faults=FaultPlan([Fault("expire_output", calls=[1])]))
    url = image_server.url_for("square.png")
    assert main(["edit", "--prompt", "p", "--image", url, "--out", str(tmp_path)]) == EXIT_NOT_SAVED
    err = capsys.readouterr().err
    request_id = err.split("Submitted request ", 1)[1].split()[0]
    assert emulator.job(request_id).status == "completed"
    hint = f"The request was submitted, so it may be billed: `nanobanana result {request_id}`"
    assert hint in err
    assert "nothing was paid for" not in err


@pytest.mark.parametrize(
    "argv_tail",
    [
        ["--timeout", "0"],
        ["--timeout", "-5"],
        ["--timeout", "soon"],
        ["--max-cost", "-1"],
        ["--prompt", " "],
    ],
)
def test_values_that_cannot_work_are_refused_before_the_submit(
    api, image_server, tmp_path, capsys, argv_tail
):
    emulator = api()
    argv = ["edit", "--prompt", "p", "--image", image_server.url_for("square.png")]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--out", str(tmp_path), *argv_tail])
    assert exited.value.code == EXIT_BAD_INPUT
    assert f"argument {argv_tail[0]}: " in capsys.readouterr().err
    assert emulator.stats.submits_received == 0


def test_a_job_key_reused_for_another_prompt_is_refused_not_adopted(
    api, image_server, tmp_path, capsys
):
    """The key adopted its request whatever the edit: "Add rain" saved the fog picture."""
    emulator = api()
    url = image_server.url_for("square.png")
    argv = ["edit", "--image", url, "--out", str(tmp_path), "--job-key", "my-job-1"]
    assert main([*argv, "--prompt", "Add fog"]) == 0
    assert main([*argv, "--prompt", "Add fog"]) == 0  # the same edit again: adopted
    capsys.readouterr()
    assert main([*argv, "--prompt", "Add rain"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "job key 'my-job-1' already names request" in err and "with a different prompt:" in err
    assert main([*argv, "--prompt", "Add fog", "--resolution", "2K"]) == EXIT_BAD_INPUT
    assert "with other options:" in capsys.readouterr().err
    assert emulator.stats.submits_received == 1


def test_spend_counts_what_edit_archived(api, image_server, tmp_path, capsys):
    """`edit --archive` left its ledger entries "submitted" without their cost."""
    api()
    archive = str(tmp_path / "archive")
    url = image_server.url_for("square.png")
    for prompt in ("fog", "rain"):
        assert main(["edit", "--prompt", prompt, "--image", url, "--archive", archive]) == 0
    capsys.readouterr()
    assert main(["spend", "--archive", archive, "--json"]) == 0
    spent = json.loads(capsys.readouterr().out)
    assert (spent["total_billed_usd"], spent["without_bill"]) == (0.3, 0)


def test_s3_without_aws_credentials_says_what_to_set(
    api, sample_images, tmp_path, monkeypatch, capsys
):
    """It was "unexpected NoCredentialsError" (exit 1), from every verb that reads S3."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to ask for
    emulator = api()
    image = str(sample_images / "a.png")
    for argv in (
        ["spend", "--archive", "s3://my-archive/edits"],
        ["edit", "--prompt", "p", "--image", image, "--staging", "s3://my-staging/in"],
        ["edit", "--prompt", "p", "--image", image, "--archive", "s3://my-archive/edits"],
    ):
        assert main(argv) == EXIT_BAD_INPUT, argv
        err = capsys.readouterr().err
        assert "no AWS credentials found for S3: set AWS_ACCESS_KEY_ID and AWS_SECRET" in err
        assert "unexpected" not in err
    assert emulator.stats.submits_received == 0


# Runs the CLI in a child process and says, after its output, whether Prefect was imported.
_CLI_AND_WHETHER_PREFECT_LOADED = """
import json, sys
from prefect_nanobanana.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "prefect_imported": "prefect" in sys.modules}))
"""


@pytest.mark.prefect
def test_status_with_credentials_reads_the_block_from_the_configured_prefect_api(
    prefect_harness, emulator_factory, image_server, tmp_path
):
    """`status ID --credentials NAME` imported Prefect, and without a configured API started
    its temporary server (about 7 s), for one block: with PREFECT_API_URL set it is one
    HTTP read of that API."""
    from prefect_nanobanana import RunComfyClient, RunComfyCredentials

    emulator = emulator_factory(time_scale=TIME_SCALE)
    token = emulator.config.api_tokens[0]
    RunComfyCredentials(api_token=token, base_url=emulator.base_url).save(
        "cli-status-block", overwrite=True
    )
    with RunComfyClient(api_token=token, base_url=emulator.base_url) as client:
        edit = {"prompt": "p", "image_urls": [image_server.url_for("square.png")]}
        request_id = client.submit_edit(edit).request_id
    home = tmp_path / "prefect-home"
    # The environment's token is wrong and no base URL is set: only the block's can work.
    env = prefect_harness.env(PREFECT_HOME=str(home), RUNCOMFY_API_TOKEN="not-the-block-token")
    env.pop("RUNCOMFY_BASE_URL", None)

    def cli(*argv: str) -> tuple[list[str], str]:
        command = [sys.executable, "-c", _CLI_AND_WHETHER_PREFECT_LOADED, *argv]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        return run.stdout.splitlines(), run.stderr

    out, err = cli("status", request_id, "--credentials", "cli-status-block", "--json")
    assert json.loads(out[0])["request_id"] == request_id, err
    assert json.loads(out[-1]) == {"code": 0, "prefect_imported": False}
    out, err = cli("status", request_id, "--credentials", "no-such-block")
    assert json.loads(out[-1]) == {"code": EXIT_BAD_INPUT, "prefect_imported": False}
    assert "no RunComfyCredentials block named 'no-such-block'" in err
    assert prefect_harness.api_url in err
    assert not list(home.rglob("*.db"))  # no temporary server made its database


@pytest.mark.prefect
def test_the_paying_verbs_keep_to_the_credentials_blocks_daily_budget(
    prefect_harness, emulator_factory, image_server, tmp_path
):
    """`edit` and `submit` took `--daily-budget` only: a cap saved on the block they were
    given with `--credentials` was not applied (the flows apply it)."""
    from prefect_nanobanana import RunComfyCredentials
    from prefect_nanobanana.cli import EXIT_OVER_BUDGET

    emulator = emulator_factory(time_scale=TIME_SCALE)
    RunComfyCredentials(
        api_token=emulator.config.api_tokens[0], base_url=emulator.base_url, daily_budget_usd=0.0
    ).save("cli-daily-cap-block", overwrite=True)
    env = prefect_harness.env(RUNCOMFY_API_TOKEN="not-the-block-token")
    env.pop("RUNCOMFY_BASE_URL", None)
    image = ["--image", image_server.url_for("square.png"), "--prompt", "add snow"]
    archive = ["--archive", str(tmp_path / "archive")]
    for verb in ("edit", "submit"):
        command = [sys.executable, "-m", "prefect_nanobanana.cli", verb, *image, *archive]
        run = subprocess.run(
            [*command, "--credentials", "cli-daily-cap-block"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == EXIT_OVER_BUDGET, (verb, run.stdout, run.stderr)
        assert "daily_budget_usd" in run.stderr, run.stderr
        # `--daily-budget` overrides the block's cap, as a flow's parameter does.
        run = subprocess.run(
            [*command, "--credentials", "cli-daily-cap-block", "--daily-budget", "5"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, (verb, run.stdout, run.stderr)
        assert "budget daily cap $5.00)" in run.stderr, run.stderr
    assert emulator.stats.submits_received == 2


def test_ctrl_c_cancels_a_queued_request(api, image_server, tmp_path):
    emulator = api(faults=FaultPlan([Fault("stuck", endpoint="submit")]))
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect_nanobanana.cli",
            "edit",
            "--prompt",
            "p",
            "--image",
            image_server.url_for("square.png"),
        ],
        env=dict(os.environ),
        cwd=tmp_path,  # the default output folder (and its ledger) lands here
        stderr=subprocess.PIPE,
        text=True,
    )
    # Its first status call: the CLI is waiting (Ctrl-C during the submit itself is
    # another story, told by the submit guard), on a loaded machine too.
    deadline = time.monotonic() + 30
    while emulator.stats.calls["status"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=30)
    assert child.returncode == EXIT_INTERRUPTED
    assert "still queued; cancel: cancelled" in err
    assert emulator.stats.cancel_outcomes["cancelled"] == 1


def test_emulator_verb_takes_its_own_options(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["emulator", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--time-scale" in out and "--faults" in out and "--port" in out


def test_the_emulator_refuses_a_bad_port_or_log_file_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["emulator", "--port", "99999"])
    assert exited.value.code == 2
    assert "not a port (0-65535): '99999'" in capsys.readouterr().err
    log_file = tmp_path / "no-such-folder" / "emulator.log"
    assert main(["emulator", "--print-env", "--port", "0", "--log-file", str(log_file)]) == 1
    err = capsys.readouterr().err
    assert f"cannot write the log file {log_file}" in err and "Traceback" not in err
