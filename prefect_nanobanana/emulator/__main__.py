"""`nanobanana emulator`: serve the emulator, in the foreground or in the background.

In the foreground it prints `export` lines (the base URL, the token and the
polling time scale, as the client reads them) that a person pastes into another
shell, then serves until Ctrl-C. With `--print-env` it starts the emulator in
the background, prints only the `export` lines (plus the process id to stop it)
and returns, so `eval "$(nanobanana emulator --print-env)"` sets up the current
shell: a foreground server would keep the command substitution open forever.
`python -m prefect_nanobanana.emulator` is the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from .config import DEFAULT_PRICE_PER_IMAGE_USD, EmulatorConfig
from .faults import FaultPlan
from .server import EmulatorServer

DEFAULT_TOKEN = "emulator-token"
PID_ENV = "NANOBANANA_EMULATOR_PID"
# The background child's first stdout line, read by the parent that started it.
_READY_PREFIX = "nanobanana-emulator-ready "


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanobanana emulator",
        description="Serve a RunComfy Model API emulator (google/nano-banana/pro/edit) on "
        "loopback, for offline work: no account, no cost, outputs made from your input.",
        epilog='Background use: eval "$(nanobanana emulator --print-env)" starts it and '
        f"exports RUNCOMFY_BASE_URL, RUNCOMFY_API_TOKEN and {PID_ENV}; "
        f"stop it with kill ${PID_ENV}.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=_port, default=8765, help="0 picks a free port (default: %(default)s)"
    )
    parser.add_argument(
        "--token",
        action="append",
        dest="tokens",
        metavar="TOKEN",
        help=f"accepted API token; repeat for several (default: {DEFAULT_TOKEN})",
    )
    parser.add_argument(
        "--workers", type=int, default=4, help="jobs run at once (default: %(default)s)"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiplies the realistic job durations, e.g. 0.1 (default: %(default)s)",
    )
    parser.add_argument(
        "--fixed-duration", type=float, metavar="SECONDS", help="every job runs this long"
    )
    parser.add_argument("--seed", type=int, help="seed for durations and probabilistic faults")
    parser.add_argument(
        "--balance", type=float, metavar="USD", help="account balance (default: unlimited)"
    )
    parser.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="RESOLUTION=USD",
        help="listed price per image of a resolution, e.g. 4K=0.30; repeat for several "
        "(default: 1K=0.15, 2K=0.15, 4K=0.30)",
    )
    parser.add_argument(
        "--bill-multiplier",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="bill this many times the listed price, e.g. 2.0 (default: %(default)s)",
    )
    parser.add_argument(
        "--output-ttl", type=float, metavar="SECONDS", help="results and files expire after this"
    )
    parser.add_argument(
        "--output-min-bytes", type=int, default=0, help="pad every output to this size"
    )
    parser.add_argument(
        "--auth-errors-as-http-200",
        action="store_true",
        help="answer token errors with HTTP 200 and error_code 400004, as some real answers do",
    )
    parser.add_argument(
        "--faults",
        default="",
        metavar="SPEC",
        help="faults to inject, e.g. 'submit:rate_limit@1:retry_after=0.5,job:fail_job@p=0.1' "
        "(syntax: see prefect_nanobanana.emulator.faults)",
    )
    parser.add_argument(
        "--print-env",
        action="store_true",
        help="start in the background, print only `export` lines for eval, and return",
    )
    parser.add_argument(
        "--log-file",
        metavar="PATH",
        help="with --print-env: where the background emulator writes its output "
        "(default: a file in the temporary folder, named in the printed lines)",
    )
    # The background process started by --print-env: announce readiness on stdout, then serve.
    parser.add_argument("--background-child", action="store_true", help=argparse.SUPPRESS)
    return parser


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port (0-65535): {text!r}")
    return port


def parse_prices(specs: Sequence[str]) -> dict[str, float]:
    """`["4K=0.5"]` over the default listed prices; a ValueError names a bad spec."""
    prices = dict(DEFAULT_PRICE_PER_IMAGE_USD)
    for spec in specs:
        resolution, separator, usd = spec.partition("=")
        resolution = resolution.strip().upper()
        if not separator or resolution not in prices:
            raise ValueError(f"--price {spec!r}: expected RESOLUTION=USD with 1K, 2K or 4K")
        try:
            prices[resolution] = float(usd)
        except ValueError:
            raise ValueError(f"--price {spec!r}: {usd!r} is not a number") from None
        if prices[resolution] < 0:
            raise ValueError(f"--price {spec!r}: a price must not be negative")
    return prices


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until interrupted (0), or start in the background (--print-env); 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    tokens = tuple(args.tokens or (DEFAULT_TOKEN,))
    try:
        config = EmulatorConfig(
            api_tokens=tokens,
            workers=args.workers,
            time_scale=args.time_scale,
            fixed_duration_seconds=args.fixed_duration,
            seed=args.seed,
            balance_usd=args.balance,
            price_per_image_usd=parse_prices(args.price),
            bill_multiplier=args.bill_multiplier,
            output_ttl_seconds=args.output_ttl,
            output_min_bytes=args.output_min_bytes,
            auth_errors_as_http_200=args.auth_errors_as_http_200,
            faults=FaultPlan.parse(args.faults),
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.print_env:
        return _start_in_background(list(argv if argv is not None else sys.argv[1:]), args)
    try:
        emulator = EmulatorServer(config, host=args.host, port=args.port).start()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        print("Pick another port with --port (0 picks a free one).", file=sys.stderr)
        return 1
    try:
        env = environment(emulator.base_url, tokens[0], config)
        if args.background_child:
            print(_READY_PREFIX + json.dumps(env), flush=True)
            _detach_stdout(args.log_file)
        else:
            print(f"RunComfy emulator listening on {emulator.base_url}")
            print("# paste into the shell that runs nanobanana (or use --print-env):")
            print(export_lines(env))
            if config.bill_multiplier != 1.0:
                print(f"# bills {config.bill_multiplier:g}x the listed prices")
            if config.faults.faults:
                print(f"# faults: {config.faults.to_spec()}")
            print("Press Ctrl-C to stop.", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        print("Stopping the emulator.", flush=True)
    finally:
        emulator.stop()
    return 0


def environment(base_url: str, token: str, config: EmulatorConfig) -> dict[str, str]:
    """The variables that point the client (and so the CLI and the flows) at this emulator."""
    env = {"RUNCOMFY_BASE_URL": base_url, "RUNCOMFY_API_TOKEN": token}
    if config.fixed_duration_seconds is None and config.time_scale != 1.0:
        # The client's polling schedule expects real run times unless told otherwise.
        env["RUNCOMFY_POLL_TIME_SCALE"] = f"{config.time_scale:g}"
    return env


def export_lines(env: dict[str, str]) -> str:
    """`export NAME=value` lines, quoted for a POSIX shell."""
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items())


def _start_in_background(argv: list[str], args: argparse.Namespace) -> int:
    """Start this command again as a detached process and print its environment for eval.

    The child reports its base URL on a pipe once it listens (so the printed URL
    is one that answers), then moves its output to the log file; the parent
    returns at once. A child that fails (port taken) says why in the log, which
    is shown here.
    """
    log_path = Path(args.log_file or Path(tempfile.gettempdir()) / "nanobanana-emulator.log")
    child_argv = [arg for arg in argv if arg != "--print-env"]
    if not any(arg == "--log-file" or arg.startswith("--log-file=") for arg in child_argv):
        child_argv += ["--log-file", str(log_path)]
    command = [sys.executable, "-m", "prefect_nanobanana.emulator", *child_argv]
    try:
        log = log_path.open("ab")
    except OSError as exc:
        print(f"error: cannot write the log file {log_path}: {exc.strerror}", file=sys.stderr)
        print("Pick another one with --log-file.", file=sys.stderr)
        return 1
    with log:
        log_start = log.tell()  # the log is appended to: show only what this child wrote
        child = subprocess.Popen(
            [*command, "--background-child"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # Ctrl-C in this terminal must not stop it
            text=True,
        )
    assert child.stdout is not None
    with child.stdout:
        ready = child.stdout.readline()
    if not ready.startswith(_READY_PREFIX):
        child.wait()
        with log_path.open("rb") as log:
            log.seek(log_start)
            reason = log.read().decode(errors="replace").strip().splitlines()
        print(f"error: the emulator did not start (log: {log_path})", file=sys.stderr)
        for line in reason[-5:]:
            print(f"  {line}", file=sys.stderr)
        return 1
    env = json.loads(ready[len(_READY_PREFIX) :])
    env[PID_ENV] = str(child.pid)
    print(export_lines(env))
    print(f"# emulator on {env['RUNCOMFY_BASE_URL']}, pid {child.pid}, log {log_path}")
    print(f"# stop it with: kill ${PID_ENV}", flush=True)
    return 0


def _detach_stdout(log_file: str | None) -> None:
    """Point stdout at the log: the parent stops reading the pipe once it has the ready line."""
    target = os.open(log_file or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    os.dup2(target, sys.stdout.fileno())
    os.close(target)


if __name__ == "__main__":
    sys.exit(main())
