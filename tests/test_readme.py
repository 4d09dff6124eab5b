"""The README's runnable examples, run as written in an empty folder against the emulator.

A block is runnable when the line before its fence is an HTML comment starting
`<!-- runnable`. They run in order in one shell (a Python block through
`python -`), so a later block may use what an earlier one set up, as a reader
following the README would.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.fixtures.scratch import scratch_env

README = Path(__file__).resolve().parents[1] / "README.md"
_RUNNABLE = re.compile(r"^<!-- runnable[^\n]*-->\n```(bash|python)\n(.*?)^```$", re.M | re.S)


def runnable_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every block marked runnable, in order."""
    return [(match.group(1), match.group(2)) for match in _RUNNABLE.finditer(text)]


def test_the_readme_marks_its_offline_examples_runnable():
    blocks = runnable_blocks(README.read_text())
    assert [language for language, _ in blocks].count("python") >= 1
    assert "nanobanana edit" in blocks[0][1] and "--print-env" in blocks[0][1]
    assert "example.com" not in README.read_text()


def test_the_readme_commands_work_as_written(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    script = [
        "set -euo pipefail",
        # The reader stops the emulator by hand when done; the test must not leave it running.
        "trap 'kill ${NANOBANANA_EMULATOR_PID:-} 2>/dev/null || true' EXIT",
    ]
    for language, code in runnable_blocks(README.read_text()):
        script.append(code if language == "bash" else f"python - <<'PY'\n{code}PY")
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=work,
        env=scratch_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert len(list((work / "out").glob("*.png"))) == 1
