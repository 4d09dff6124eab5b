"""Run the emulator in the foreground: `python -m prefect_nanobanana.emulator --port 8765`.

Prints the base URL and the token (as environment variables the client reads)
and serves until Ctrl-C. `nanobanana emulator` calls `main` with its arguments.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence

from .config import DEFAULT_PRICE_PER_IMAGE_USD, EmulatorConfig
from .faults import FaultPlan
from .server import EmulatorServer

DEFAULT_TOKEN = "emulator-token"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m prefect_nanobanana.emulator",
        description="Serve a RunComfy Model API emulator (google/nano-banana/pro/edit).",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8765, help="0 picks a free port (default: %(default)s)"
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
    return parser


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
    """Serve until interrupted; 0 on Ctrl-C, 2 on bad arguments (argparse's convention)."""
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
    with EmulatorServer(config, host=args.host, port=args.port) as emulator:
        lines = [
            f"RunComfy emulator listening on {emulator.base_url}",
            f"  RUNCOMFY_BASE_URL={emulator.base_url}",
            f"  RUNCOMFY_API_TOKEN={tokens[0]}",
        ]
        if args.fixed_duration is None and args.time_scale != 1.0:
            # The client's polling schedule expects real run times unless told otherwise.
            lines.append(f"  RUNCOMFY_POLL_TIME_SCALE={args.time_scale:g}")
        if config.bill_multiplier != 1.0:
            lines.append(f"  bills {config.bill_multiplier:g}x the listed prices")
        if config.faults.faults:
            lines.append(f"  faults: {config.faults.to_spec()}")
        lines.append("Press Ctrl-C to stop.")
        print("\n".join(lines), flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("Stopping the emulator.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
