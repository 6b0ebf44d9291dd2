"""`Usage`: what one call consumed, and normalisers for each provider's shape.

Conventions (OpenAI's and LangChain's): ``cache_read_tokens`` and
``cache_write_tokens`` are parts of ``input_tokens``; ``reasoning_tokens`` is
part of ``output_tokens``; ``total_tokens`` is always ``input + output``.
Providers that report parts *beside* the totals (Anthropic's cache tokens,
Gemini's thinking tokens) are folded in by their normaliser.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from budgetary.core._units import MAX_INT, sat
from budgetary.core.errors import UsageError

__all__ = ["Usage", "coerce_cost", "coerce_count"]

_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
# ASCII digits only: str.isdigit() also accepts "²", which int() then rejects with a bare ValueError.
_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def coerce_count(value: Any, name: str, unit: str = "tokens") -> int:
    """Return ``value`` as a non-negative int (saturated), or raise `UsageError` naming ``name`` and ``unit``."""
    if type(value) is int:
        if value < 0:
            raise UsageError(f"{name} must be >= 0, got {value}")
        return value if value <= MAX_INT else MAX_INT
    count = "an integer token count" if unit == "tokens" else f"an integer count of {unit}"
    if isinstance(value, bool) or value is None:
        raise UsageError(f"{name} must be {count}, got {value!r}")
    if isinstance(value, int):
        return coerce_count(int(value), name, unit)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value) or not value.is_integer():
            raise UsageError(f"{name} must be a whole number of {unit}, got {value!r}")
        return coerce_count(int(value), name, unit)
    if isinstance(value, Decimal):
        if not value.is_finite() or value != value.to_integral_value():
            raise UsageError(f"{name} must be a whole number of {unit}, got {value!r}")
        return coerce_count(int(value), name, unit)
    if isinstance(value, str):
        text = value.strip()
        if not _INT_TEXT.fullmatch(text):
            raise UsageError(f"{name} must be {count}, got {value!r}")
        return coerce_count(int(text), name, unit)
    raise UsageError(f"{name} must be {count}, got {type(value).__name__} {value!r}")


def coerce_cost(value: Any, name: str = "cost_usd") -> Decimal | None:
    """Return ``value`` as an exact non-negative `Decimal` (``None`` stays unknown)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise UsageError(f"{name} must be a number of dollars, got {value!r}")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, (int, float, str)):
        try:
            # str() first so that 0.1 means 0.1, not its binary approximation.
            result = Decimal(str(value).strip())
        except InvalidOperation:
            raise UsageError(f"{name} must be a number of dollars, got {value!r}") from None
    else:
        raise UsageError(f"{name} must be a number of dollars, got {type(value).__name__} {value!r}")
    if not result.is_finite():
        raise UsageError(f"{name} must be finite, got {value!r}")
    if result < 0:
        raise UsageError(f"{name} must be >= 0, got {value!r}")
    return result


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
class Usage:
    """Tokens and cost one call (or several, added up) consumed.

    Example:
        ```python
        usage = Usage(input_tokens=1200, output_tokens=300, cache_read_tokens=1000)
        usage.total_tokens  # 1500
        Usage.from_provider(ai_message.usage_metadata)  # any supported shape
        ```
    """

    input_tokens: int = 0
    """Prompt tokens, cached ones included."""
    output_tokens: int = 0
    """Completion tokens, reasoning ones included."""
    cache_read_tokens: int = 0
    """Part of ``input_tokens`` served from the provider's prompt cache."""
    cache_write_tokens: int = 0
    """Part of ``input_tokens`` written to the provider's prompt cache."""
    reasoning_tokens: int = 0
    """Part of ``output_tokens`` spent on hidden reasoning."""
    cost_usd: Decimal | None = None
    """Exact cost in USD, or ``None`` when not known (yet)."""
    total_tokens: int = field(default=0, init=False)  # computed: `dataclasses.replace` recomputes it
    """Always ``input_tokens + output_tokens`` (saturated); passing another value is an error."""

    # A hand-written __init__: the generated one of a frozen dataclass sets each field through
    # object.__setattr__, which made building a Usage a visible share of every settled call.
    def __init__(
        self,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        cost_usd: Decimal | None = None,
        total_tokens: int | None = None,
    ) -> None:
        i, o, r, w, z = input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens
        # Plain in-range ints (nearly every call) skip the per-field coercion.
        if not (
            type(i) is int and type(o) is int and type(r) is int and type(w) is int and type(z) is int
            and 0 <= i <= MAX_INT and 0 <= o <= MAX_INT and 0 <= r <= MAX_INT and 0 <= w <= MAX_INT
            and 0 <= z <= MAX_INT
        ):  # fmt: skip
            i, o, r, w, z = (coerce_count(v, n) for v, n in zip((i, o, r, w, z), _TOKEN_FIELDS, strict=True))
        if r + w > i and i == MAX_INT:
            # Saturated: the true input is unknown but at least the parts, so clamp the parts.
            w = MAX_INT - r
        if r + w > i:
            raise UsageError(f"cache_read_tokens + cache_write_tokens ({r} + {w}) cannot exceed input_tokens ({i})")
        if z > o:
            raise UsageError(f"reasoning_tokens ({z}) cannot exceed output_tokens ({o})")
        cost = cost_usd
        if cost is not None and (type(cost) is not Decimal or not cost.is_finite() or cost < 0):
            cost = coerce_cost(cost)
        total = i + o
        if total > MAX_INT:
            total = MAX_INT
        given = total_tokens
        if given is not None and given != total and coerce_count(given, "total_tokens") != total:
            raise UsageError(f"total_tokens must equal input_tokens + output_tokens ({total}), got {given!r}")
        _SET_INPUT(self, i)
        _SET_OUTPUT(self, o)
        _SET_CACHE_READ(self, r)
        _SET_CACHE_WRITE(self, w)
        _SET_REASONING(self, z)
        _SET_TOTAL(self, total)
        _SET_COST(self, cost)

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        cost = None if self.cost_usd is None or other.cost_usd is None else self.cost_usd + other.cost_usd
        return Usage(
            input_tokens=sat(self.input_tokens + other.input_tokens),
            output_tokens=sat(self.output_tokens + other.output_tokens),
            cache_read_tokens=sat(self.cache_read_tokens + other.cache_read_tokens),
            cache_write_tokens=sat(self.cache_write_tokens + other.cache_write_tokens),
            reasoning_tokens=sat(self.reasoning_tokens + other.reasoning_tokens),
            cost_usd=cost,
        )

    def with_cost(self, cost_usd: Decimal | None) -> Usage:
        """A copy with ``cost_usd`` set."""
        return Usage(
            input_tokens=self.input_tokens, output_tokens=self.output_tokens,
            cache_read_tokens=self.cache_read_tokens, cache_write_tokens=self.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens, cost_usd=cost_usd,
        )  # fmt: skip

    # -- normalisers -------------------------------------------------------------------

    @classmethod
    def from_provider(cls, data: Any) -> Usage:
        """Build a `Usage` from any supported provider shape.

        Accepts a `Usage`, a LangChain ``AIMessage`` or a provider's response (its
        ``usage_metadata`` or ``usage``), or the usage itself as a mapping or an object
        (pydantic, proto-plus, plain attributes) in the LangChain, OpenAI chat, OpenAI
        responses, Anthropic, Gemini, LiteLLM or CrewAI shape.
        """
        if type(data) is dict:  # the usual case: skip the ABC checks below
            return _NORMALISERS[_detect_shape(data)](data)
        if isinstance(data, Usage):
            return data
        if data is None:
            raise UsageError("usage is missing (got None)")
        if not isinstance(data, Mapping):
            # A LangChain AIMessage (or a Gemini, OpenAI or Anthropic response) is itself a model:
            # read its usage before its model_dump(), whose keys are the message's, not usage.
            for attribute in ("usage_metadata", "usage"):
                inner = getattr(data, attribute, None)
                if inner is not None:
                    if isinstance(inner, Usage):
                        return inner
                    data = inner  # one level only: never chase a proxy's attributes forever
                    break
        mapping = _as_mapping(data)
        if mapping is None:
            raise UsageError(f"cannot read token usage from {type(data).__name__}")
        return _NORMALISERS[_detect_shape(mapping)](mapping)

    @classmethod
    def from_langchain(cls, metadata: Any) -> Usage:
        """LangChain ``usage_metadata`` (``input_token_details``/``output_token_details``)."""
        if type(metadata) is dict and (usage := _plain_langchain(metadata)) is not None:
            return usage
        m = _require_mapping(metadata, "usage_metadata")
        inp = _details(m, "input_token_details") if "input_token_details" in m else None
        out = _details(m, "output_token_details") if "output_token_details" in m else None
        return cls(
            input_tokens=_req(m, "input_tokens"),
            output_tokens=_req(m, "output_tokens"),
            cache_read_tokens=_opt(inp, "cache_read") if inp else 0,
            cache_write_tokens=_opt(inp, "cache_creation") if inp else 0,
            reasoning_tokens=_opt(out, "reasoning") if out else 0,
        )

    @classmethod
    def from_openai(cls, usage: Any) -> Usage:
        """OpenAI chat-completions or responses ``usage`` (also LiteLLM's OpenAI-shaped usage)."""
        m = _require_mapping(usage, "usage")
        if "prompt_tokens" in m or "completion_tokens" in m:
            inp = _details(m, "prompt_tokens_details")
            out = _details(m, "completion_tokens_details")
            input_tokens = _req(m, "prompt_tokens")
            output_tokens = _req(m, "completion_tokens")
        else:
            inp = _details(m, "input_tokens_details")
            out = _details(m, "output_tokens_details")
            input_tokens = _req(m, "input_tokens")
            output_tokens = _req(m, "output_tokens")
        # LiteLLM folds Anthropic's cache tokens into prompt_tokens and keeps them beside it too;
        # OpenAI's own SDK names cache writes ``cache_write_tokens`` in the details.
        written = _first(inp, "cache_write_tokens", "cache_creation_tokens")
        cache_write = _opt(m, "cache_creation_input_tokens") or written
        cache_read = _opt(inp, "cached_tokens") or _opt(m, "cache_read_input_tokens")
        return cls(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=cache_read,
            cache_write_tokens=cache_write,
            reasoning_tokens=_opt(out, "reasoning_tokens"),
            cost_usd=_reported_cost(m),
        )

    @classmethod
    def from_anthropic(cls, usage: Any) -> Usage:
        """Anthropic ``usage``: cache tokens are reported beside ``input_tokens`` and are added to it."""
        m = _require_mapping(usage, "usage")
        read = _opt(m, "cache_read_input_tokens")
        write = _opt(m, "cache_creation_input_tokens")
        return cls(
            input_tokens=sat(_req(m, "input_tokens") + read + write),
            output_tokens=_req(m, "output_tokens"),
            cache_read_tokens=read,
            cache_write_tokens=write,
        )

    @classmethod
    def from_gemini(cls, usage_metadata: Any) -> Usage:
        """Gemini ``usage_metadata`` (snake_case or camelCase); thinking tokens count as output."""
        m = _require_mapping(usage_metadata, "usage_metadata")
        if "promptTokenCount" in m or "candidatesTokenCount" in m:
            m = {_snake(k): v for k, v in m.items()}
        thoughts = _opt(m, "thoughts_token_count")
        tool_prompt = _opt(m, "tool_use_prompt_token_count")
        return cls(
            input_tokens=sat(_req(m, "prompt_token_count") + tool_prompt),
            output_tokens=sat(_opt(m, "candidates_token_count") + thoughts),
            cache_read_tokens=_opt(m, "cached_content_token_count"),
            reasoning_tokens=thoughts,
        )

    @classmethod
    def from_litellm(cls, usage: Any) -> Usage:
        """LiteLLM ``Usage`` objects or dicts (OpenAI-shaped, with Anthropic cache fields)."""
        return cls.from_openai(usage)

    @classmethod
    def from_crewai(cls, metrics: Any) -> Usage:
        """CrewAI ``UsageMetrics``, or the flat dicts CrewAI's native providers pass to its usage tracking.

        Those dicts keep the provider's own input/output keys (``prompt_tokens``,
        ``input_tokens`` or ``prompt_token_count``) beside CrewAI's flat parts
        (``cached_prompt_tokens``, ``cache_creation_tokens``, ``reasoning_tokens``);
        the native Anthropic and Gemini providers already include cached tokens in
        the input count and thinking tokens in ``completion_tokens``. A raw Anthropic
        shape (``input_tokens`` beside ``cache_*_input_tokens``) is folded as in
        `from_anthropic`, like CrewAI's own ``UsageMetrics.from_provider_dict``.
        """
        m = _require_mapping(metrics, "usage metrics")
        input_key = next((k for k in ("prompt_tokens", "input_tokens", "prompt_token_count") if k in m), None)
        output_key = next((k for k in ("completion_tokens", "output_tokens") if k in m), None)
        if input_key is None:
            raise UsageError(f"usage is missing 'prompt_tokens' (got keys {sorted(m)})")
        if output_key is not None:
            output_tokens = _req(m, output_key)
        elif input_key == "prompt_token_count":  # Gemini's shape: it leaves out zero counts
            output_tokens = sat(_opt(m, "candidates_token_count") + _opt(m, "thoughts_token_count"))
        else:
            expected = "completion_tokens" if input_key == "prompt_tokens" else "output_tokens"
            raise UsageError(f"usage is missing {expected!r} (got keys {sorted(m)})")
        cache_read = _first(m, "cached_prompt_tokens", "cached_tokens", "cache_read_input_tokens")
        if not cache_read:
            cache_read = _opt(_details(m, "prompt_tokens_details"), "cached_tokens")
        cache_write = _first(m, "cache_creation_tokens", "cache_creation_input_tokens")
        input_tokens = _req(m, input_key)
        if input_key == "input_tokens" and ("cache_read_input_tokens" in m or "cache_creation_input_tokens" in m):
            # Anthropic's raw shape (via LiteLLM or CrewAI's event aggregation): cache tokens beside input.
            input_tokens = sat(
                input_tokens + _opt(m, "cache_read_input_tokens") + _opt(m, "cache_creation_input_tokens")
            )
        return cls(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=cache_read,
            cache_write_tokens=cache_write,
            reasoning_tokens=_opt(m, "reasoning_tokens"),
        )


