"""`Limits`: the caps one budget enforces."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from decimal import Decimal
from typing import Any

from budgetary.core._units import DIMENSIONS, MAX_INT, sat, usd_to_nanos
from budgetary.core.errors import ConfigurationError, UsageError
from budgetary.core.usage import coerce_cost, coerce_count

__all__ = ["Limits", "parse_window"]

_WINDOW = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_WINDOW_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(window: str | None) -> int | None:
    """Return the length of a window such as ``"1h"``, ``"1d"`` or ``"30d"`` in seconds."""
    if window is None:
        return None
    match = _WINDOW.match(window) if isinstance(window, str) else None
    if match is None or int(match.group(1)) == 0:
        raise ConfigurationError(f"window must look like '30s', '15m', '1h', '1d' or '30d', got {window!r}")
    return int(match.group(1)) * _WINDOW_SECONDS[match.group(2)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Caps on one budget; ``None`` means no limit on that dimension.

    A limit is exhausted when spent >= limit; a request is refused when
    spent + held + requested would pass it, so ``max_llm_calls=3`` allows
    exactly three calls.

    Example:
        ```python
        Limits(max_total_tokens=100_000, max_cost_usd="2.50", max_llm_calls=40, warn_at=(0.5, 0.8))
        ```
    """

    max_input_tokens: int | None = None
    """Cap on prompt tokens (cached ones included)."""
    max_output_tokens: int | None = None
    """Cap on completion tokens (reasoning included)."""
    max_total_tokens: int | None = None
    """Cap on input + output tokens."""
    max_cost_usd: Decimal | None = None
    """Cap on spend in USD (exact `Decimal`; ints, floats and strings are converted)."""
    max_llm_calls: int | None = None
    """Cap on LLM calls; gates only LLM calls."""
    max_tool_calls: int | None = None
    """Cap on tool calls; gates only tool calls."""
    max_agents: int | None = None
    """Cap on agent starts (LangGraph node executions, CrewAI task starts, `begin_agent`)."""
    warn_at: tuple[float, ...] = (0.8,)
    """Fractions of each limit at which a `SoftLimit` is reported (once per crossing)."""
    window: str | None = None
    """Reset counters at UTC window boundaries (``"1h"``, ``"1d"``, ``"30d"``); ``None`` never resets."""

    def __post_init__(self) -> None:
        for f in fields(self):
            name = f.name
            value = getattr(self, name)
            if name == "max_cost_usd":
                try:
                    object.__setattr__(self, name, coerce_cost(value, name))
                except UsageError as exc:
                    raise ConfigurationError(str(exc)) from None
            elif name.startswith("max_") and value is not None:
                try:
                    object.__setattr__(self, name, coerce_count(value, name, count_unit(name)))
                except UsageError as exc:
                    raise ConfigurationError(str(exc)) from None
        warn_at = self.warn_at
        if isinstance(warn_at, (int, float)) and not isinstance(warn_at, bool):
            warn_at = (warn_at,)
        try:
            thresholds = tuple(sorted({float(w) for w in (warn_at or ())}))
        except (TypeError, ValueError):
            raise ConfigurationError(f"warn_at must be fractions in (0, 1), got {self.warn_at!r}") from None
        if any(not 0 < w < 1 for w in thresholds):
            raise ConfigurationError(f"warn_at must be fractions in (0, 1), got {self.warn_at!r}")
        object.__setattr__(self, "warn_at", thresholds)
        parse_window(self.window)

    @property
    def unbounded(self) -> bool:
        """True when no dimension has a limit."""
        return all(getattr(self, "max_" + d) is None for d in DIMENSIONS)

    @property
    def window_seconds(self) -> int | None:
        """The window length in seconds, or ``None``."""
        return parse_window(self.window)

    def topped_up(self, **amounts: Any) -> Limits:
        """Return limits raised by ``amounts`` (``total_tokens=5000, cost_usd=1, llm_calls=2``).

        A dimension without a limit stays unlimited.
        """
        changes: dict[str, Any] = {}
        for name, amount in amounts.items():
            field_name = "max_" + name
            if name not in DIMENSIONS:
                raise ConfigurationError(f"cannot top up {name!r}; known resources: {', '.join(DIMENSIONS)}")
            current = getattr(self, field_name)
            if name == "cost_usd":
                add = coerce_cost(amount, name)
                if current is not None and add is not None:
                    changes[field_name] = current + add
            else:
                add_int = coerce_count(amount, name, count_unit(name))
                if current is not None:
                    changes[field_name] = sat(current + add_int)
        return replace(self, **changes)

    def as_vector(self) -> list[int | None]:
        """Limits in store units (cost in nano-dollars), in `DIMENSIONS` order."""
        out: list[int | None] = []
        for name in DIMENSIONS:
            value = getattr(self, "max_" + name)
            if value is None:
                out.append(None)
            elif name == "cost_usd":
                out.append(usd_to_nanos(value))
            else:
                out.append(min(value, MAX_INT))
        return out


def count_unit(name: str) -> str:
    """What a count limit or resource counts (``max_llm_calls``/``llm_calls``: calls), for error messages."""
    name = name.removeprefix("max_")
    return "agents" if name == "agents" else "calls" if name.endswith("_calls") else "tokens"
