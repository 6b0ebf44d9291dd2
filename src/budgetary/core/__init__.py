"""The framework-neutral core: budget, limits, usage, ledger, reallocator, guard, gates, stores."""

from __future__ import annotations

from budgetary.core.budget import Budget, Reservation
from budgetary.core.contract import AgentContract
from budgetary.core.errors import (
    BudgetError,
    BudgetExceeded,
    ConfigurationError,
    StoreError,
    UnknownAgent,
    UsageError,
)
from budgetary.core.gate import ConfidenceGate
from budgetary.core.guard import Allow, BudgetGuard, Decision, Deny, SoftLimit
from budgetary.core.ledger import LedgerEntry
from budgetary.core.limits import Limits
from budgetary.core.prices import Price
from budgetary.core.skip import Skipped, is_budget_skipped
from budgetary.core.snapshot import Snapshot
from budgetary.core.usage import Usage

__all__ = [
    "AgentContract",
    "Allow",
    "Budget",
    "BudgetError",
    "BudgetExceeded",
    "BudgetGuard",
    "ConfidenceGate",
    "ConfigurationError",
    "Decision",
    "Deny",
    "LedgerEntry",
    "Limits",
    "Price",
    "Reservation",
    "Skipped",
    "Snapshot",
    "SoftLimit",
    "StoreError",
    "UnknownAgent",
    "Usage",
    "UsageError",
    "is_budget_skipped",
]
