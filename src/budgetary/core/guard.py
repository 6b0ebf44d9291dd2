"""Decisions, and the guard Protocol a host can plug in.

The budget *returns* a decision and never raises it; adapters turn a `Deny`
into `BudgetExceeded` (or a skip, or an interrupt) according to their policy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import KW_ONLY, dataclass
from decimal import Decimal
from typing import Any, ClassVar, Protocol, cast, runtime_checkable

from budgetary.core.usage import Usage

logger = logging.getLogger("budgetary")

__all__ = ["Allow", "BudgetGuard", "Decision", "Deny", "SoftLimit", "combine_guards"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Allow:
    """The call may start.

    Example:
        ```python
        if budget.check("researcher").allowed: ...
        ```
    """

    allowed: ClassVar[bool] = True
    resource: ClassVar[None] = None
    reason: ClassVar[str] = ""


@dataclass(frozen=True, slots=True)
class SoftLimit:
    """The call may start, but spend is at or above a ``warn_at`` threshold.

    Example:
        ```python
        d = budget.check("writer")
        if isinstance(d, SoftLimit):
            model = cheaper_model  # d.resource == "total_tokens", d.consumed, d.limit
        ```
    """

    allowed: ClassVar[bool] = True
    resource: str
    """The `Limits` field without ``max_``, or ``"allocation"``."""
    consumed: int | Decimal
    """What was spent on ``resource`` (dollars for ``cost_usd``)."""
    limit: int | Decimal
    """The limit on ``resource``."""
    message: str
    """A sentence for humans and logs."""
    _: KW_ONLY
    threshold: float = 0.0
    """The ``warn_at`` fraction that was reached."""
    budget: str | None = None
    """The budget (level) whose limit is near."""
    agent: str | None = None
    """The agent the decision was made for."""

    @property
    def reason(self) -> str:
        """Same as ``message``."""
        return self.message


@dataclass(frozen=True, slots=True)
class Deny:
    """The call must not start.

    Example:
        ```python
        d = budget.check("critic")
        if not d.allowed:
            print(d.resource, d.reason)
        ```
    """

    allowed: ClassVar[bool] = False
    resource: str
    """The `Limits` field without ``max_``, ``"allocation"``, ``"confidence"`` or a host guard's name."""
    reason: str
    """A sentence naming the limit, its value and what was observed."""
    _: KW_ONLY
    limit: int | Decimal | float | None = None
    spent: int | Decimal | float | None = None
    requested: int | Decimal | None = None
    budget: str | None = None
    agent: str | None = None


Decision = Allow | SoftLimit | Deny
"""What a check returns: `Allow`, `SoftLimit` (proceed, near a limit) or `Deny`."""

ALLOW = Allow()


@runtime_checkable
class BudgetGuard(Protocol):
    """A host's own rules, consulted beside the budget's.

    Every method is optional: a missing method allows (or does nothing).
    Subclass this Protocol to inherit those defaults, or pass any object with
    some of the methods. Guards must be fast and must not raise; a guard that
    raises is treated as a `Deny` (fail closed).

    Example:
        ```python
        class BusinessHours(BudgetGuard):
            def check_before_llm(self, agent, estimated_prompt_tokens):
                if is_night():
                    return Deny(resource="business_hours", reason="LLM calls are off at night")
                return Allow()

        budget = Budget(Limits(max_total_tokens=50_000), guards=[BusinessHours()])
        ```
    """

    def check_before_llm(self, agent: str | None, estimated_prompt_tokens: int) -> Decision:
        """Decide whether an LLM call for ``agent`` may start."""
        return ALLOW

    def record_after_llm(self, agent: str | None, usage: Usage) -> None:
        """Observe what a finished LLM call consumed."""
        return None

    def check_before_tool(self, agent: str | None, tool_name: str) -> Decision:
        """Decide whether ``agent`` may call ``tool_name``."""
        return ALLOW


class _AllGuards:
    """Every guard must allow; the first `Deny` wins; the first `SoftLimit` is kept."""

    __slots__ = ("guards",)

    def __init__(self, guards: Sequence[Any]) -> None:
        self.guards = tuple(guards)

    def _ask(self, method: str, *args: Any) -> Decision:
        soft: Decision = ALLOW
        for guard in self.guards:
            fn = getattr(guard, method, None)
            if fn is None:
                continue
            try:
                decision = fn(*args)
            except Exception as exc:  # a broken host guard must not let calls through silently
                return Deny(resource=type(guard).__name__, reason=f"guard {type(guard).__name__} failed: {exc!r}")
            if decision is None or isinstance(decision, Allow):
                continue
            if not isinstance(decision, (SoftLimit, Deny)):  # broken like a guard that raises: fail closed
                name = type(guard).__name__
                return Deny(resource=name, reason=f"guard {name} returned {decision!r}, not a Decision")
            if not decision.allowed:
                return cast(Decision, decision)
            if soft is ALLOW:
                soft = cast(Decision, decision)
        return soft

    def check_before_llm(self, agent: str | None, estimated_prompt_tokens: int) -> Decision:
        return self._ask("check_before_llm", agent, estimated_prompt_tokens)

    def check_before_tool(self, agent: str | None, tool_name: str) -> Decision:
        return self._ask("check_before_tool", agent, tool_name)

    def record_after_llm(self, agent: str | None, usage: Usage) -> None:
        for guard in self.guards:
            fn = getattr(guard, "record_after_llm", None)
            if fn is not None:
                try:
                    fn(agent, usage)
                except Exception:  # the call is paid for and recorded: its result must reach the caller
                    logger.exception("guard %r failed to record usage for agent %r", guard, agent)


def combine_guards(guards: Iterable[Any]) -> BudgetGuard:
    """Combine guards: every guard must allow, and the first deny wins."""
    return _AllGuards(list(guards))
