"""A new user's first ten minutes: each test starts in an empty folder with only what the
README says, and runs `nanobanana` as a person would (a subprocess, a clean environment).

Local files work without setup (inline `data:` URIs), the demo cannot touch a real
account, errors say what to do and never dump a traceback, a bad batch row is named
before Prefect's server starts.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
from pathlib import Path

import pytest
from PIL import Image

from prefect_nanobanana.cli import (
    EXIT_AUTH,
    EXIT_BAD_INPUT,
    EXIT_UNREACHABLE,
    main,
)
from prefect_nanobanana.cli.exit_codes import FailureContext, failure_of
from prefect_nanobanana.client import AuthenticationError
from tests.fixtures.scratch import TrapServer, run_cli, scratch_env

TIME_SCALE = 0.005


@pytest.fixture
def emulator(emulator_factory):
    return emulator_factory(time_scale=TIME_SCALE)


def _api_env(tmp_path: Path, emulator, **extra: str) -> dict[str, str]:
    """What `eval "$(nanobanana emulator --print-env)"` puts in a shell, in a clean one."""
    variables = {
        "RUNCOMFY_BASE_URL": emulator.base_url,
        "RUNCOMFY_API_TOKEN": emulator.config.api_tokens[0],
        "RUNCOMFY_POLL_TIME_SCALE": str(TIME_SCALE),
    }
    return scratch_env(tmp_path, **{**variables, **extra})


def _photo(folder: Path, name: str = "photo.png", size: tuple[int, int] = (800, 600)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (20, 120, 140)).save(folder / name)
    return folder / name


def _closed_port_url() -> str:
    """A loopback URL where nothing listens (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_edit_a_local_photo_into_out_sends_it_inline(tmp_path, emulator):
    work = tmp_path / "work"
    photo = _photo(work)
    done = run_cli(
        ["edit", "--prompt", "Add snow", "--image", "photo.png", "--out", "out"],
        cwd=work,
        env=_api_env(tmp_path, emulator),
    )

    assert done.returncode == 0, done.stderr
    (job_id,) = [line.split()[2] for line in done.stderr.splitlines() if "Submitted" in line]
    assert sorted(path.name for path in (work / "out").iterdir()) == [
        f"{job_id}.metadata.json",
        f"{job_id}.png",
    ]
    # What a person reads: where the file went, and what it cost.
    assert f"saved {work / 'out' / job_id}.png (1200x896 png)" in done.stdout
    assert "cost $0.15" in done.stdout
    # The emulator's record of the request: the photo itself, inline.
    (sent,) = emulator.job(job_id).image_urls
    header, _, payload = sent.partition(",")
    assert header == "data:image/png;base64"
    assert base64.b64decode(payload) == photo.read_bytes()
    metadata = json.loads((work / "out" / f"{job_id}.metadata.json").read_text())
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()
    assert metadata["sources"] == [f"inline:photo.png sha256={digest}"]
    assert "base64" not in json.dumps(metadata)


def test_edit_refuses_a_url_that_is_no_image_before_paying(
    emulator, use_emulator, image_server, capsys
):
    use_emulator(emulator)
    url = image_server.url_for("missing.png", "X-Amz-Signature=secret")
    assert main(["edit", "--prompt", "Add snow", "--image", url]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "missing.png: HTTP 404" in err and "secret" not in err
    assert emulator.stats.submits_received == 0


def test_an_image_too_big_to_inline_is_refused_with_the_sizes_and_nothing_paid(tmp_path, emulator):
    work = tmp_path / "work"
    work.mkdir()
    # A real PNG (its header is read for the pixel cap), padded to 5 MiB with a trailing
    # chunk that decoders skip: the file size is what the inline cap judges.
    header = io.BytesIO()
    Image.new("RGB", (64, 64), "teal").save(header, format="PNG")
    (work / "huge.png").write_bytes(header.getvalue().ljust(5 * 1024 * 1024, b"\0"))
    done = run_cli(
        ["edit", "--prompt", "Add snow", "--image", "huge.png"],
        cwd=work,
        env=_api_env(tmp_path, emulator),
    )
    assert done.returncode == EXIT_BAD_INPUT
    assert "5.0 MiB is too large to send inline (6.7 MiB as a data: URI" in done.stderr
    assert "--staging" in done.stderr and "Traceback" not in done.stderr
    assert emulator.stats.submits_received == 0


def test_an_unreachable_base_url_is_named_with_what_to_check_and_no_traceback(tmp_path):
    work = tmp_path / "work"
    _photo(work)
    base_url = _closed_port_url()
    done = run_cli(
        ["edit", "--prompt", "Add snow", "--image", "photo.png"],
        cwd=work,
        env=scratch_env(tmp_path, RUNCOMFY_BASE_URL=base_url, RUNCOMFY_API_TOKEN="t"),
    )
    assert done.returncode == EXIT_UNREACHABLE
    last_lines = done.stderr.strip().splitlines()[-2:]
    assert "could not reach RunComfy" in last_lines[0] and base_url in last_lines[0]
    assert f"Check the base URL {base_url}" in last_lines[1]
    assert "RUNCOMFY_BASE_URL" in last_lines[1] and "nanobanana emulator" in last_lines[1]
    assert "Traceback" not in done.stderr


def test_debug_shows_the_traceback_of_an_expected_failure(tmp_path, emulator):
    env = _api_env(tmp_path, emulator, RUNCOMFY_API_TOKEN="wrong-token")
    quiet = run_cli(["status", "some-id"], cwd=tmp_path, env=env)
    loud = run_cli(["status", "some-id", "--debug"], cwd=tmp_path, env=env)
    assert quiet.returncode == loud.returncode == EXIT_AUTH
    assert "Traceback" not in quiet.stderr and "Traceback" in loud.stderr
    assert "AuthenticationError" in loud.stderr and "wrong-token" not in loud.stderr


def test_the_credentials_hint_appears_only_where_the_flag_exists():
    error = AuthenticationError("refused")
    _, with_flag = failure_of(error, FailureContext(has_credentials_flag=True))
    _, without = failure_of(error, FailureContext(has_credentials_flag=False))
    assert "--credentials BLOCK" in with_flag and "--credentials" not in without


def test_every_verb_that_calls_the_api_takes_credentials():
    from prefect_nanobanana.cli import build_parser

    verbs = build_parser()._subparsers._group_actions[0].choices  # argparse's own registry
    for verb in ("edit", "submit", "status", "result", "cancel", "batch"):
        assert "--credentials" in verbs[verb].format_help(), verb
    assert "--credentials" not in verbs["demo"].format_help()


def test_batch_lists_every_bad_row_before_prefect_starts(tmp_path, emulator):
    work = tmp_path / "work"
    _photo(work)
    (work / "notes.txt").write_text("not a picture\n")
    rows = [
        {"id": "fine", "prompt": "Add snow", "images": ["photo.png"]},
        {"id": "missing", "prompt": "Add snow", "images": ["nope.png"]},
        {"id": "text", "prompt": "Add snow", "images": ["notes.txt"]},
        {"id": "gone", "prompt": "Add snow", "images": [f"{emulator.base_url}/files/x/0.png"]},
        {"id": "ratio", "prompt": "Add snow", "images": ["photo.png"], "aspect_ratio": "2:1"},
    ]
    (work / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = _api_env(tmp_path, emulator)
    done = run_cli(["batch", "manifest.jsonl", "--archive", "archive"], cwd=work, env=env)

    assert done.returncode == EXIT_BAD_INPUT
    problems = [line.strip() for line in done.stderr.splitlines() if line.startswith("  line ")]
    assert [problem.split(":")[0] for problem in problems] == [
        "line 2",
        "line 3",
        "line 4",
        "line 5",
    ]
    assert "nope.png: file not found" in problems[0] and "not an image" in problems[1]
    assert "HTTP 404" in problems[2] and "aspect_ratio" in problems[3]
    assert "Nothing was submitted" in done.stderr and "--allow-partial" in done.stderr
    assert emulator.stats.submits_received == 0
    # No Prefect server ever started: its temporary server would have made a database here.
    assert not list(Path(env["PREFECT_HOME"]).rglob("*.db"))
    assert not (work / "archive").exists()


@pytest.mark.usefixtures("prefect_harness")
def test_credentials_flag_picks_a_saved_block_over_the_environment(
    tmp_path, emulator, monkeypatch, capsys
):
    from prefect_nanobanana import RunComfyCredentials, edit_image
    from prefect_nanobanana.blocks.credentials import CredentialsNotFoundError

    photo = _photo(tmp_path)
    argv = ["submit", "--prompt", "p", "--image", str(photo), "--credentials"]
    with TrapServer() as trap:
        monkeypatch.setenv("RUNCOMFY_BASE_URL", trap.url)
        monkeypatch.setenv("RUNCOMFY_API_TOKEN", "environment-token")
        RunComfyCredentials(
            api_token=emulator.config.api_tokens[0], base_url=emulator.base_url
        ).save("issue13-emulator", overwrite=True)
        assert main([*argv, "issue13-emulator"]) == 0
        request_id = capsys.readouterr().out.strip()
        assert main([*argv, "issue13-no-such-block"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "no RunComfyCredentials block named 'issue13-no-such-block'" in err
    assert "leave out --credentials to use RUNCOMFY_API_TOKEN" in err  # not redacted away
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps({"prompt": "p", "images": [str(photo)]}) + "\n")
    batch = ["batch", str(manifest), "--archive", str(tmp_path / "archive")]
    # The batch said it in a flow run's traceback, with the exit code of a bug.
    assert main([*batch, "--credentials", "issue13-no-such-block"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "no RunComfyCredentials block named 'issue13-no-such-block'" in err
    assert "Traceback" not in err
    with pytest.raises(CredentialsNotFoundError, match="issue13-no-such-block"):
        edit_image(
            prompt="p", image_urls=[f"{trap.url}/a.png"], credentials="issue13-no-such-block"
        )
    assert trap.requests == []
    assert emulator.stats.submits_received == 1  # the missing block stopped before any call
    # `submit` sends a local image inline too.
    assert emulator.job(request_id).image_urls[0].startswith("data:image/png;base64,")


def test_the_demo_never_reaches_a_saved_default_block_or_the_environment(tmp_path, prefect_harness):
    """A shell pointed at a Prefect server whose `default` block holds a real account, and
    RUNCOMFY_* variables for that account: the demo still runs on its own emulator and on
    Prefect's temporary server, and the "real account" (a trap) sees nothing."""
    from prefect.client.orchestration import get_client

    from prefect_nanobanana import RunComfyCredentials

    work = tmp_path / "work"
    work.mkdir()
    with TrapServer() as trap:
        block_id = RunComfyCredentials(api_token="real-account-token", base_url=trap.url).save(
            "default", overwrite=True
        )
        try:
            with get_client(sync_client=True) as client:
                runs_before = client.count_flow_runs()
            env = scratch_env(
                tmp_path,
                PREFECT_API_URL=prefect_harness.api_url,
                RUNCOMFY_BASE_URL=trap.url,
                RUNCOMFY_API_TOKEN="real-account-token",
            )
            done = run_cli(["demo", "--out", "demo"], cwd=work, env=env, timeout=600)
            with get_client(sync_client=True) as client:
                runs_after = client.count_flow_runs()
        finally:
            # The session's other tests rely on "default" being absent (environment fallback).
            with get_client(sync_client=True) as client:
                client.delete_block_document(block_id)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 archived, 0 already archived, 0 failed" in done.stdout
    assert trap.requests == []
    assert runs_after == runs_before  # the remote server never saw the demo's run


def test_the_demos_temporary_server_sends_no_telemetry():
    """Offline means offline: the server the demo starts must not phone Prefect home."""
    from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    from prefect_nanobanana.cli.demo import _temporary_server

    # Prefect's default, which a user's machine has (the tests turn it off).
    with temporary_settings(updates={PREFECT_SERVER_ANALYTICS_ENABLED: True}):
        with _temporary_server():
            assert PREFECT_SERVER_ANALYTICS_ENABLED.value() is False
        assert PREFECT_SERVER_ANALYTICS_ENABLED.value() is True
