"""The package installs like one: the wheel built from the clone, in a clean virtual
environment (no editable install, no repository on the path), runs the demo from an
empty folder and registers its blocks with Prefect.

Slow (a fresh environment, then Prefect's temporary server twice): marked `slow`, and
`-m 'not slow'` leaves it out. The dependencies are pinned to the versions of the
environment running the test, so pip takes them from its cache.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from prefect_nanobanana.cli.demo import TEMPORARY_SERVER_STARTUP_SECONDS
from tests.fixtures.scratch import scratch_env

# Minutes, not the suite's 300 s per test: the clean environment installs about 150 packages.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, **kwargs)
    assert done.returncode == 0, f"{args}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    return done


# What a build must not see: environments, earlier builds (setuptools reuses `build/`,
# which would hide a file the package data leaves out), caches.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv*", "build", "dist", "site", "*.egg-info", "__pycache__", "test-screenshots"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source") / "prefect-nanobanana"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    dist = tmp_path_factory.mktemp("dist")
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(source)]
    )
    (built,) = dist.glob("prefect_nanobanana-*.whl")
    return built


@pytest.fixture(scope="module")
def clean_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with the wheel and its dependencies, nothing else."""
    root = tmp_path_factory.mktemp("clean")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    # The same versions as this environment (pip's cache has them); not this package itself.
    frozen = _run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"]).stdout
    constraints = root / "constraints.txt"
    constraints.write_text(
        "".join(
            line + "\n"
            for line in frozen.splitlines()
            if "==" in line and not line.lower().startswith("prefect-nanobanana")
        )
    )
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run([*pip, str(wheel), "-c", str(constraints)])
    return venv


def _clean_env(tmp_path: Path, venv: Path) -> dict[str, str]:
    """A person's shell with only the clean environment's commands on PATH."""
    env = scratch_env(tmp_path)
    env["PATH"] = f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = str(TEMPORARY_SERVER_STARTUP_SECONDS)
    return env


def test_the_wheel_ships_the_package_and_its_type_hints_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "prefect_nanobanana/py.typed" in names
    assert "prefect_nanobanana/cli/__init__.py" in names
    assert not [name for name in names if name.startswith(("tests/", "bench/", "docs/", "flows/"))]


def test_the_installed_wheel_is_what_runs_not_the_clone(clean_venv, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    done = _run(
        ["python", "-c", "import prefect_nanobanana as p; print(p.__file__)"],
        cwd=work,
        env=_clean_env(tmp_path, clean_venv),
    )
    location = Path(done.stdout.strip())
    assert location.is_relative_to(clean_venv), location
    assert not location.is_relative_to(REPO)
    assert not list(clean_venv.rglob("__editable__*"))


def test_the_demo_runs_from_an_empty_folder(clean_venv, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    done = _run(["nanobanana", "demo"], cwd=work, env=_clean_env(tmp_path, clean_venv))
    assert "6 archived, 0 already archived, 0 failed" in done.stdout
    assert list((work / "nanobanana-demo" / "archive").rglob("metadata.json"))


def test_prefect_registers_the_blocks_of_the_installed_package(clean_venv, tmp_path):
    env = _clean_env(tmp_path, clean_venv)
    # No PREFECT_API_URL: each command starts Prefect's temporary server on the database in
    # PREFECT_HOME, so the second sees what the first registered. Wide, so no slug is cut.
    env["COLUMNS"] = "250"
    work = tmp_path / "empty"
    work.mkdir()
    _run(["prefect", "block", "register", "-m", "prefect_nanobanana"], cwd=work, env=env)
    listed = _run(["prefect", "block", "type", "ls"], cwd=work, env=env).stdout
    assert "runcomfy-credentials" in listed and "nano-banana-edit-job" in listed