_SET_INPUT = vars(Usage)["input_tokens"].__set__
_SET_OUTPUT = vars(Usage)["output_tokens"].__set__
_SET_CACHE_READ = vars(Usage)["cache_read_tokens"].__set__
_SET_CACHE_WRITE = vars(Usage)["cache_write_tokens"].__set__
_SET_REASONING = vars(Usage)["reasoning_tokens"].__set__
_SET_TOTAL = vars(Usage)["total_tokens"].__set__
_SET_COST = vars(Usage)["cost_usd"].__set__


def _plain_langchain(m: dict[str, Any]) -> Usage | None:
    """`Usage.from_langchain` of the usual report (plain dicts of in-range ints) in one step; None otherwise.

    Every settled LangChain call reads one; anything unusual (a missing or ``None`` count, a float,
    an inconsistent part) takes the general path, which coerces or names the problem.
    """
    i = m.get("input_tokens")
    o = m.get("output_tokens")
    if type(i) is not int or type(o) is not int or not (0 <= i <= MAX_INT and 0 <= o <= MAX_INT):
        return None
    r = w = z = 0
    details = m.get("input_token_details")
    if details:  # often there, all zeros (ChatOpenAI: {"audio": 0, "cache_read": 0})
        if type(details) is not dict:
            return None
        r = details.get("cache_read", 0)
        w = details.get("cache_creation", 0)
        if type(r) is not int or type(w) is not int or r < 0 or w < 0 or r + w > i:
            return None
    details = m.get("output_token_details")
    if details:
        if type(details) is not dict:
            return None
        z = details.get("reasoning", 0)
        if type(z) is not int or not 0 <= z <= o:
            return None
    usage = _new_usage(Usage)
    _SET_INPUT(usage, i)
    _SET_OUTPUT(usage, o)
    _SET_CACHE_READ(usage, r)
    _SET_CACHE_WRITE(usage, w)
    _SET_REASONING(usage, z)
    _SET_TOTAL(usage, i + o if i + o <= MAX_INT else MAX_INT)
    _SET_COST(usage, None)
    return usage


