"""The spend guard: a daily budget and a per-call confirmation threshold, in USD. No MCP in here.

A call's cost is the catalog's price per image times its images (`TaskRequest.estimated_cost_usd`).
Today's spend is not a counter kept beside the tasks but the sum of the ledger's own rows: every
task created since UTC midnight is charged from the moment it is reserved, and stops counting
once PiAPI reports it failed or cancelled (those are not billed). A create that provably never
reached PiAPI deletes its reservation, so it is given back too. The budget is checked and the
charge taken in the same SQLite write transaction (`TaskLedger.reserve`), so several processes
sharing a ledger cannot overspend together. A repeat that re-attaches creates no row: it costs
nothing and is never refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from flux_mcp.errors import BudgetExceededError

Decision = Literal["allowed", "needs_confirmation", "over_budget"]

# Prices are fractions of a cent; sums of them must not trip a limit they exactly meet.
_EPSILON = 1e-9


def day_start(now: float) -> float:
    """The POSIX time of the UTC midnight that began the day `now` falls in."""
    moment = datetime.fromtimestamp(now, UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def usd(value: float) -> str:
    return f"${value:.4f}".rstrip("0").rstrip(".") if value else "$0"


@dataclass(frozen=True)
class SpendLimit:
    """What `TaskLedger.reserve` enforces atomically: spend since `since` may not pass `budget_usd`."""

    since: float
    budget_usd: float

    def check(self, cost_usd: float, spent_usd: float) -> None:
        if spent_usd + cost_usd > self.budget_usd + _EPSILON:
            raise over_budget(cost_usd, spent_usd, self.budget_usd)


def over_budget(cost_usd: float, spent_usd: float, budget_usd: float) -> BudgetExceededError:
    return BudgetExceededError(
        f"this call costs {usd(cost_usd)}, and {usd(spent_usd)} of today's {usd(budget_usd)} budget "
        f"(FLUX_MCP_DAILY_BUDGET_USD) is already spent"
    )


@dataclass(frozen=True)
class SpendGuard:
    daily_budget_usd: float | None = None
    confirm_above_usd: float | None = None

    def limit(self, now: float) -> SpendLimit | None:
        return None if self.daily_budget_usd is None else SpendLimit(day_start(now), self.daily_budget_usd)

    def decide(self, cost_usd: float, spent_usd: float) -> Decision:
        """What a new (not re-attaching) submission of `cost_usd` would meet."""
        if self.daily_budget_usd is not None and spent_usd + cost_usd > self.daily_budget_usd + _EPSILON:
            return "over_budget"
        if self.confirm_above_usd is not None and cost_usd > self.confirm_above_usd + _EPSILON:
            return "needs_confirmation"
        return "allowed"

    def question(self, cost_usd: float, what: str) -> str:
        """The confirmation prompt shown to the user (stable across retries of the same call)."""
        return (
            f"Generate {what} for {usd(cost_usd)}? It is over the {usd(self.confirm_above_usd or 0)} per-call "
            "threshold (FLUX_MCP_CONFIRM_ABOVE_USD)."
        )
