"""budgetary: enforced token and cost budgets for multi-agent LLM applications.

The core names are here; framework adapters are imported by path and never
from this module (``from budgetary.integrations.langchain import BudgetCallbackHandler``),
so ``import budgetary`` loads no framework.
"""

from __future__ import annotations

from budgetary.core import (
    AgentContract,
    Allow,
    Budget,
    BudgetError,
    BudgetExceeded,
    BudgetGuard,
    ConfidenceGate,
    ConfigurationError,
    Decision,
    Deny,
    LedgerEntry,
    Limits,
    Price,
    Reservation,
    Skipped,
    Snapshot,
    SoftLimit,
    StoreError,
    UnknownAgent,
    Usage,
    UsageError,
    is_budget_skipped,
)

__version__ = "0.1.0"

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
