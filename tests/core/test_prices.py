"""SPEC §10 (prices): costs from genai-prices, overrides, rounding, caching, unpriced models.

Expected costs come from the per-million rates genai-prices publishes (read from
genai_prices itself) and from its own ``total_price``, rounded up to the nano-dollar.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import ROUND_CEILING, Decimal

import genai_prices
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetary import Budget, BudgetExceeded, ConfigurationError, Limits, Price, Usage
from budgetary.core import prices
from budgetary.core.prices import PriceTable, UnpricedModelWarning

NANO = Decimal("1e-9")
MTOK = Decimal(1_000_000)


@pytest.fixture(autouse=True)
def fresh_price_cache() -> Iterator[None]:
    # Resolution and the once-per-model warning are process-wide; start each test clean.
    prices._reset_for_tests()
    yield
    prices._reset_for_tests()


def ceil_nano(dollars: Decimal) -> Decimal:
    return (dollars / NANO).to_integral_value(rounding=ROUND_CEILING) * NANO


def genai_total(model: str, provider: str | None = None, **usage: int) -> Decimal:
    return genai_prices.calc_price(genai_prices.Usage(**usage), model_ref=model, provider_id=provider).total_price


def published(model: str, provider: str | None = None):  # the table's ModelPrice for `model`
    return genai_prices.calc_price(
        genai_prices.Usage(input_tokens=1, output_tokens=1), model_ref=model, provider_id=provider
    ).model_price


# -- the genai-prices table ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    input_tokens=st.integers(0, 3_000_000),
    cached_share=st.floats(0, 1),
    output_tokens=st.integers(0, 500_000),
)
def test_gpt_4o_mini_costs_match_the_published_rates_and_genai_prices(input_tokens, cached_share, output_tokens):
    cached = int(input_tokens * cached_share)
    rates = published("gpt-4o-mini")
    by_hand = (
        (input_tokens - cached) * rates.input_mtok + cached * rates.cache_read_mtok + output_tokens * rates.output_mtok
    ) / MTOK
    theirs = genai_total(
        "gpt-4o-mini", input_tokens=input_tokens, cache_read_tokens=cached, output_tokens=output_tokens
    )
    assert by_hand == theirs

    usage = Usage(input_tokens=input_tokens, cache_read_tokens=cached, output_tokens=output_tokens)
    assert PriceTable().cost(usage, "gpt-4o-mini") == ceil_nano(theirs)


def test_a_known_gpt_4o_mini_call():
    # 1,000 prompt tokens (600 cached) and 200 completion tokens at $0.15 / $0.075 / $0.60 per million.
    rates = published("gpt-4o-mini")
    assert (rates.input_mtok, rates.cache_read_mtok, rates.output_mtok) == (
        Decimal("0.15"), Decimal("0.075"), Decimal("0.6"),
    )  # fmt: skip
    usage = Usage(input_tokens=1000, cache_read_tokens=600, output_tokens=200)
    assert PriceTable().cost(usage, "gpt-4o-mini") == Decimal("0.000225")


def test_the_cached_input_price_is_used_when_cache_reads_are_reported():
    table = PriceTable()
    plain = table.cost(Usage(input_tokens=1_000_000), "gpt-4o-mini")
    cached = table.cost(Usage(input_tokens=1_000_000, cache_read_tokens=1_000_000), "gpt-4o-mini")
    rates = published("gpt-4o-mini")
    assert plain == rates.input_mtok
    assert cached == rates.cache_read_mtok < plain


@pytest.mark.parametrize("name", ["gpt-4o-mini-2024-07-18", "openai/gpt-4o-mini"])
def test_billed_and_prefixed_names_price_like_the_model(name):
    table = PriceTable()
    usage = Usage(input_tokens=12_345, cache_read_tokens=1_000, output_tokens=678)
    assert table.rates(name) is not None
    assert table.rates(name) == table.rates("gpt-4o-mini")
    assert (
        table.cost(usage, name)
        == table.cost(usage, "gpt-4o-mini")
        == ceil_nano(genai_total("gpt-4o-mini", input_tokens=12_345, cache_read_tokens=1_000, output_tokens=678))
    )


def test_a_prefixed_name_with_an_explicit_provider_is_priced():
    assert PriceTable().rates("openai/gpt-4o-mini", "openai") == PriceTable().rates("gpt-4o-mini")


@pytest.mark.parametrize("input_tokens", [199_999, 200_000, 200_001, 250_000, 1_000_000])
def test_gemini_2_5_pro_uses_the_tier_price_above_200k_input_tokens(input_tokens):
    rates = published("gemini-2.5-pro")
    (tier,) = rates.input_mtok.tiers
    (out_tier,) = rates.output_mtok.tiers
    assert tier.start == 200_000 and tier.price > rates.input_mtok.base  # the test can tell the tiers apart
    above = input_tokens > tier.start  # genai-prices: a tier applies above its start
    in_price = tier.price if above else rates.input_mtok.base
    out_price = out_tier.price if above else rates.output_mtok.base
    by_hand = (input_tokens * in_price + 1_000 * out_price) / MTOK

    cost = PriceTable().cost(Usage(input_tokens=input_tokens, output_tokens=1_000), "gemini-2.5-pro")
    assert cost == ceil_nano(by_hand) == ceil_nano(genai_total("gemini-2.5-pro", input_tokens=input_tokens,
                                                               output_tokens=1_000))  # fmt: skip


@pytest.mark.parametrize("input_tokens", [150_000, 260_000])
def test_claude_sonnet_4_5_tiers_apply_to_cache_reads_and_writes_too(input_tokens):
    usage = dict(input_tokens=input_tokens, cache_read_tokens=100_000, cache_write_tokens=20_000, output_tokens=3_000)
    cost = PriceTable().cost(Usage(**usage), "claude-sonnet-4-5")
    assert cost == ceil_nano(genai_total("claude-sonnet-4-5", **usage))


def test_one_resolution_serves_every_tier(monkeypatch):
    calls = _count_lookups(monkeypatch)
    table = PriceTable()
    low = table.cost(Usage(input_tokens=1_000, output_tokens=10), "claude-sonnet-4-5")
    high = table.cost(Usage(input_tokens=300_000, output_tokens=10), "claude-sonnet-4-5")
    assert high / 300 > low  # the per-token price rose with the tier
    assert calls == [("claude-sonnet-4-5", None)]


def test_reasoning_tokens_use_the_reasoning_price_when_the_table_has_one():
    # OpenRouter lists sonar-deep-research with its own (cheaper) reasoning price.
    rates = published("perplexity/sonar-deep-research", "openrouter")
    assert rates.output_reasoning_mtok is not None and rates.output_reasoning_mtok != rates.output_mtok
    usage = Usage(input_tokens=1_000, output_tokens=200, reasoning_tokens=50)
    by_hand = (1_000 * rates.input_mtok + 150 * rates.output_mtok + 50 * rates.output_reasoning_mtok) / MTOK
    theirs = genai_total(
        "perplexity/sonar-deep-research",
        "openrouter",
        input_tokens=1_000,
        output_tokens=200,
        output_reasoning_tokens=50,
    )
    assert by_hand == theirs
    assert PriceTable().cost(usage, "openrouter/perplexity/sonar-deep-research") == ceil_nano(theirs)


def test_reasoning_tokens_cost_the_output_price_when_the_table_has_none():
    table = PriceTable()
    with_reasoning = table.cost(Usage(input_tokens=10, output_tokens=1_000, reasoning_tokens=900), "gpt-4o-mini")
    assert with_reasoning == table.cost(Usage(input_tokens=10, output_tokens=1_000), "gpt-4o-mini")


def test_a_per_request_fee_is_charged_once_per_call():
    rates = published("sonar", "perplexity")
    assert rates.requests_kcount > 0
    by_hand = (1_000 * rates.input_mtok + 200 * rates.output_mtok) / MTOK + rates.requests_kcount / 1_000
    assert by_hand == genai_total("sonar", "perplexity", input_tokens=1_000, output_tokens=200)
    assert PriceTable().cost(Usage(input_tokens=1_000, output_tokens=200), "sonar", "perplexity") == by_hand
    assert PriceTable().cost(Usage(input_tokens=1_000, output_tokens=200), "perplexity/sonar") == by_hand


# -- overrides and reported costs ------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [Price(input_mtok="1", output_mtok="2"), {"input_mtok": 1, "output_mtok": "2"}],
    ids=["Price", "mapping"],
)
def test_a_user_override_wins_over_the_table(override):
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    assert PriceTable().cost(usage, "gpt-4o-mini") != Decimal(3)
    assert PriceTable({"gpt-4o-mini": override}).cost(usage, "gpt-4o-mini") == Decimal(3)

    budget = Budget(prices={"gpt-4o-mini": override})
    entry = budget.record(None, usage, model="gpt-4o-mini")
    assert entry.cost_usd == Decimal(3)
    assert budget.snapshot().cost_usd == Decimal(3)


def test_override_defaults_cache_and_reasoning_to_the_plain_prices():
    table = PriceTable({"m": Price(input_mtok=2, output_mtok=8)})
    usage = Usage(input_tokens=1_000, cache_read_tokens=400, cache_write_tokens=100, output_tokens=50,
                  reasoning_tokens=20)  # fmt: skip
    assert table.cost(usage, "m") == (1_000 * 2 + 50 * 8) / MTOK


def test_override_cache_and_reasoning_prices():
    price = Price(input_mtok=2, output_mtok=8, cache_read_mtok="0.2", cache_write_mtok="2.5", reasoning_mtok=4)
    usage = Usage(input_tokens=1_000, cache_read_tokens=400, cache_write_tokens=100, output_tokens=50,
                  reasoning_tokens=20)  # fmt: skip
    by_hand = (500 * 2 + 400 * Decimal("0.2") + 100 * Decimal("2.5") + 30 * 8 + 20 * 4) / MTOK
    assert PriceTable({"m": price}).cost(usage, "m") == by_hand


def test_overrides_never_consult_the_table(monkeypatch):
    calls = _count_lookups(monkeypatch)
    PriceTable({"gpt-4o-mini": Price(input_mtok=1, output_mtok=1)}).rates("gpt-4o-mini")
    assert calls == []


def test_a_provider_reported_cost_wins_over_the_table():
    usage = Usage(input_tokens=1_000, output_tokens=100, cost_usd="0.5")
    assert PriceTable().cost(usage, "gpt-4o-mini") == Decimal("0.5")
    assert PriceTable({"gpt-4o-mini": Price(input_mtok=9, output_mtok=9)}).cost(usage, "gpt-4o-mini") == Decimal("0.5")
    # ...even for a model the table does not know, with no warning.
    assert PriceTable().cost(usage, "budgetary-test-unknown-model") == Decimal("0.5")

    budget = Budget(Limits(max_cost_usd=10))
    with budget.llm_call(model="gpt-4o-mini", prompt_tokens=1_000, max_output_tokens=100) as call:
        entry = call.settle({"prompt_tokens": 1_000, "completion_tokens": 100, "cost": "0.5"})
    assert entry.cost_usd == Decimal("0.5")
    assert budget.snapshot().cost_usd == Decimal("0.5")


# -- rounding --------------------------------------------------------------------------------


def test_a_reported_cost_below_a_nano_dollar_charges_one_nano_dollar():
    assert PriceTable().cost(Usage(cost_usd=Decimal("1e-12")), None) == NANO
    budget = Budget()
    budget.record(None, Usage(input_tokens=1, cost_usd=Decimal("1e-12")))
    assert budget.snapshot().cost_usd == NANO


def test_a_table_cost_below_a_nano_dollar_rounds_up():
    table = PriceTable({"tiny": Price(input_mtok="0.0001", output_mtok=0)})  # 1e-10 dollars per token
    assert table.cost(Usage(input_tokens=1), "tiny") == NANO
    assert table.cost(Usage(input_tokens=10), "tiny") == NANO
    assert table.cost(Usage(input_tokens=11), "tiny") == 2 * NANO
    assert table.cost(Usage(input_tokens=0), "tiny") == 0


def test_whole_nano_dollars_are_not_rounded_further():
    table = PriceTable({"m": Price(input_mtok="0.003", output_mtok="0.007")})  # 3 and 7 nano-dollars per token
    assert table.cost(Usage(input_tokens=1, output_tokens=1), "m") == 10 * NANO


@settings(max_examples=50, deadline=None)
@given(
    price=st.decimals(min_value=0, max_value=100, places=7),
    tokens=st.integers(0, 10**9),
)
def test_costs_are_never_under_the_exact_amount_and_over_by_less_than_a_nano_dollar(price, tokens):
    cost = PriceTable({"m": Price(input_mtok=price, output_mtok=0)}).cost(Usage(input_tokens=tokens), "m")
    exact = tokens * price / MTOK
    assert exact <= cost < exact + NANO


# -- resolution cache ------------------------------------------------------------------------


def _count_lookups(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    calls: list[tuple[str, str | None]] = []
    real = genai_prices.calc_price

    def counting(*args, **kwargs):
        calls.append((kwargs["model_ref"], kwargs.get("provider_id")))
        return real(*args, **kwargs)

    monkeypatch.setattr(genai_prices, "calc_price", counting)
    return calls


def test_resolution_is_cached_once_per_provider_and_model(monkeypatch):
    calls = _count_lookups(monkeypatch)
    first, second = PriceTable(), PriceTable()
    for tokens in (10, 20, 30):
        first.cost(Usage(input_tokens=tokens, output_tokens=1), "gpt-4o-mini")
        second.rates("gpt-4o-mini")
    assert calls == [("gpt-4o-mini", None)]

    second.rates("gpt-4o-mini", "openai")
    second.rates("gpt-4o-mini", "openai")
    assert calls == [("gpt-4o-mini", None), ("gpt-4o-mini", "openai")]


def test_an_unknown_model_is_looked_up_once(monkeypatch):
    calls = _count_lookups(monkeypatch)
    table = PriceTable()
    assert table.rates("budgetary-test-no-such-model") is None
    assert table.rates("budgetary-test-no-such-model") is None
    assert not table.knows("budgetary-test-no-such-model")
    assert calls == [("budgetary-test-no-such-model", None)]


def test_settling_many_calls_resolves_the_price_once(monkeypatch):
    calls = _count_lookups(monkeypatch)
    budget = Budget(Limits(max_cost_usd=10))
    for _ in range(5):
        with budget.llm_call(model="gpt-4o-mini", prompt_tokens=100, max_output_tokens=10) as call:
            call.settle({"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110})
    assert calls == [("gpt-4o-mini", None)]
    assert budget.snapshot().cost_usd == 5 * ceil_nano(genai_total("gpt-4o-mini", input_tokens=100, output_tokens=10))


# -- unknown models --------------------------------------------------------------------------


def test_an_unknown_model_has_no_rates_and_no_cost():
    table = PriceTable()
    assert table.rates("budgetary-test-mystery") is None
    assert table.rates(None) is None
    with pytest.warns(UnpricedModelWarning):
        assert table.cost(Usage(input_tokens=5), "budgetary-test-mystery") is None


def test_unpriced_usage_after_the_fact_is_recorded_unknown_counted_and_warned_once_per_model():
    budget = Budget(Limits(max_total_tokens=1_000_000))
    message = (
        "no price is known for model 'budgetary-test-unpriced-a': its cost is recorded as unknown (not zero). "
        "Name the model, or pass prices={'budgetary-test-unpriced-a': Price(input_mtok=..., output_mtok=...)} "
        "to Budget."
    )
    with pytest.warns(UnpricedModelWarning, match=re.escape(message)) as caught:
        first = budget.record(None, {"input_tokens": 10, "output_tokens": 5}, model="budgetary-test-unpriced-a")
        second = budget.record(None, {"input_tokens": 7, "output_tokens": 3}, model="budgetary-test-unpriced-a")
    assert sum(issubclass(w.category, UnpricedModelWarning) for w in caught) == 1
    for entry in (first, second):
        assert entry.cost_usd is None
        assert entry.usage is not None and entry.usage.cost_usd is None

    snapshot = budget.snapshot()
    assert snapshot.unpriced_calls == 2
    assert snapshot.total_tokens == 25  # the tokens are charged even though the cost is unknown
    assert snapshot.cost_usd == 0

    with pytest.warns(UnpricedModelWarning, match=re.escape("'budgetary-test-unpriced-b'")):
        budget.record(None, {"input_tokens": 1, "output_tokens": 1}, model="budgetary-test-unpriced-b")
    assert budget.snapshot().unpriced_calls == 3


def test_usage_without_a_model_name_is_unpriced_and_says_so():
    budget = Budget()
    with pytest.warns(UnpricedModelWarning, match=re.escape("usage without a model name")):
        entry = budget.record(None, Usage(input_tokens=3, output_tokens=1))
    assert entry.cost_usd is None
    assert budget.snapshot().unpriced_calls == 1


def test_an_unpriced_model_under_a_usd_cap_is_denied_with_how_to_price_it():
    budget = Budget(Limits(max_cost_usd=5), name="run")
    with pytest.raises(BudgetExceeded) as info:
        budget.reserve(model="budgetary-test-finetune", prompt_tokens=10, max_output_tokens=10)
    assert info.value.resource == "cost_usd"
    message = str(info.value)
    assert message.startswith(
        "model 'budgetary-test-finetune' has no known price and budget 'run' has a USD limit, so its cost "
        "cannot be checked. Pass prices={'budgetary-test-finetune': Price(input_mtok=..., output_mtok=...)}"
    )
    assert "allow_unpriced=True" in message
    assert budget.snapshot().held_llm_calls == 0


def test_the_unpriced_refusal_message_is_exact():
    budget = Budget(Limits(max_cost_usd=5), name="run")
    with pytest.raises(BudgetExceeded) as info:
        budget.reserve(model="budgetary-test-finetune", prompt_tokens=10, max_output_tokens=10)
    assert str(info.value) == (
        "model 'budgetary-test-finetune' has no known price and budget 'run' has a USD limit, so its cost "
        "cannot be checked. Pass prices={'budgetary-test-finetune': Price(input_mtok=..., output_mtok=...)} "
        "to Budget, or allow_unpriced=True to let it run uncounted."
    )


def test_allow_unpriced_lets_an_unpriced_model_run_and_flags_it():
    budget = Budget(Limits(max_cost_usd=5), allow_unpriced=True)
    with budget.llm_call(model="budgetary-test-finetune-2", prompt_tokens=10, max_output_tokens=10) as call:
        with pytest.warns(UnpricedModelWarning):
            entry = call.settle({"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14})
    assert entry.cost_usd is None
    snapshot = budget.snapshot()
    assert snapshot.unpriced_calls == 1
    assert snapshot.total_tokens == 14


def test_a_child_budget_inherits_allow_unpriced_unless_given_its_own():
    # SPEC §10: unpriced models are refused under a USD cap "unless the user opts into allowing it". A
    # tenant that opted in runs its children under the same cap: their calls must not be refused.
    tenant = Budget(Limits(max_cost_usd=5), name="tenant", allow_unpriced=True)
    run = Budget(Limits(max_llm_calls=5), name="run", parent=tenant)
    assert run.allow_unpriced is True
    with run.llm_call(model="budgetary-test-finetune-4", prompt_tokens=10, max_output_tokens=10) as call:
        with pytest.warns(UnpricedModelWarning):
            call.settle({"prompt_tokens": 10, "completion_tokens": 4})
    assert tenant.snapshot().unpriced_calls == 1
    grandchild = Budget(name="step", parent=run)
    assert grandchild.allow_unpriced is True  # through every level
    strict = Budget(name="strict", parent=tenant, allow_unpriced=False)  # its own setting wins
    with pytest.raises(BudgetExceeded, match=re.escape("or allow_unpriced=True to let it run uncounted")):
        strict.reserve(model="budgetary-test-finetune-4", prompt_tokens=10, max_output_tokens=10)
    lenient = Budget(name="lenient", parent=Budget(Limits(max_cost_usd=5), name="closed"), allow_unpriced=True)
    assert lenient.reserve(model="budgetary-test-finetune-4", prompt_tokens=1, max_output_tokens=1).decision.allowed
    assert Budget(name="default", parent=Budget(Limits(max_cost_usd=5))).allow_unpriced is False


def test_a_price_override_lets_the_model_run_under_a_usd_cap():
    budget = Budget(Limits(max_cost_usd=5), prices={"budgetary-test-finetune-3": Price(input_mtok=1, output_mtok=2)})
    with budget.llm_call(model="budgetary-test-finetune-3", prompt_tokens=1_000, max_output_tokens=500) as call:
        call.settle({"prompt_tokens": 1_000, "completion_tokens": 500, "total_tokens": 1_500})
    assert budget.snapshot().cost_usd == (1_000 * 1 + 500 * 2) / MTOK


def test_a_child_budget_with_prices_of_its_own_keeps_its_parents_prices():
    # One price table charges every level: a child's overrides add to the parent's and win over them,
    # they do not hide them (the tenant's fine-tune would be refused as unpriced in the run).
    tenant = Budget(
        Limits(max_cost_usd=5), name="tenant", prices={"budgetary-test-finetune": Price(input_mtok=1, output_mtok=2)}
    )
    run = Budget(
        name="run", parent=tenant,
        prices={"budgetary-test-finetune-3": Price(input_mtok=3, output_mtok=4),
                "gpt-4o-mini": Price(input_mtok=10, output_mtok=10)},
    )  # fmt: skip
    run.record(None, {"prompt_tokens": 1_000, "completion_tokens": 500}, model="budgetary-test-finetune")
    run.record(None, {"prompt_tokens": 1_000, "completion_tokens": 500}, model="budgetary-test-finetune-3")
    assert tenant.snapshot().cost_usd == Decimal(2_000 + 5_000) / MTOK
    with run.llm_call(model="budgetary-test-finetune", prompt_tokens=10, max_output_tokens=10) as call:
        call.settle({"prompt_tokens": 10, "completion_tokens": 10})
    run.record(None, {"prompt_tokens": 1_000, "completion_tokens": 0}, model="gpt-4o-mini")
    assert run.snapshot().cost_usd == Decimal(2_000 + 5_000 + 30 + 10_000) / MTOK
    assert tenant.ledger.history(kind="llm")[-1].cost_usd == Decimal(10_000) / MTOK  # the child's override wins


def test_the_hold_is_the_worst_case_cost():
    # A cache write can cost more than plain input; the hold assumes no cache discount.
    price = Price(input_mtok=1, output_mtok=2, cache_write_mtok="1.25", cache_read_mtok="0.1")
    budget = Budget(Limits(max_cost_usd=1), prices={"m": price})
    reservation = budget.reserve(model="m", prompt_tokens=1_000, max_output_tokens=500)
    assert budget.snapshot().held_cost_usd == (1_000 * Decimal("1.25") + 500 * 2) / MTOK
    reservation.settle({"input_tokens": 200, "cache_read_input_tokens": 800, "output_tokens": 100})
    snapshot = budget.snapshot()
    assert snapshot.held_cost_usd == 0
    assert snapshot.cost_usd == (200 * 1 + 800 * Decimal("0.1") + 100 * 2) / MTOK


# -- invalid prices ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"input_mtok": -1, "output_mtok": 1}, "input_mtok must be >= 0, got -1"),
        ({"input_mtok": "abc", "output_mtok": 1}, "input_mtok must be a number of dollars, got 'abc'"),
        ({"input_mtok": True, "output_mtok": 1}, "input_mtok must be a number of dollars, got True"),
        ({"input_mtok": 1, "output_mtok": float("nan")}, "output_mtok must be finite, got nan"),
        ({"input_mtok": 1, "output_mtok": "inf"}, "output_mtok must be finite, got 'inf'"),
        ({"input_mtok": None, "output_mtok": 1}, "Price needs input_mtok"),
        ({"input_mtok": 1, "output_mtok": None}, "Price needs output_mtok"),
        ({"input_mtok": 1, "output_mtok": 1, "cache_read_mtok": -0.1}, "cache_read_mtok must be >= 0, got -0.1"),
        ({"input_mtok": 1, "output_mtok": 1, "reasoning_mtok": [2]}, "reasoning_mtok must be a number of dollars"),
    ],
)
def test_invalid_price_values_are_configuration_errors(fields, message):
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Price(**fields)
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Budget(prices={"m": fields})


def test_price_values_are_exact_decimals():
    price = Price(input_mtok=0.1, output_mtok="0.3", cache_read_mtok=1)
    assert (price.input_mtok, price.output_mtok, price.cache_read_mtok) == (
        Decimal("0.1"), Decimal("0.3"), Decimal(1),
    )  # fmt: skip
    assert price.cache_write_mtok is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (5, "price for 'm' must be a Price or a mapping, got 5"),
        ({"input_mtok": 1}, "price for 'm': "),
        ({"input_mtok": 1, "output_mtok": 1, "inptu_mtok": 2}, "price for 'm': "),
    ],
)
def test_malformed_overrides_are_configuration_errors(override, message):
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        PriceTable({"m": override})


def test_the_unpriced_refusal_names_the_level_with_the_usd_limit():
    tenant = Budget(Limits(max_cost_usd=5), name="tenant")
    run = Budget(Limits(max_llm_calls=9), name="run", parent=tenant)
    with pytest.raises(BudgetExceeded, match="budget 'tenant' has a USD limit") as info:
        run.reserve(model="budgetary-test-finetune", prompt_tokens=10, max_output_tokens=10)
    assert info.value.budget == "tenant"
    solo = Budget(Limits(), name="solo")
    solo.agent("writer", max_cost_usd=1)
    with pytest.raises(BudgetExceeded, match="agent 'writer' has a USD allocation"):
        solo.reserve("writer", model="budgetary-test-finetune", prompt_tokens=10, max_output_tokens=10)


def test_a_call_without_a_model_under_a_usd_cap_is_told_to_name_it():
    budget = Budget(Limits(max_cost_usd=5), prices={"my-model": Price(input_mtok=1, output_mtok=1)})
    with pytest.raises(BudgetExceeded, match=re.escape("Name the model the call uses (model=...)")):
        budget.reserve(prompt_tokens=10, max_output_tokens=10)


@pytest.mark.parametrize(
    "billed", ["gpt-4o-mini-2024-07-18", "openai/gpt-4o-mini", "gpt-4o-mini-latest", "gpt-4o-mini@20240718"]
)
def test_an_override_prices_the_dated_name_the_provider_bills_under(billed):
    # The hold uses the user's price for the name asked for; the settle, under the billed name, must too.
    budget = Budget(Limits(max_cost_usd=100), prices={"gpt-4o-mini": Price(input_mtok=100, output_mtok=100)})
    with budget.llm_call(model="gpt-4o-mini", prompt_tokens=1000, max_output_tokens=1000) as call:
        entry = call.settle(Usage(input_tokens=1000, output_tokens=1000), model=billed)
    assert entry.cost_usd == Decimal("0.2")
