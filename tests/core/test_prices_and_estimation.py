"""SPEC §10: estimation with tiktoken (and its fallback) and prices from genai-prices."""

from __future__ import annotations

import re
import warnings
from decimal import Decimal

import genai_prices
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetary import Budget, BudgetExceeded, ConfigurationError, Limits, Price, Usage
from budgetary.core import estimator, prices
from budgetary.core.estimator import (
    FRAMING_PER_MESSAGE,
    FRAMING_PER_PROMPT,
    EstimationWarning,
    count_tokens,
    encoding_name,
    upper_bound,
)
from budgetary.core.prices import PriceTable, UnpricedModelWarning
from tests.conftest import tiktoken_cache_present

needs_cache = pytest.mark.skipif(not tiktoken_cache_present(), reason="tiktoken encoding files are not available")


# -- estimation --------------------------------------------------------------------------------


@needs_cache
def test_tiktoken_counts_match_the_encoding():
    import tiktoken

    text = "Otters hold hands while they sleep, so they do not drift apart."
    o200k = tiktoken.get_encoding("o200k_base")
    cl100k = tiktoken.get_encoding("cl100k_base")
    assert count_tokens(text, "gpt-4o") == len(o200k.encode(text))
    assert count_tokens(text, "gpt-4") == len(cl100k.encode(text))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    expected = len(o200k.encode("Be brief.")) + len(o200k.encode(text)) + 2 * FRAMING_PER_MESSAGE + FRAMING_PER_PROMPT
    assert count_tokens(messages, "gpt-4o-mini") == expected
    assert count_tokens("hello world", "gpt-4o") == 2  # a known value


def test_models_map_to_encodings():
    assert encoding_name("gpt-4o") == "o200k_base"
    assert encoding_name("openai/gpt-4o-mini") == "o200k_base"
    assert encoding_name("gpt-4") == "cl100k_base"
    assert encoding_name("claude-sonnet-4-5") == "o200k_base"  # the documented default
    assert encoding_name(None) == "o200k_base"


def test_message_shapes_are_all_read():
    class Message:
        def __init__(self, content, tool_calls=None):
            self.content = content
            self.tool_calls = tool_calls or []

    texts = estimator.message_texts(
        [
            [Message("from a LangChain message"), Message("", [{"name": "search", "args": {"q": "otters"}}])],
            {"role": "user", "content": [{"type": "text", "text": "a part"}, {"type": "image_url", "image_url": "x"}]},
        ]
    )
    assert texts[0] == "from a LangChain message" and "search" in texts[2] and "a part" in texts[3]
    assert "image_url" in texts[3]  # non-text parts over-count rather than vanish


@needs_cache
@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(max_size=300), max_size=5))
def test_the_byte_bound_is_never_below_the_exact_count(texts):
    messages = [{"role": "user", "content": t} for t in texts]
    assert upper_bound(messages) >= count_tokens(messages, "gpt-4o")
    for text in texts:
        assert upper_bound(text) >= count_tokens(text, "gpt-4o")


def test_fallback_uses_the_bound_and_warns_once(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    estimator._reset_for_tests()
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = count_tokens("some prompt text", "gpt-4o")
            second = count_tokens([{"role": "user", "content": "more text"}], "gpt-4o")
        assert first == upper_bound("some prompt text") > 0
        assert second == upper_bound([{"role": "user", "content": "more text"}])
        assert [w.category for w in caught] == [EstimationWarning]
        assert "TIKTOKEN_CACHE_DIR" in str(caught[0].message)
    finally:
        estimator._reset_for_tests()


def test_tiktoken_runs_only_when_the_bound_would_be_refused(monkeypatch):
    counted = []
    real = estimator.count_tokens

    def spy(messages, model=None):
        counted.append(model)
        return real(messages, model)

    monkeypatch.setattr("budgetary.core.budget.count_tokens", spy)
    prompt = [{"role": "user", "content": "word " * 200}]  # ~1,000 bytes, ~200 tokens
    far = Budget(Limits(max_total_tokens=1_000_000))
    with far.llm_call(model="gpt-4o-mini", messages=prompt, max_output_tokens=10) as call:
        call.settle(Usage(input_tokens=200, output_tokens=10))
    assert counted == []
    near = Budget(Limits(max_total_tokens=600))
    with near.llm_call(model="gpt-4o-mini", messages=prompt, max_output_tokens=10) as call:
        held = near.snapshot().held_tokens
        call.settle(Usage(input_tokens=200, output_tokens=10))
    assert counted == ["gpt-4o-mini"]
    assert held < 600 <= upper_bound(prompt) + 10  # the bound alone would have been refused
    assert [e.kind for e in near.ledger.history()] == ["llm"]  # no deny entry for the bound attempt


# -- prices ------------------------------------------------------------------------------------


def _reference(usage: Usage, model: str) -> Decimal:
    calc = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens, cache_write_tokens=usage.cache_write_tokens,
        ),
        model_ref=model,
    )  # fmt: skip
    return calc.total_price


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4o-mini-2024-07-18", "gpt-4o", "claude-sonnet-4-5"])
def test_costs_agree_with_genai_prices_rounded_up_to_the_nano_dollar(model):
    usage = Usage(input_tokens=12_345, output_tokens=678, cache_read_tokens=5_000)
    ours = PriceTable().cost(usage, model)
    reference = _reference(usage, model)
    assert ours is not None and ours >= reference and ours - reference < Decimal("1e-9")


