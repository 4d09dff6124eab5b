"""The CLI's `spend` verb: billed cost by day, from an archive's ledger.

The monthly-bill check of a data team: every request a batch paid for is in the
ledger with what it was billed, so the sum by day can be laid beside RunComfy's
invoice without asking the API. Beside each day's bills, the day's running total
against the shared daily cap (`daily_budget_usd`), when runs on this archive kept one.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..client.pricing import daily_spend, format_usd
from .exit_codes import EXIT_OK


def run_spend_command(args: argparse.Namespace) -> int:
    from ..storage import Ledger, daily_totals
    from ..storage.ledger import LEDGER_PREFIX

    ledger = Ledger(args.archive)
    bills = [(entry.submitted_at, entry.cost) for entry in ledger.entries()]
    if not bills:
        # A mistyped archive would otherwise look like a month without a bill.
        print(f"No ledger entries at {ledger.backend.location(LEDGER_PREFIX)}", file=sys.stderr)
    by_day = daily_spend(bills, since=args.since)
    budgets = daily_totals(args.archive, since=args.since)
    total = round(sum(by_day.values()), 6)
    unbilled = sum(cost is None for _, cost in bills)
    days = sorted(set(by_day) | set(budgets))
    if args.json:
        rows = []
        for day in days:
            budget = budgets.get(day)
            rows.append(
                {
                    "day": day.isoformat(),
                    "billed_usd": by_day.get(day, 0.0),
                    # The shared daily cap's running total: settled plus in flight.
                    "budget_total_usd": budget.total_usd if budget else None,
                    "budget_in_flight_usd": budget.in_flight_usd if budget else None,
                    "daily_budget_usd": budget.cap_usd if budget else None,
                }
            )
        print(json.dumps({"days": rows, "total_billed_usd": total, "without_bill": unbilled}))
        return EXIT_OK
    print(f"{'day (UTC)':<10}  {'billed':>10}  daily budget")
    for day in days:
        budget = budgets.get(day)
        against = "-"
        if budget is not None and budget.cap_usd is not None:
            against = f"{format_usd(budget.total_usd)} of {format_usd(budget.cap_usd)}"
            if budget.in_flight:
                against += f" ({format_usd(budget.in_flight_usd)} in flight)"
        print(f"{day.isoformat():<10}  {format_usd(by_day.get(day, 0.0)):>10}  {against}")
    note = f" ({unbilled} ledger entries without a bill: not finished, failed or unarchived)"
    print(f"total billed {format_usd(total)}" + (note if unbilled else ""))
    return EXIT_OK
