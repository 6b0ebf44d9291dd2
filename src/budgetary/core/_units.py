"""Integer units shared by the engine and every store.

Money is kept as integer nano-dollars in stores (exact, and Redis/SQLite
integers are 64-bit), and as `Decimal` in the public API. Conversions round
up so that the budget never under-counts.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

MAX_INT = 2**63 - 1
"""Every counter saturates here: a budget hit by an absurd report is simply exhausted."""

NANOS_PER_USD = 1_000_000_000
_NANOS = Decimal(NANOS_PER_USD)

# Counter dimensions, in the order every vector uses. A limit's resource name is
# `DIMENSIONS[i]`; the `Limits` field is "max_" + that name.
DIMENSIONS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost_usd",
    "llm_calls",
    "tool_calls",
    "agents",
)
IN, OUT, TOTAL, COST, LLM, TOOL, AGENTS = range(7)
SPEND_DIMS = (IN, OUT, TOTAL, COST)
COUNT_DIMS = (LLM, TOOL, AGENTS)


def sat(value: int) -> int:
    """Clamp a non-negative integer to the store's range."""
    return value if value <= MAX_INT else MAX_INT


def usd_to_nanos(value: Decimal) -> int:
    """Convert dollars to nano-dollars, rounding up."""
    return sat(int((value * _NANOS).to_integral_value(rounding=ROUND_CEILING)))


def nanos_to_usd(value: int) -> Decimal:
    """Convert nano-dollars to dollars (exact)."""
    return Decimal(value) / _NANOS
