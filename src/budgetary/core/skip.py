"""The skip marker: what takes the place of work the budget skipped."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SKIP_ATTRIBUTE", "Skipped", "is_budget_skipped", "mark_skipped"]

SKIP_ATTRIBUTE = "__budget_skipped__"
"""Attribute (or mapping key) under which adapters attach a `Skipped` to a framework object."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Skipped:
    """Marks a node, task or agent that did not run because of the budget.

    Detect it with `is_budget_skipped`, never by matching strings.

    Example:
        ```python
        result = governed_summary(text)
        if is_budget_skipped(result):
            print("summary skipped:", result.reason)
        ```
    """

    agent: str | None = None
    """The agent whose work was skipped; ``None`` is the run."""
    reason: str = ""
    """Why: the refusal's message."""
    resource: str | None = None
    """The resource that ran out, as in `Deny.resource`."""
    location: str | None = None
    """The node, task or function that was skipped."""

    def __bool__(self) -> bool:
        # A skipped result is "nothing": `if result:` treats it like an empty answer.
        return False

    def __str__(self) -> str:
        where = f" {self.location!r}" if self.location else ""
        return f"[skipped{where} by budget: {self.reason}]"


def mark_skipped(obj: Any, marker: Skipped) -> Any:
    """Attach ``marker`` to ``obj`` (a dict or an object accepting attributes) and return ``obj``."""
    if isinstance(obj, dict):
        obj[SKIP_ATTRIBUTE] = marker
    else:
        object.__setattr__(obj, SKIP_ATTRIBUTE, marker)
    return obj


def is_budget_skipped(value: Any) -> bool:
    """True if ``value`` is a `Skipped` marker or carries one (see `mark_skipped`)."""
    if isinstance(value, Skipped):
        return True
    if isinstance(value, Mapping):
        return isinstance(value.get(SKIP_ATTRIBUTE), Skipped)
    return isinstance(getattr(value, SKIP_ATTRIBUTE, None), Skipped)