_new_usage = object.__new__


def _as_mapping(data: Any) -> Mapping[str, Any] | None:
    if type(data) is dict or isinstance(data, Mapping):
        return data
    dump = getattr(data, "model_dump", None)
    if callable(dump):
        dumped = dump()
        if isinstance(dumped, Mapping):
            return dumped
    # Objects without model_dump (proto-plus messages, SimpleNamespace, dataclasses): the
    # attributes the normalisers know.
    found = {key: value for key in _USAGE_KEYS if (value := getattr(data, key, None)) is not None}
    return found or None


def _require_mapping(data: Any, what: str) -> Mapping[str, Any]:
    mapping = _as_mapping(data)
    if mapping is None:
        raise UsageError(f"{what} must be a mapping, got {type(data).__name__}")
    return mapping


def _detect_shape(m: Mapping[str, Any]) -> str:
    # CrewAI's flat parts first: its native providers add them to their own shapes.
    if "cached_prompt_tokens" in m or "cache_creation_tokens" in m or "successful_requests" in m:
        return "crewai"
    if any(key in m for key in _GEMINI_KEYS):
        return "gemini"
    if "prompt_tokens" in m or "completion_tokens" in m:
        return "openai"
    if "input_tokens_details" in m or "output_tokens_details" in m:
        return "openai"
    if "input_token_details" in m or "output_token_details" in m:
        return "langchain"
    if "cache_read_input_tokens" in m or "cache_creation_input_tokens" in m or "total_tokens" not in m:
        # Anthropic reports no total; LangChain always does.
        return "anthropic"
    return "langchain"


