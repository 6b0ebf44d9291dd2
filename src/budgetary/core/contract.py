"""`AgentContract`: what one agent may spend and how important it is."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from budgetary.core._units import usd_to_nanos
from budgetary.core.errors import ConfigurationError, UsageError
from budgetary.core.gate import check_fraction
from budgetary.core.usage import coerce_cost, coerce_count

__all__ = ["AgentContract"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentContract:
    """An agent's contract with its budget.

    The allocation is in one unit: tokens (``max_tokens``, input + output) or
    USD (``max_cost_usd``), not both. An agent with neither draws only on the
    budget's own limits.

    Example:
        ```python
        c = budget.agent("researcher", priority=3, max_tokens=40_000, min_reserve=4_000)
        c.priority, c.max_tokens, c.min_reserve  # (3, 40000, 4000)
        ```
    """

    name: str | None
    priority: int = 1
    """Higher is more important; budget only flows from lower (or equal) to higher."""
    max_tokens: int | None = None
    """Initial allocation in tokens (input + output)."""
    max_cost_usd: Decimal | None = None
    """Initial allocation in USD."""
    min_reserve: int | Decimal | None = None
    """What reallocation never takes from this agent; default 10% of the allocation."""
    confidence_threshold: float | None = None
    """Stop the agent's calls once it reports a confidence at or above this."""

    def __post_init__(self) -> None:
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ConfigurationError(f"agent name must be a non-empty string or None, got {self.name!r}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) or self.priority < 1:
            raise ConfigurationError(f"priority must be an integer >= 1, got {self.priority!r}")
        if self.max_tokens is not None and self.max_cost_usd is not None:
            raise ConfigurationError(
                f"agent {self.name!r}: give max_tokens or max_cost_usd, not both (one allocation unit)"
            )
        try:
            if self.max_tokens is not None:
                object.__setattr__(self, "max_tokens", coerce_count(self.max_tokens, "max_tokens"))
            if self.max_cost_usd is not None:
                object.__setattr__(self, "max_cost_usd", coerce_cost(self.max_cost_usd, "max_cost_usd"))
        except UsageError as exc:
            raise ConfigurationError(f"agent {self.name!r}: {exc}") from None
        allocation = self.allocation
        if allocation is None:
            if self.min_reserve not in (None, 0):
                raise ConfigurationError(f"agent {self.name!r}: min_reserve needs an allocation")
            object.__setattr__(self, "min_reserve", None)
        elif self.min_reserve is None:
            default: Any = allocation // 10 if isinstance(allocation, int) else allocation / 10
            object.__setattr__(self, "min_reserve", default)
        else:
            reserve = self._in_unit(self.min_reserve)
            if not 0 <= reserve <= allocation:
                raise ConfigurationError(
                    f"agent {self.name!r}: min_reserve must be between 0 and the allocation "
                    f"({allocation}), got {self.min_reserve!r}"
                )
            object.__setattr__(self, "min_reserve", reserve)
        if self.confidence_threshold is not None:
            object.__setattr__(
                self, "confidence_threshold", check_fraction(self.confidence_threshold, "confidence_threshold")
            )

    def _in_unit(self, value: Any) -> int | Decimal:
        try:
            if self.max_tokens is not None:
                return coerce_count(value, "min_reserve")
            reserve = coerce_cost(value, "min_reserve")
            assert reserve is not None  # None was handled by the caller
            return reserve
        except UsageError as exc:
            raise ConfigurationError(f"agent {self.name!r}: {exc}") from None

    @property
    def unit(self) -> str | None:
        """``"tokens"``, ``"usd"`` or ``None`` (no allocation)."""
        if self.max_tokens is not None:
            return "tokens"
        if self.max_cost_usd is not None:
            return "usd"
        return None

    @property
    def allocation(self) -> int | Decimal | None:
        """The initial allocation in the contract's unit."""
        return self.max_tokens if self.max_tokens is not None else self.max_cost_usd

    def store_units(self) -> tuple[int | None, int]:
        """(allocation, min_reserve) in store units (tokens or nano-dollars)."""
        if self.max_tokens is not None:
            return self.max_tokens, int(self.min_reserve or 0)
        if self.max_cost_usd is not None:
            return usd_to_nanos(self.max_cost_usd), usd_to_nanos(Decimal(self.min_reserve or 0))
        return None, 0
