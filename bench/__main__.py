"""`python -m bench [name ...]`: run the named benchmarks, or all of them.

Each prints its tables and a one-line verdict; the verdicts are repeated at the
end so a long run can be judged at a glance. Exit status 1 if a goal is missed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from ._common import Verdict

BENCHMARKS = (
    "polling",
    "learned_priors",
    "memory",
    "startup",
    "batch_overhead",
    "scale",
    "s3_scale",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="name", help=f"any of {', '.join(BENCHMARKS)}")
    names = parser.parse_args(argv).names or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {BENCHMARKS}")
    began = time.perf_counter()
    verdicts: list[Verdict] = []
    for name in names:
        # Imported on demand: `startup` must not pay for the emulator and httpx.
        module = importlib.import_module(f"bench.{name}")
        verdicts.append(module.run())
    print(f"\n=== summary ({time.perf_counter() - began:.0f} s) ===")
    for verdict in verdicts:
        print(verdict.line())
    return 0 if all(verdict.met for verdict in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
