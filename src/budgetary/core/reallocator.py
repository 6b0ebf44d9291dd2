"""Move unused allocation from less important agents to a needy one.

Pure planning, no I/O: stores call `plan_transfers` while they hold their lock
(or transaction) and apply the plan only when the whole operation succeeds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["DonorView", "plan_transfers"]


@dataclass(frozen=True, slots=True)
class DonorView:
    """What the planner needs to know about one agent with an allocation."""

    name: str | None
    priority: int
    remaining: int
    """Allocation minus consumed minus held, in the contract's unit (store units)."""
    min_reserve: int


def plan_transfers(
    candidates: Iterable[DonorView], *, needy: str | None, priority: int, shortfall: int
) -> list[tuple[str | None, int]]:
    """Plan transfers that cover up to ``shortfall`` for ``needy``.

    Rules: never the needy agent itself; only donors whose priority is <= the
    needy agent's; a donor gives at most ``remaining - min_reserve`` and only
    if that is > 0; the lowest priority is drained first and, among equals,
    the one with the most remaining (then by name, so plans are deterministic).
    Returns ``[(donor, amount), ...]`` whose amounts sum to at most ``shortfall``.
    """
    if shortfall <= 0:
        return []
    donors = [d for d in candidates if d.name != needy and d.priority <= priority and d.remaining - d.min_reserve > 0]
    donors.sort(key=lambda d: (d.priority, -d.remaining, "" if d.name is None else d.name))
    plan: list[tuple[str | None, int]] = []
    missing = shortfall
    for donor in donors:
        take = min(donor.remaining - donor.min_reserve, missing)
        plan.append((donor.name, take))
        missing -= take
        if missing == 0:
            break
    return plan