_USAGE_KEYS = (
    # LangChain, OpenAI (chat and responses), Anthropic, LiteLLM, CrewAI; and their details.
    "input_tokens", "output_tokens", "total_tokens", "input_token_details", "output_token_details",
    "cache_read", "cache_creation", "reasoning", "prompt_tokens", "completion_tokens",
    "prompt_tokens_details", "completion_tokens_details", "input_tokens_details", "output_tokens_details",
    "cached_tokens", "cache_write_tokens", "cache_creation_tokens", "reasoning_tokens",
    "cache_read_input_tokens", "cache_creation_input_tokens", "cached_prompt_tokens", "successful_requests", "cost",
    # Gemini, snake_case and camelCase.
    "prompt_token_count", "candidates_token_count", "thoughts_token_count", "cached_content_token_count",
    "tool_use_prompt_token_count", "total_token_count", "promptTokenCount", "candidatesTokenCount",
    "thoughtsTokenCount", "cachedContentTokenCount", "toolUsePromptTokenCount", "totalTokenCount",
)  # fmt: skip
_GEMINI_KEYS = ("prompt_token_count", "promptTokenCount", "candidates_token_count", "candidatesTokenCount")


def _details(m: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = m.get(key)
    if value is None:
        return {}
    mapping = _as_mapping(value)
    if mapping is None:
        raise UsageError(f"{key} must be a mapping, got {type(value).__name__}")
    return mapping


def _req(m: Mapping[str, Any], key: str) -> int:
    value = m.get(key)
    if value is None:
        raise UsageError(f"usage is missing {key!r} (got keys {sorted(m)})")
    return coerce_count(value, key)


def _opt(m: Mapping[str, Any], key: str) -> int:
    value = m.get(key)
    return 0 if value is None else coerce_count(value, key)


def _first(m: Mapping[str, Any], *keys: str) -> int:
    # The first non-zero of several aliases (CrewAI's precedence: a present zero falls through).
    for key in keys:
        value = _opt(m, key)
        if value:
            return value
    return 0


def _reported_cost(m: Mapping[str, Any]) -> Decimal | None:
    # OpenRouter and LiteLLM proxies report the billed cost beside the tokens.
    return coerce_cost(m.get("cost"), "cost") if m.get("cost") is not None else None


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


_NORMALISERS = {
    "langchain": Usage.from_langchain,
    "openai": Usage.from_openai,
    "anthropic": Usage.from_anthropic,
    "gemini": Usage.from_gemini,
    "crewai": Usage.from_crewai,
}
