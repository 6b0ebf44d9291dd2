"""`Snapshot`: a budget's figures at one moment."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from budgetary.core.limits import Limits

__all__ = ["Snapshot"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """What a budget has spent and holds, against its limits.

    Example:
        ```python
        s = budget.snapshot()
        print(f"{s.total_tokens}/{s.limits.max_total_tokens} tokens, ${s.cost_usd}, exhausted={s.exhausted}")
        ```
    """

    budget: str
    """The budget's name."""
    limits: Limits
    """The limits in force (after any `top_up`)."""
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    """Known spend in USD; calls of unpriced models add nothing here (see ``unpriced_calls``)."""
    llm_calls: int = 0
    tool_calls: int = 0
    agents_started: int = 0
    unpriced_calls: int = 0
    """LLM calls whose model had no known price: their cost is unknown, not zero."""
    held_tokens: int = 0
    """Tokens held by calls in flight (reserve mode)."""
    held_cost_usd: Decimal = Decimal(0)
    held_llm_calls: int = 0
    exhausted_resources: tuple[str, ...] = ()
    """Spend resources (``total_tokens``, ``cost_usd``, ...) whose limit is reached."""
    window_resets_at: float | None = None
    """When the window's counters reset (epoch seconds), for windowed limits."""
    parent: Snapshot | None = None
    """The parent budget's snapshot, if any."""

    @property
    def exhausted(self) -> bool:
        """True when a spend limit (tokens or cost) is reached: no new LLM call or agent starts."""
        return bool(self.exhausted_resources)
