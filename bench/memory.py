"""Archive memory: peak RSS growth while archiving many large outputs.

A flow archiving a batch runs in a worker next to other flows; if archiving held
each output in memory, a 4K batch (tens of outputs of tens of MB) would need
hundreds of MB, and more for bigger outputs. `archive_outputs` streams every
output through a temp file, so its peak should stay small and flat whatever the
number and size of the outputs. The baseline is the obvious code:
`httpx.get(url).content`, then write the bytes. Its peak grows with the number
of outputs too, not only their size: each response sits in a reference cycle
that only the cyclic garbage collector frees, so several are alive at once.

Each variant runs in a fresh subprocess (so imports and earlier variants do not
count) that resets its peak RSS (`/proc/self/clear_refs`) once everything is
imported, archives, and reports VmHWM minus the RSS it started from. The
outputs are real PNGs padded to the size (the emulator's padding) served from a
loopback HTTP server in this process.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ._common import Verdict, print_header, table, write_results

MB = 1024 * 1024
VARIANTS: tuple[tuple[int, int], ...] = ((5, 30), (20, 30), (20, 60))  # (outputs, MB each)
METHODS = ("archive_outputs", "httpx.get().content")
RUNS = 3  # median of this many fresh processes per cell
GROWTH_GOAL_MB = 64.0
FLAT_GOAL_MB = 16.0  # largest minus smallest growth across the variants
_REPO = Path(__file__).resolve().parent.parent


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def _make_outputs(folder: Path) -> None:
    """One valid PNG per size, padded like the emulator pads its big outputs."""
    from prefect_nanobanana.emulator.images import render_output

    for size_mb in sorted({size for _, size in VARIANTS}):
        data = render_output("memory benchmark", 0, (1024, 1024), "png", size_mb * MB)
        (folder / f"output-{size_mb}.png").write_bytes(data)


def _serve(folder: Path) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    return server


def _child(method: str, urls: list[str], target: str) -> dict[str, float]:
    """Runs in the fresh subprocess: archive `urls` into `target`, report memory and time."""
    import httpx

    from prefect_nanobanana.storage.archive import archive_outputs

    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
    began = time.perf_counter()
    if method == "archive_outputs":
        archive_outputs("memory-bench", urls, date=dt.date(2025, 1, 1), archive_uri=target)
    else:
        for index, url in enumerate(urls):
            Path(target, f"{index}.png").write_bytes(httpx.get(url).content)
    seconds = time.perf_counter() - began
    return {"growth_mb": (status("VmHWM") - before) / MB, "seconds": seconds, "rss_mb": before / MB}


def _measure(method: str, urls: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as target:
        done = subprocess.run(
            [sys.executable, "-m", "bench.memory", "--child", method, target, *urls],
            cwd=_REPO,
            env={**os.environ, "PYTHONPATH": str(_REPO)},
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run() -> Verdict:
    """Every variant with both methods in fresh processes; print the table, write the JSON."""
    print_header("memory: peak RSS growth while archiving outputs to a local folder")
    print(f"each cell: median of {RUNS} fresh processes; outputs streamed over loopback HTTP")
    measured: dict[tuple[str, int, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-outputs-") as folder:
        _make_outputs(Path(folder))
        server = _serve(Path(folder))
        base = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            for count, size_mb in VARIANTS:
                urls = [f"{base}/output-{size_mb}.png?i={index}" for index in range(count)]
                for method in METHODS:
                    samples = [_measure(method, urls) for _ in range(RUNS)]
                    measured[method, count, size_mb] = {
                        "method": method,
                        "outputs": count,
                        "output_mb": size_mb,
                        "peak_growth_mb": statistics.median(s["growth_mb"] for s in samples),
                        "seconds": statistics.median(s["seconds"] for s in samples),
                        "runs": samples,
                    }
        finally:
            server.shutdown()
            server.server_close()
    rows: list[list[object]] = []
    for (method, count, size_mb), cell in measured.items():
        naive = measured[METHODS[1], count, size_mb]["peak_growth_mb"]
        rows.append(
            [
                f"{count} x {size_mb} MB",
                method,
                cell["peak_growth_mb"],
                cell["peak_growth_mb"] / naive,
                cell["seconds"],
                count * size_mb / cell["seconds"],
            ]
        )
    print(table(["variant", "method", "peak MB", "x naive", "seconds", "MB/s"], rows))
    ours = [measured[METHODS[0], count, size]["peak_growth_mb"] for count, size in VARIANTS]
    spread = max(ours) - min(ours)
    met = max(ours) <= GROWTH_GOAL_MB and spread <= FLAT_GOAL_MB
    detail = (
        f"archive_outputs peaks at {max(ours):.1f} MB (goal <= {GROWTH_GOAL_MB:g} MB), "
        f"within {spread:.1f} MB from {VARIANTS[0][0]} x {VARIANTS[0][1]} MB to "
        f"{VARIANTS[-1][0]} x {VARIANTS[-1][1]} MB (flat: goal <= {FLAT_GOAL_MB:g} MB)"
    )
    verdict = Verdict("memory", met, detail)
    write_results(
        "memory", {"runs": RUNS, "results": list(measured.values()), "verdict": asdict(verdict)}
    )
    print(verdict.line())
    return verdict


if __name__ == "__main__":
    if sys.argv[1:2] != ["--child"]:
        sys.exit("internal entry point; run `python -m bench memory`")
    print(json.dumps(_child(sys.argv[2], sys.argv[4:], sys.argv[3])))
