"""Prices: what a call costs, from the genai-prices table or the user's own.

A model's rates are resolved once per (provider, model) and cached as
integers (femto-dollars per token), so pricing a call is a few integer
multiplications. Models whose price depends on prompt length keep their tiers
and the tier is picked per call. Cached-input, cache-write and reasoning
tokens use their own price when the table lists one, and a per-request fee is
charged once per call. Costs round up to whole nano-dollars.
"""

from __future__ import annotations

import functools
import re
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from typing import Any

from budgetary.core._units import usd_to_nanos
from budgetary.core.errors import ConfigurationError, UsageError
from budgetary.core.usage import Usage, coerce_cost

__all__ = ["Price", "PriceTable", "UnpricedModelWarning"]

_FEMTO_PER_MTOK = 10**9  # $1 per million tokens = 1e9 femto-dollars per token
_FEMTO_PER_NANO = 10**6


class UnpricedModelWarning(UserWarning):
    """Usage of a model with no known price was recorded with its cost unknown."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Price:
    """A model's price in USD per million tokens.

    Example:
        ```python
        Budget(limits, prices={"my-finetune": Price(input_mtok="0.30", output_mtok="1.20")})
        ```
    """

    input_mtok: Decimal
    output_mtok: Decimal
    cache_read_mtok: Decimal | None = None
    """Price of cached input tokens; defaults to ``input_mtok``."""
    cache_write_mtok: Decimal | None = None
    """Price of input tokens written to the cache; defaults to ``input_mtok``."""
    reasoning_mtok: Decimal | None = None
    """Price of reasoning tokens; defaults to ``output_mtok``."""
    request_kcount: Decimal | None = None
    """Price per thousand requests (a per-call fee some providers charge); default none."""

    def __post_init__(self) -> None:
        for name in ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok", "reasoning_mtok",
                     "request_kcount"):  # fmt: skip
            value = getattr(self, name)
            if value is None and name in ("input_mtok", "output_mtok"):
                raise ConfigurationError(f"Price needs {name}")
            try:
                object.__setattr__(self, name, coerce_cost(value, name))
            except UsageError as exc:
                raise ConfigurationError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class _Rates:
    """Femto-dollars per token for each kind of token."""

    input: int
    output: int
    cache_read: int
    cache_write: int
    reasoning: int
    request: int = 0
    """Femto-dollars per call."""
    worst_input: int = field(init=False, repr=False, compare=False)
    """The dearest way an input token can be billed (a cache write can cost more than plain input)."""
    worst_output: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "worst_input", max(self.input, self.cache_write))
        object.__setattr__(self, "worst_output", max(self.output, self.reasoning))

    @classmethod
    def of(cls, price: Price) -> _Rates:
        def femto(value: Decimal | None, default: Decimal) -> int:
            result = (value if value is not None else default) * _FEMTO_PER_MTOK
            return int(result.to_integral_value(rounding=ROUND_CEILING))

        return cls(
            input=femto(price.input_mtok, price.input_mtok),
            output=femto(price.output_mtok, price.output_mtok),
            cache_read=femto(price.cache_read_mtok, price.input_mtok),
            cache_write=femto(price.cache_write_mtok, price.input_mtok),
            reasoning=femto(price.reasoning_mtok, price.output_mtok),
            # $1 per thousand requests = 1e12 femto-dollars per request = 1000x the per-Mtok factor.
            request=femto(price.request_kcount, Decimal(0)) * 1000,
        )


@dataclass(frozen=True, slots=True)
class _ModelRates:
    base: _Rates
    tiers: tuple[tuple[int, _Rates], ...] = ()
    """(start, rates), ascending: a tier applies when input tokens > start."""

    def at(self, input_tokens: int) -> _Rates:
        if not self.tiers:
            return self.base
        for start, rates in reversed(self.tiers):
            if input_tokens > start:
                return rates
        return self.base

    def cost_nanos(self, usage: Usage) -> int:
        r = self.base if not self.tiers else self.at(usage.input_tokens)
        read, write, reasoning = usage.cache_read_tokens, usage.cache_write_tokens, usage.reasoning_tokens
        if not (read or write or reasoning):  # most calls: plain input and output
            return -(-(r.request + usage.input_tokens * r.input + usage.output_tokens * r.output) // _FEMTO_PER_NANO)
        femto = (
            r.request
            + (usage.input_tokens - read - write) * r.input
            + read * r.cache_read
            + write * r.cache_write
            + (usage.output_tokens - reasoning) * r.output
            + reasoning * r.reasoning
        )
        return -(-femto // _FEMTO_PER_NANO)

    def worst_case_nanos(self, input_tokens: int, output_tokens: int) -> int:
        """The most ``input_tokens`` + ``output_tokens`` could cost (no cache discount)."""
        r = self.base if not self.tiers else self.at(input_tokens)
        femto = r.request + input_tokens * r.worst_input + output_tokens * r.worst_output
        return -(-femto // _FEMTO_PER_NANO)


_table_lock = threading.Lock()
_table_cache: dict[tuple[str | None, str], _ModelRates | None] = {}
_warned: set[str] = set()


def _reset_for_tests() -> None:
    with _table_lock:
        _table_cache.clear()
        _warned.clear()


def _from_genai_prices(model: str, provider: str | None) -> _ModelRates | None:
    from genai_prices import Usage as GUsage
    from genai_prices import calc_price

    attempts = [(model, provider)]
    if "/" in model:  # "openai/gpt-4o-mini", "openrouter/anthropic/claude-sonnet-4-5"
        head, _, tail = model.partition("/")
        bare = model.rsplit("/", 1)[-1]
        if provider is None:
            attempts += [(tail, head), (bare, None)]
        else:
            attempts += [(tail, provider), (bare, provider)]
    for ref, prov in attempts:
        try:
            found = calc_price(GUsage(input_tokens=1, output_tokens=1), model_ref=ref, provider_id=prov)
        except LookupError:
            continue
        return _convert(found.model_price)
    return None


def _convert(model_price: Any) -> _ModelRates | None:
    def parts(name: str) -> tuple[Decimal | None, tuple[tuple[int, Decimal], ...]]:
        value = getattr(model_price, name, None)
        if value is None or isinstance(value, Decimal):
            return value, ()
        return value.base, tuple((tier.start, tier.price) for tier in value.tiers)

    fields = {
        name: parts(name + "_mtok") for name in ("input", "output", "cache_read", "cache_write", "output_reasoning")
    }
    request_kcount, _ = parts("requests_kcount")
    base_in, base_out = fields["input"][0], fields["output"][0]
    if base_in is None or base_out is None:
        return None
    base = Price(
        input_mtok=base_in,
        output_mtok=base_out,
        cache_read_mtok=fields["cache_read"][0],
        cache_write_mtok=fields["cache_write"][0],
        reasoning_mtok=fields["output_reasoning"][0],
        request_kcount=request_kcount,
    )
    starts = sorted({start for _, tiers in fields.values() for start, _ in tiers})
    tiers = []
    for start in starts:

        def at(name: str, start: int = start) -> Decimal | None:
            value, tier_list = fields[name]
            chosen = value
            for tier_start, price in tier_list:
                if tier_start <= start:
                    chosen = price
            return chosen

        tier_in, tier_out = at("input"), at("output")
        tier_price = Price(
            input_mtok=base_in if tier_in is None else tier_in,
            output_mtok=base_out if tier_out is None else tier_out,
            cache_read_mtok=at("cache_read"),
            cache_write_mtok=at("cache_write"),
            reasoning_mtok=at("output_reasoning"),
            request_kcount=request_kcount,
        )
        tiers.append((start, _Rates.of(tier_price)))
    return _ModelRates(_Rates.of(base), tuple(tiers))


_DATED = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8}|@latest|-latest)$")


@functools.lru_cache(maxsize=1024)
def _base_name(model: str) -> str:
    """The name a user's override is likely keyed by: no provider prefix, no date suffix.

    Providers bill under dated names (``gpt-4o-mini-2024-07-18``, ``claude-sonnet-4-5-20250929``,
    Vertex's ``claude-3-5-sonnet@20240620``) while users price the name they asked for.
    """
    return _DATED.sub("", model.rsplit("/", 1)[-1])


class PriceTable:
    """Resolves and caches model prices; user overrides win over the genai-prices table.

    Example:
        ```python
        table = PriceTable({"my-model": Price(input_mtok=1, output_mtok=2)})
        table.cost(Usage(input_tokens=1000, output_tokens=100), "my-model")  # Decimal('0.0012')
        ```
    """

    def __init__(self, overrides: Mapping[str, Price | Mapping[str, Any]] | None = None) -> None:
        self._overrides: dict[str, _ModelRates] = {}
        for model, price in (overrides or {}).items():
            if isinstance(price, Mapping):
                try:
                    price = Price(**price)
                except TypeError as exc:  # a missing or misspelt field
                    raise ConfigurationError(f"price for {model!r}: {exc}") from None
            if not isinstance(price, Price):
                raise ConfigurationError(f"price for {model!r} must be a Price or a mapping, got {price!r}")
            self._overrides[model] = _ModelRates(_Rates.of(price))

    def extended(self, overrides: Mapping[str, Price | Mapping[str, Any]] | None) -> PriceTable:
        """A table with this one's overrides and ``overrides``, which win (a child budget's table)."""
        if not overrides:
            return self
        table = PriceTable(overrides)
        table._overrides = {**self._overrides, **table._overrides}
        return table

    def rates(self, model: str | None, provider: str | None = None) -> _ModelRates | None:
        """The model's rates, or ``None`` when no price is known."""
        if model is None:
            return None
        overrides = self._overrides
        if overrides:
            rates = overrides.get(model)
            if rates is None:
                rates = overrides.get(_base_name(model))
            if rates is not None:
                return rates
        key = (provider, model)
        try:
            return _table_cache[key]
        except KeyError:
            pass
        with _table_lock:
            if key not in _table_cache:
                _table_cache[key] = _from_genai_prices(model, provider)
            return _table_cache[key]

    def knows(self, model: str | None, provider: str | None = None) -> bool:
        """Whether ``model`` has a price."""
        return self.rates(model, provider) is not None

    def cost_nanos(self, usage: Usage, model: str | None, provider: str | None = None) -> int | None:
        """Cost in nano-dollars (rounded up); a provider-reported cost wins; ``None`` if unknown."""
        if usage.cost_usd is not None:
            return usd_to_nanos(usage.cost_usd)
        rates = self.rates(model, provider)
        if rates is None:
            key = str(model)
            if key not in _warned:
                _warned.add(key)
                what = "usage without a model name" if model is None else f"no price is known for model {model!r}"
                warnings.warn(
                    f"{what}: its cost is recorded as unknown (not zero). Name the model, or pass "
                    f"prices={{{(model or 'model')!r}: Price(input_mtok=..., output_mtok=...)}} to Budget.",
                    UnpricedModelWarning,
                    stacklevel=4,
                )
            return None
        return rates.cost_nanos(usage)

    def cost(self, usage: Usage, model: str | None, provider: str | None = None) -> Decimal | None:
        """Cost in USD (exact, rounded up to the nano-dollar), or ``None`` if unknown."""
        nanos = self.cost_nanos(usage, model, provider)
        return None if nanos is None else Decimal(nanos) / 10**9
