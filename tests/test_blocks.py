"""The RunComfy blocks: Prefect's standard block suite, secrets, clients and the job block."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from urllib.error import URLError
from urllib.request import urlopen

import pytest
from prefect import flow, runtime
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import ValidationError

from prefect_nanobanana import (
    AsyncRunComfyClient,
    InvalidBaseURLError,
    JobCancelledError,
    NanoBananaEditJob,
    NanoBananaEditJobRun,
    RunComfyClient,
    RunComfyCredentials,
)
from prefect_nanobanana.blocks.credentials import aresolve_credentials, resolve_credentials
from prefect_nanobanana.emulator import Fault, FaultPlan

SECRET = "rc-block-secret-5e1f"


def _logo_reachable(url: str) -> bool:
    try:
        with urlopen(url, timeout=5):
            return True
    except (URLError, OSError):
        return False


class _OfflineAwareSuite(BlockStandardTestSuite):
    def test_has_a_valid_image(self, block: type[Block]) -> None:
        # The suite downloads the logo; this workplace has no internet.
        if not _logo_reachable(str(block._logo_url)):
            pytest.skip("the logo URL is not reachable from here (offline)")
        super().test_has_a_valid_image(block)


class TestRunComfyCredentialsStandardSuite(_OfflineAwareSuite):
    @pytest.fixture
    def block(self) -> type[Block]:
        return RunComfyCredentials


class TestNanoBananaEditJobStandardSuite(_OfflineAwareSuite):
    @pytest.fixture
    def block(self) -> type[Block]:
        return NanoBananaEditJob


def test_token_is_hidden_in_repr_and_str():
    credentials = RunComfyCredentials(api_token=SECRET)
    assert SECRET not in repr(credentials)
    assert SECRET not in str(credentials)
    assert SECRET not in repr(credentials.get_client())
    assert credentials.api_token.get_secret_value() == SECRET


def test_clients_use_the_fields(monkeypatch):
    monkeypatch.delenv("RUNCOMFY_API_TOKEN", raising=False)
    credentials = RunComfyCredentials(
        api_token=SECRET, base_url="http://127.0.0.1:9/", request_timeout=7, total_timeout=12
    )
    with credentials.get_client() as client:
        assert isinstance(client, RunComfyClient)
        assert client.base_url == "http://127.0.0.1:9"
        assert client.timeout == 7
        assert client.total_timeout == 12
    client = credentials.get_async_client()
    assert isinstance(client, AsyncRunComfyClient)
    assert client.base_url == "http://127.0.0.1:9"
    assert client.total_timeout == 12
    asyncio.run(client.aclose())


def test_the_total_of_one_call_defaults_to_what_its_description_says():
    from prefect_nanobanana.client import DEFAULT_TOTAL_TIMEOUT

    field = RunComfyCredentials.model_fields["total_timeout"]
    assert field.default == DEFAULT_TOTAL_TIMEOUT == 45
    assert "45 s by default" in field.description and field.description.endswith(".")
    assert RunComfyCredentials(api_token=SECRET).total_timeout == 45
    with pytest.raises(ValidationError):
        RunComfyCredentials(total_timeout=0)


def test_empty_fields_fall_back_to_the_environment(monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", SECRET)
    monkeypatch.setenv("RUNCOMFY_BASE_URL", "http://127.0.0.1:10")
    with RunComfyCredentials().get_client() as client:
        assert client.base_url == "http://127.0.0.1:10"
        assert client._api_token.get_secret_value() == SECRET
    monkeypatch.delenv("RUNCOMFY_BASE_URL")
    with RunComfyCredentials().get_client() as client:
        assert client.base_url == "https://model-api.runcomfy.net"


@pytest.mark.parametrize("base_url", ["not-a-url", "ftp://host", "http://", "http://h:99999"])
def test_a_base_url_that_is_no_url_is_refused_by_the_block_and_the_client(base_url, monkeypatch):
    """It was tried as a host, retried 6 times and reported as an unreachable API."""
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", SECRET)
    with pytest.raises(ValueError, match="base URL") as refused:
        RunComfyCredentials(base_url=base_url)
    assert repr(base_url) in str(refused.value)
    with pytest.raises(InvalidBaseURLError, match=r"base URL .* expected e\.g\. https://"):
        RunComfyClient(base_url=base_url)
    monkeypatch.setenv("RUNCOMFY_BASE_URL", base_url)
    with pytest.raises(InvalidBaseURLError, match="RUNCOMFY_BASE_URL"):
        RunComfyCredentials().get_client()


@pytest.mark.prefect
def test_clients_log_to_the_run_logger(prefect_harness, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", SECRET)

    @flow
    def which_logger() -> tuple[str, str]:
        with RunComfyCredentials().get_client() as client:
            return str(client.logger.extra.get("flow_run_id")), str(runtime.flow_run.id)

    logged_to, run_id = which_logger()
    assert logged_to == run_id
    with RunComfyCredentials().get_client() as client:
        assert client.logger.name == "prefect_nanobanana.client"


@pytest.mark.prefect
def test_round_trip_keeps_the_token_and_never_shows_it(prefect_harness, caplog):
    caplog.set_level(logging.DEBUG)
    RunComfyCredentials(api_token=SECRET, base_url="http://127.0.0.1:11").save(
        "round-trip", overwrite=True
    )
    loaded = RunComfyCredentials.load("round-trip")
    assert loaded.api_token.get_secret_value() == SECRET
    assert loaded.base_url == "http://127.0.0.1:11"
    assert SECRET not in repr(loaded)

    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            "round-trip", block_type_slug="runcomfy-credentials", include_secrets=False
        )
    assert document.data["base_url"] == "http://127.0.0.1:11"
    assert SECRET not in str(document.data)
    assert SECRET not in caplog.text


@pytest.mark.prefect
def test_job_block_round_trip_keeps_the_nested_token_secret(prefect_harness):
    NanoBananaEditJob(
        credentials=RunComfyCredentials(api_token=SECRET),
        prompt="make it teal",
        image_urls=["https://example.com/a.png"],
        resolution="2K",
    ).save("round-trip-job", overwrite=True)
    loaded = NanoBananaEditJob.load("round-trip-job")
    assert loaded.credentials.api_token.get_secret_value() == SECRET
    assert loaded.resolution == "2K"
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            "round-trip-job", block_type_slug="nano-banana-edit-job", include_secrets=False
        )
    assert SECRET not in str(document.model_dump())


@pytest.mark.prefect
def test_default_credentials_fall_back_to_env_until_a_block_is_saved(prefect_harness, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", SECRET)
    fallback = resolve_credentials("default")
    assert fallback.api_token is None and fallback.base_url is None
    with pytest.raises(ValueError, match="no-such-block"):
        resolve_credentials("no-such-block")

    saved = RunComfyCredentials(api_token="other", base_url="http://127.0.0.1:12")
    saved.save("default", overwrite=True)
    try:
        assert resolve_credentials("default").base_url == "http://127.0.0.1:12"
        assert asyncio.run(aresolve_credentials("default")).base_url == "http://127.0.0.1:12"
    finally:
        RunComfyCredentials.delete("default")


@pytest.mark.prefect
@pytest.mark.parametrize("flow_name", ["edit_image", "batch_edit"])
def test_a_saved_block_picked_in_a_deployment_form_starts_a_run(prefect_harness, flow_name):
    """The UI sends a picked block as `{"$ref": ...}`; the server must accept it."""
    from prefect.utilities.callables import parameter_schema

    from prefect_nanobanana import flows

    flow_ = getattr(flows, flow_name)
    block_id = RunComfyCredentials(api_token=SECRET, base_url="http://127.0.0.1:13").save(
        "picked-in-a-form", overwrite=True
    )
    picked = {"$ref": {"block_document_id": str(block_id)}}
    # An unsaved block as its fields: `request_timeout` is what tells it from a reference.
    inline = {"base_url": "http://127.0.0.1:14", "request_timeout": 30}
    required = (
        {"prompt": "p", "image_urls": ["https://example.com/a.png"]}
        if flow_name == "edit_image"
        else {"jobs": [{"prompt": "p", "images": ["https://example.com/a.png"]}]}
    )
    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(
            flow_id=client.create_flow_from_name(flow_.name),
            name=f"form-{flow_name}",
            parameter_openapi_schema=parameter_schema(flow_).model_dump_for_openapi(),
            enforce_parameter_schema=True,
        )
        runs = [
            client.create_flow_run_from_deployment(
                deployment_id, parameters={**required, "credentials": credentials}
            )
            for credentials in (picked, "picked-in-a-form", inline)
        ]
    assert [run.parameters["credentials"] for run in runs] == [
        picked,
        "picked-in-a-form",
        inline,
    ]
    # What the flow then gets when the run starts: the saved block, loaded.
    started_with = flow_.validate_parameters(runs[0].parameters)["credentials"]
    assert isinstance(started_with, RunComfyCredentials)
    assert started_with.base_url == "http://127.0.0.1:13"


@pytest.mark.prefect
def test_prefect_block_register_finds_every_block(prefect_harness):
    completed = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "prefect_nanobanana"],
        env=prefect_harness.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "RunComfy Credentials" in completed.stdout
    assert "Nano Banana Edit Job" in completed.stdout
    with get_client(sync_client=True) as client:
        for slug in ("runcomfy-credentials", "nano-banana-edit-job"):
            assert client.read_block_type_by_slug(slug).slug == slug


def _job(emulator, emulator_token, image_server, **settings) -> NanoBananaEditJob:
    return NanoBananaEditJob(
        credentials=RunComfyCredentials(api_token=emulator_token, base_url=emulator.base_url),
        prompt="paint it teal",
        image_urls=[image_server.url_for("wide.png")],
        **settings,
    )


@pytest.mark.prefect
def test_job_block_trigger_wait_and_fetch(
    prefect_harness, use_emulator, emulator, emulator_token, image_server
):
    use_emulator(emulator)
    job = _job(emulator, emulator_token, image_server, num_images=2)
    run = job.trigger()
    assert isinstance(run, NanoBananaEditJobRun)
    result = run.wait_for_completion()
    assert result.status == "completed"
    assert len(result.output_urls) == 2
    assert run.fetch_result().output_urls == result.output_urls
    assert emulator.stats.submits_accepted == 1


@pytest.mark.prefect
def test_job_block_triggered_twice_with_one_job_key_submits_once(
    prefect_harness, use_emulator, emulator, emulator_token, image_server
):
    use_emulator(emulator)
    job = _job(emulator, emulator_token, image_server)
    job_key = f"saved-edit-{uuid.uuid4().hex[:8]}"
    first = job.trigger(job_key=job_key)
    second = job.trigger(job_key=job_key)
    assert emulator.stats.submits_received == 1
    assert second.request_id == first.request_id and second.adopted and not first.adopted
    assert second.wait_for_completion().status == "completed"

    async def from_async_code() -> str:
        return (await job.atrigger(job_key=job_key)).request_id

    assert asyncio.run(from_async_code()) == first.request_id
    # Without a key every trigger is a new edit, as before.
    assert job.trigger().request_id != first.request_id
    assert emulator.stats.submits_received == 2


@pytest.mark.prefect
def test_job_block_async_twins_and_cancel(
    prefect_harness, use_emulator, emulator_factory, emulator_token, image_server
):
    emulator = use_emulator(emulator_factory(faults=FaultPlan([Fault("stuck", endpoint="job")])))
    job = _job(emulator, emulator_token, image_server, timeout_seconds=30)

    async def trigger_then_cancel() -> tuple[str, str]:
        run = await job.atrigger()
        cancelled = await run.acancel()
        with pytest.raises(JobCancelledError):
            await run.await_for_completion()
        return run.request_id, cancelled.outcome

    request_id, outcome = asyncio.run(trigger_then_cancel())
    assert outcome == "cancelled"
    assert emulator.job(request_id).status == "cancelled"
    assert emulator.stats.cancel_outcomes["cancelled"] == 1


def test_job_block_validates_before_submitting():
    with pytest.raises(ValueError):
        NanoBananaEditJob(prompt="x", image_urls=[], num_images=1)
    with pytest.raises(ValueError):
        NanoBananaEditJob(prompt="x", image_urls=["https://e.com/a.png"], num_images=5)
