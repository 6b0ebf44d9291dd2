"""Every exception budgetary raises.

The tree::

    BudgetError
     ├── ConfigurationError (ValueError)   bad limits, contracts, store URLs, prices
     ├── UsageError (ValueError)           a caller passed a bad value (negative tokens, NaN, ...)
     │    └── (also TypeError)             ... of the wrong type (an agent or tool name that is no string)
     ├── UnknownAgent (KeyError)           an agent name that was never registered
     ├── StoreError                        the storage backend failed
     └── BudgetExceeded (RuntimeError)     a call was refused by the budget

`BudgetExceeded` is a `RuntimeError` on purpose: LangGraph's default retry
policy retries unknown `Exception` subclasses but not `RuntimeError`, and a
denial must never be retried.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from budgetary.core.snapshot import Snapshot

__all__ = [
    "BudgetError",
    "BudgetExceeded",
    "ConfigurationError",
    "StoreError",
    "UnknownAgent",
    "UsageError",
]


class BudgetError(Exception):
    """Root of every budgetary exception."""


class ConfigurationError(BudgetError, ValueError):
    """Invalid limits, contracts, prices or store settings."""


class UsageError(BudgetError, ValueError):
    """A caller passed a bad value; the message names the field."""


class _UsageTypeError(UsageError, TypeError):
    """A caller passed a value of the wrong type (an agent or tool name that is not a string).

    Both a `UsageError`, like every bad argument budgetary refuses, and the `TypeError`
    Python code expects for a wrong type: either ``except`` catches it.
    """


class UnknownAgent(BudgetError, KeyError):
    """An agent name that was never registered with the budget."""

    def __init__(self, agent: str, budget: str) -> None:
        super().__init__(agent, budget)
        self.agent = agent
        self.budget = budget

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the args; give a sentence instead.
        return (
            f"agent {self.agent!r} is not registered with budget {self.budget!r}; "
            f"register it with budget.agent({self.agent!r}, ...)"
        )


class StoreError(BudgetError):
    """The storage backend failed (connection, schema, script)."""


class _BudgetMissing(StoreError, KeyError):
    """The store has no state for a budget it was asked about.

    A `StoreError` for the application (a `Budget` whose state is gone: a Redis server restarted
    without persistence, a flushed or evicted key, a replaced file) and a `KeyError` for the
    store protocol's readers (the CLI's "no budget" message).
    """

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the key; give a sentence instead.
        return (
            f"budget {self.key} is not in the store: its state was lost (a Redis server restarted "
            "without persistence, a flushed or evicted key, a deleted database file) or it was never "
            "built there; building the Budget again starts it from zero"
        )


class BudgetExceeded(BudgetError, RuntimeError):
    """A call was refused because it would pass a limit.

    Attributes carry what was refused and why; ``snapshot`` holds the budget's
    figures at the moment of the refusal.

    Example:
        ```python
        try:
            chain.invoke(question, config={"callbacks": [handler]})
        except BudgetExceeded as exc:
            print(exc.resource, exc.limit, exc.spent, exc.requested)
        ```
    """

    def __init__(
        self,
        message: str,
        *,
        budget: str,
        agent: str | None = None,
        resource: str,
        limit: Any = None,
        spent: Any = None,
        requested: Any = None,
        snapshot: Snapshot | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.budget = budget
        """Name of the budget (level) that refused."""
        self.agent = agent
        """The agent the call was made for; ``None`` is the run itself."""
        self.resource = resource
        """The `Limits` field without ``max_``, ``"allocation"`` or ``"confidence"``."""
        self.limit = limit
        self.spent = spent
        self.requested = requested
        self.snapshot = snapshot

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_exceeded,
            (
                self.message,
                {
                    "budget": self.budget,
                    "agent": self.agent,
                    "resource": self.resource,
                    "limit": self.limit,
                    "spent": self.spent,
                    "requested": self.requested,
                    "snapshot": self.snapshot,
                },
            ),
        )


def _rebuild_exceeded(message: str, fields: dict[str, Any]) -> BudgetExceeded:
    return BudgetExceeded(message, **fields)
