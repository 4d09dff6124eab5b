"""The README's and the documentation's runnable examples, run as written in an empty folder
against the emulator.

A block is runnable when the line before its fence is an HTML comment starting
`<!-- runnable`. A page's blocks run in order in one shell (a Python block through
`python -`), so a later block may use what an earlier one set up, as a reader
following the page would. Each page starts from its own empty folder.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.scratch import scratch_env

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
_RUNNABLE = re.compile(r"^<!-- runnable[^\n]*-->\n```(bash|python)\n(.*?)^```$", re.M | re.S)


def runnable_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every block marked runnable, in order."""
    return [(match.group(1), match.group(2)) for match in _RUNNABLE.finditer(text)]


def pages_with_runnable_blocks() -> list[Path]:
    """The README and every documentation page that marks a block runnable."""
    pages = [README, *sorted(DOCS.rglob("*.md"))]
    return [page for page in pages if runnable_blocks(page.read_text())]


def run_page(page: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run the page's runnable blocks in one shell, in an empty folder; (result, folder)."""
    work = tmp_path / "work"
    work.mkdir()
    script = [
        "set -euo pipefail",
        # The reader stops the emulator by hand when done; the test must not leave it running.
        "trap 'kill ${NANOBANANA_EMULATOR_PID:-} 2>/dev/null || true' EXIT",
    ]
    for language, code in runnable_blocks(page.read_text()):
        script.append(code if language == "bash" else f"python - <<'PY'\n{code}PY")
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=work,
        env=scratch_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, work


def test_the_readme_marks_its_offline_examples_runnable():
    blocks = runnable_blocks(README.read_text())
    assert [language for language, _ in blocks].count("python") >= 1
    assert "nanobanana edit" in blocks[0][1] and "--print-env" in blocks[0][1]
    assert "example.com" not in README.read_text()


def test_the_readme_is_short_and_puts_first_things_first():
    """A user's five minutes: at most 250 lines; install, token, a first edit and the two
    quick-start commands within the first 60."""
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    first = "\n".join(lines[:60])
    for needed in (
        "pip install",
        "git+https://",
        "Python 3.1",
        "RUNCOMFY_API_TOKEN",
        "RunComfyCredentials",
        "nanobanana edit",
        "make demo",
        "make test",
        "docs/images/before-after.png",
    ):
        assert needed in first, needed
    assert "## Where things live" in README.read_text()


def test_the_getting_started_page_has_runnable_blocks():
    assert DOCS / "getting-started.md" in pages_with_runnable_blocks()


@pytest.mark.parametrize(
    "page", pages_with_runnable_blocks(), ids=lambda page: str(page.relative_to(REPO))
)
def test_the_commands_work_as_written(page, tmp_path):
    done, work = run_page(page, tmp_path)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    # Every page's first edit saves one picture in ./out.
    assert len(list((work / "out").glob("*.png"))) == 1
