"""Pieces the framework adapters share: a budget's identity across objects, applying a resume's top-up once."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from budgetary.core.budget import Budget
from budgetary.core.errors import ConfigurationError, UsageError

__all__ = ["apply_top_up_once", "budget_key"]


def apply_top_up_once(budget: Budget, resume: Any, key: tuple[str, int | str]) -> bool:
    """Apply ``resume`` (``top_up`` keywords, e.g. ``{"total_tokens": 5000}``) to ``budget`` once per ``key``.

    LangGraph hands the same resume value back every time an interrupted node
    re-runs, in whichever process resumes the run; ``key`` (the task's checkpoint
    namespace and where the interrupt is in the node) tells a replay from a new
    resume, and the store remembers it (`Budget.top_up`'s ``once``), so a replay in
    another worker is not applied again. Returns True if applied now. An empty
    mapping (a top-up made elsewhere) applies nothing.
    """
    if resume is None:
        return False
    marker = f"resume:{key[0]}:{key[1]}"
    amounts = dict(resume) if isinstance(resume, Mapping) else None
    if amounts is None or not all(isinstance(name, str) for name in amounts) or "once" in amounts:
        # Marked all the same: LangGraph replays this answer on every later resume of the task, so a bad
        # one is refused once; the interrupt that follows takes the next answer.
        if budget.top_up(once=marker):
            raise UsageError(
                f"resume a budget interrupt with top_up keywords, e.g. {{'total_tokens': 5000}}; got {resume!r}. "
                "Resume again with a mapping."
            )
        return False
    try:
        return budget.top_up(once=marker, **amounts)
    except (ConfigurationError, UsageError):  # an unknown resource or a bad amount: refused once, like a bad answer
        if budget.top_up(once=marker):
            raise
        return False


def budget_key(budget: Budget) -> tuple[Hashable, ...]:
    """What names ``budget`` across its objects: its store's URL (or the store itself, in memory) and its path.

    A process that builds its budgets by name on a shared store may hold several objects of one budget.
    """
    store = budget.store
    url = getattr(store, "url", None)
    where = url if isinstance(url, str) and not url.startswith("memory:") else id(store)
    names = []
    node: Budget | None = budget
    while node is not None:
        names.append(node.name)
        node = node.parent
    return where, *names
