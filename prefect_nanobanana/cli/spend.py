"""The CLI's `spend` verb: billed cost by day, from an archive's ledger.

The monthly-bill check of a data team: every request a batch paid for is in the
ledger with what it was billed, so the sum by day can be laid beside RunComfy's
invoice without asking the API.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..client.pricing import daily_spend, format_usd
from .exit_codes import EXIT_OK


def run_spend_command(args: argparse.Namespace) -> int:
    from ..storage import Ledger
    from ..storage.ledger import LEDGER_PREFIX

    ledger = Ledger(args.archive)
    bills = [(entry.submitted_at, entry.cost) for entry in ledger.entries()]
    if not bills:
        # A mistyped archive would otherwise look like a month without a bill.
        print(f"No ledger entries at {ledger.backend.location(LEDGER_PREFIX)}", file=sys.stderr)
    by_day = daily_spend(bills, since=args.since)
    total = round(sum(by_day.values()), 6)
    unbilled = sum(cost is None for _, cost in bills)
    if args.json:
        days = [{"day": day.isoformat(), "billed_usd": usd} for day, usd in by_day.items()]
        print(json.dumps({"days": days, "total_billed_usd": total, "without_bill": unbilled}))
        return EXIT_OK
    print(f"{'day (UTC)':<10}  {'billed':>10}")
    for day, usd in by_day.items():
        print(f"{day.isoformat():<10}  {format_usd(usd):>10}")
    note = f" ({unbilled} ledger entries without a bill: not finished, failed or unarchived)"
    print(f"total billed {format_usd(total)}" + (note if unbilled else ""))
    return EXIT_OK
