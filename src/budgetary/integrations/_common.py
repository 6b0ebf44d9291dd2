"""Pieces the framework adapters share: a budget's identity across objects, applying a resume's top-up once."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping
from typing import Any

from budgetary.core.budget import Budget
from budgetary.core.errors import UsageError

__all__ = ["apply_top_up_once", "budget_key"]

_applied: set[tuple[Hashable, ...]] = set()
_lock = threading.Lock()


def apply_top_up_once(budget: Budget, resume: Any, key: Hashable) -> bool:
    """Apply ``resume`` (``top_up`` keywords, e.g. ``{"total_tokens": 5000}``) to ``budget`` once per ``key``.

    LangGraph hands the same resume value back every time an interrupted node
    re-runs; ``key`` (the task's checkpoint namespace and the interrupt's index
    in the node) tells a replay from a new resume. Returns True if applied now.
    An empty mapping (a top-up made elsewhere) applies nothing.
    """
    if resume is None:
        return False
    with _lock:
        # The budget by its store and names, not by object: a process that builds its budgets by name
        # (per request, as with a shared store) resumes with another object of the same budget.
        marker = (*budget_key(budget), key)
        if marker in _applied:
            return False
        # Marked before it is checked: LangGraph replays this answer on every later resume of the
        # task, so a bad one is refused once; the interrupt that follows takes the next answer.
        _applied.add(marker)
    if not isinstance(resume, Mapping):
        raise UsageError(
            f"resume a budget interrupt with top_up keywords, e.g. {{'total_tokens': 5000}}; got {resume!r}. "
            "Resume again with a mapping."
        )
    if resume:
        budget.top_up(**dict(resume))
    return True


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