def test_billed_and_requested_names_and_provider_prefixes_price_the_same():
    usage = Usage(input_tokens=1_000, output_tokens=100)
    table = PriceTable()
    assert table.cost(usage, "gpt-4o-mini") == table.cost(usage, "gpt-4o-mini-2024-07-18")
    assert table.cost(usage, "openai/gpt-4o-mini") == table.cost(usage, "gpt-4o-mini")


def test_cached_input_is_cheaper():
    table = PriceTable()
    plain = table.cost(Usage(input_tokens=10_000, output_tokens=0), "gpt-4o-mini")
    cached = table.cost(Usage(input_tokens=10_000, output_tokens=0, cache_read_tokens=10_000), "gpt-4o-mini")
    assert plain == Decimal("0.0015") and cached == Decimal("0.00075")


def test_long_prompts_use_the_tier_price():
    table = PriceTable()
    short = table.cost(Usage(input_tokens=200_000, output_tokens=0), "gemini-2.5-pro")
    long = table.cost(Usage(input_tokens=200_001, output_tokens=0), "gemini-2.5-pro")
    assert short == _reference(Usage(input_tokens=200_000), "gemini-2.5-pro")
    assert long == _reference(Usage(input_tokens=200_001), "gemini-2.5-pro")
    assert long / 200_001 > short / 200_000


def test_overrides_and_reported_costs_win():
    table = PriceTable(
        {"gpt-4o-mini": Price(input_mtok=1, output_mtok=2), "mine": {"input_mtok": "0.5", "output_mtok": 1}}
    )
    assert table.cost(Usage(input_tokens=1_000_000, output_tokens=1_000_000), "gpt-4o-mini") == Decimal(3)
    assert table.cost(Usage(input_tokens=2_000_000), "mine") == Decimal(1)
    assert table.cost(Usage(input_tokens=5, cost_usd="0.42"), "gpt-4o-mini") == Decimal("0.42")
    assert PriceTable().cost(Usage(input_tokens=1, cost_usd=Decimal("1e-12")), "x") == Decimal("1e-9")  # rounded up


def test_resolution_is_cached_per_model(monkeypatch):
    calls = []
    real = prices._from_genai_prices

    def counting(model, provider):
        calls.append(model)
        return real(model, provider)

    monkeypatch.setattr(prices, "_from_genai_prices", counting)
    monkeypatch.setattr(prices, "_table_cache", {})
    table = PriceTable()
    for _ in range(5):
        table.cost(Usage(input_tokens=10), "gpt-4o")
    assert calls == ["gpt-4o"]


def test_invalid_prices_are_configuration_errors():
    with pytest.raises(ConfigurationError, match="input_mtok"):
        Price(input_mtok=-1, output_mtok=1)
    with pytest.raises(ConfigurationError, match="my-model"):
        PriceTable({"my-model": 5})  # type: ignore[dict-item]


def test_an_unpriced_model_under_a_usd_cap_is_denied_with_a_helpful_message():
    budget = Budget(Limits(max_cost_usd=1))
    with pytest.raises(BudgetExceeded) as info:
        budget.reserve(model="my-private-model", prompt_tokens=10)
    assert info.value.resource == "cost_usd"
    assert "prices=" in str(info.value) and "allow_unpriced" in str(info.value)
    assert budget.ledger.history(kind="deny")[0].resource == "cost_usd"
    lenient = Budget(Limits(max_cost_usd=1), allow_unpriced=True)
    lenient.reserve(model="my-private-model", prompt_tokens=10).release()
    priced = Budget(Limits(max_cost_usd=1), prices={"my-private-model": Price(input_mtok=1, output_mtok=1)})
    priced.reserve(model="my-private-model", prompt_tokens=10).release()


def test_unpriced_usage_after_the_fact_is_recorded_as_unknown_and_warned_once():
    budget = Budget()
    with pytest.warns(UnpricedModelWarning, match=re.escape("'model-nobody-prices'")):
        entry = budget.record(None, Usage(input_tokens=10, output_tokens=5), model="model-nobody-prices")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        budget.record(None, Usage(input_tokens=10, output_tokens=5), model="model-nobody-prices")
    assert entry.cost_usd is None and entry.usage is not None and entry.usage.cost_usd is None
    snap = budget.snapshot()
    assert snap.unpriced_calls == 2 and snap.cost_usd == 0 and snap.total_tokens == 30


def test_reserve_holds_the_worst_case_cost():
    budget = Budget(Limits(max_cost_usd="0.001"))
    budget.reserve(model="gpt-4o-mini", prompt_tokens=1_000, max_output_tokens=1_000)
    # $0.15/M input + $0.60/M output
    assert budget.snapshot().held_cost_usd == Decimal("0.00075")
    with pytest.raises(BudgetExceeded, match="cost_usd"):
        budget.reserve(model="gpt-4o-mini", prompt_tokens=1_000, max_output_tokens=1_000)
