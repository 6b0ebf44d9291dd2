"""SPEC §1: `Usage`, its validation, and the normaliser for each provider's shape.

Expected values follow each provider's documented convention (which counts
include which), never what the code happens to return.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from budgetary import Usage
from budgetary.core.errors import UsageError
from budgetary.core.usage import coerce_cost, coerce_count

MAX = 2**63 - 1


# -- LangChain ---------------------------------------------------------------------------


def test_langchain_usage_metadata_keeps_cache_and_reasoning_details():
    # The example from langchain-core's UsageMetadata docstring: details are parts of the totals.
    metadata = {
        "input_tokens": 350,
        "output_tokens": 240,
        "total_tokens": 590,
        "input_token_details": {"audio": 10, "cache_creation": 200, "cache_read": 100},
        "output_token_details": {"audio": 10, "reasoning": 200},
    }
    expected = Usage(
        input_tokens=350, output_tokens=240, cache_read_tokens=100, cache_write_tokens=200, reasoning_tokens=200
    )
    assert Usage.from_langchain(metadata) == expected
    assert Usage.from_provider(metadata) == expected
    assert expected.total_tokens == 590


def test_langchain_usage_metadata_without_details():
    usage = Usage.from_provider({"input_tokens": 7, "output_tokens": 3, "total_tokens": 10})
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.reasoning_tokens) == (7, 3, 0, 0)


def test_an_ai_message_is_read_through_its_usage_metadata():
    class Message:  # AIMessage-like, without model_dump
        content = "hi"

        def __init__(self) -> None:
            self.usage_metadata = {"input_tokens": 11, "output_tokens": 4, "total_tokens": 15}

    assert Usage.from_provider(Message()) == Usage(input_tokens=11, output_tokens=4)


def test_a_real_langchain_ai_message_is_read_through_its_usage_metadata():
    messages = pytest.importorskip("langchain_core.messages")
    message = messages.AIMessage(
        content="hi",
        usage_metadata={
            "input_tokens": 120,
            "output_tokens": 30,
            "total_tokens": 150,
            "input_token_details": {"cache_read": 100},
        },
    )
    # An AIMessage is itself a pydantic model: its model_dump() is the message, not the usage.
    assert Usage.from_provider(message) == Usage(input_tokens=120, output_tokens=30, cache_read_tokens=100)


# -- OpenAI ------------------------------------------------------------------------------


def test_openai_chat_usage_cached_and_reasoning_tokens_are_parts():
    usage = {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 192,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    expected = Usage(input_tokens=2006, output_tokens=300, cache_read_tokens=1920, reasoning_tokens=192)
    assert Usage.from_openai(usage) == expected
    assert Usage.from_provider(usage) == expected
    assert expected.total_tokens == usage["total_tokens"]


def test_openai_chat_usage_with_null_details():
    usage = {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10, "prompt_tokens_details": None}
    assert Usage.from_provider(usage) == Usage(input_tokens=9, output_tokens=1)


def test_openai_responses_usage():
    usage = {
        "input_tokens": 328,
        "input_tokens_details": {"cached_tokens": 128},
        "output_tokens": 52,
        "output_tokens_details": {"reasoning_tokens": 20},
        "total_tokens": 380,
    }
    expected = Usage(input_tokens=328, output_tokens=52, cache_read_tokens=128, reasoning_tokens=20)
    assert Usage.from_openai(usage) == expected
    assert Usage.from_provider(usage) == expected


def test_a_provider_reported_cost_is_kept_exactly():
    # OpenRouter reports the billed cost beside the tokens.
    usage = Usage.from_provider({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "cost": 0.00042})
    assert usage.cost_usd == Decimal("0.00042")


# -- Anthropic ---------------------------------------------------------------------------


def test_anthropic_cache_tokens_reported_beside_input_are_folded_in():
    usage = {
        "input_tokens": 50,
        "cache_creation_input_tokens": 1000,
        "cache_read_input_tokens": 2000,
        "output_tokens": 300,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 0},
        "server_tool_use": None,
        "service_tier": "standard",
    }
    expected = Usage(input_tokens=3050, output_tokens=300, cache_read_tokens=2000, cache_write_tokens=1000)
    assert Usage.from_anthropic(usage) == expected
    assert Usage.from_provider(usage) == expected
    assert expected.total_tokens == 3350


def test_anthropic_usage_without_cache_is_detected():
    assert Usage.from_provider({"input_tokens": 12, "output_tokens": 8}) == Usage(input_tokens=12, output_tokens=8)


def test_anthropic_cache_fold_saturates():
    usage = Usage.from_anthropic(
        {"input_tokens": 1, "output_tokens": 1, "cache_read_input_tokens": MAX, "cache_creation_input_tokens": MAX}
    )
    assert usage.input_tokens == MAX
    assert usage.cache_read_tokens + usage.cache_write_tokens <= usage.input_tokens


# -- Gemini ------------------------------------------------------------------------------

GEMINI_SNAKE = {
    "prompt_token_count": 1200,
    "candidates_token_count": 300,
    "thoughts_token_count": 500,
    "cached_content_token_count": 1000,
    "tool_use_prompt_token_count": 40,
    "total_token_count": 2040,  # Gemini's total counts prompt + candidates + thoughts + tool-use prompt
}
GEMINI_EXPECTED = Usage(input_tokens=1240, output_tokens=800, cache_read_tokens=1000, reasoning_tokens=500)


def test_gemini_snake_case_thinking_is_output_and_tool_use_prompt_is_input():
    assert Usage.from_gemini(GEMINI_SNAKE) == GEMINI_EXPECTED
    assert Usage.from_provider(GEMINI_SNAKE) == GEMINI_EXPECTED
    assert GEMINI_EXPECTED.total_tokens == GEMINI_SNAKE["total_token_count"]


def test_gemini_camel_case():
    camel = {
        "promptTokenCount": 1200,
        "candidatesTokenCount": 300,
        "thoughtsTokenCount": 500,
        "cachedContentTokenCount": 1000,
        "toolUsePromptTokenCount": 40,
        "totalTokenCount": 2040,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1200}],
    }
    assert Usage.from_gemini(camel) == GEMINI_EXPECTED
    assert Usage.from_provider(camel) == GEMINI_EXPECTED


def test_gemini_without_candidates_counts_no_output():
    # Gemini omits zero counts, e.g. when a response was blocked.
    assert Usage.from_provider({"prompt_token_count": 25, "total_token_count": 25}) == Usage(input_tokens=25)


def test_a_gemini_response_object_is_read_through_its_usage_metadata():
    class Metadata:
        def model_dump(self) -> dict[str, Any]:
            return dict(GEMINI_SNAKE)

    class Response:
        usage_metadata = Metadata()

        def model_dump(self) -> dict[str, Any]:
            return {"candidates": [], "usage_metadata": dict(GEMINI_SNAKE)}

    assert Usage.from_provider(Response()) == GEMINI_EXPECTED


# -- LiteLLM -----------------------------------------------------------------------------

# LiteLLM's Anthropic transformation adds cache reads and writes to prompt_tokens and also
# keeps them beside it (cache_read_input_tokens, cache_creation_input_tokens).
LITELLM_ANTHROPIC = {
    "prompt_tokens": 3050,
    "completion_tokens": 300,
    "total_tokens": 3350,
    "prompt_tokens_details": {"cached_tokens": 2000},
    "completion_tokens_details": None,
    "cache_creation_input_tokens": 1000,
    "cache_read_input_tokens": 2000,
}
LITELLM_EXPECTED = Usage(input_tokens=3050, output_tokens=300, cache_read_tokens=2000, cache_write_tokens=1000)


def test_litellm_usage_dict():
    assert Usage.from_litellm(LITELLM_ANTHROPIC) == LITELLM_EXPECTED
    assert Usage.from_provider(LITELLM_ANTHROPIC) == LITELLM_EXPECTED


def test_litellm_usage_object_with_model_dump():
    class LiteLLMUsage:
        def model_dump(self) -> dict[str, Any]:
            return dict(LITELLM_ANTHROPIC)

    assert Usage.from_litellm(LiteLLMUsage()) == LITELLM_EXPECTED
    assert Usage.from_provider(LiteLLMUsage()) == LITELLM_EXPECTED


def test_litellm_cache_read_beside_prompt_tokens_without_details():
    usage = {"prompt_tokens": 3050, "completion_tokens": 300, "total_tokens": 3350, "cache_read_input_tokens": 2000}
    assert Usage.from_provider(usage).cache_read_tokens == 2000


# -- CrewAI ------------------------------------------------------------------------------


def test_crewai_usage_metrics_dict():
    metrics = {
        "total_tokens": 1500,
        "prompt_tokens": 1200,
        "cached_prompt_tokens": 800,
        "completion_tokens": 300,
        "reasoning_tokens": 100,
        "cache_creation_tokens": 50,
        "successful_requests": 1,
    }
    expected = Usage(
        input_tokens=1200, output_tokens=300, cache_read_tokens=800, cache_write_tokens=50, reasoning_tokens=100
    )
    assert Usage.from_crewai(metrics) == expected
    assert Usage.from_provider(metrics) == expected


def test_crewai_usage_metrics_object_with_model_dump():
    class UsageMetrics:
        def model_dump(self) -> dict[str, Any]:
            return {"total_tokens": 30, "prompt_tokens": 20, "cached_prompt_tokens": 5, "completion_tokens": 10,
                    "reasoning_tokens": 0, "cache_creation_tokens": 0, "successful_requests": 2}  # fmt: skip

    assert Usage.from_provider(UsageMetrics()) == Usage(input_tokens=20, output_tokens=10, cache_read_tokens=5)


@pytest.mark.parametrize(
    ("event_usage", "expected"),
    [
        pytest.param(  # CrewAI's native OpenAI provider
            {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500, "cached_prompt_tokens": 800,
             "reasoning_tokens": 100},
            Usage(input_tokens=1200, output_tokens=300, cache_read_tokens=800, reasoning_tokens=100),
            id="openai",
        ),
        pytest.param(  # native Anthropic: cache tokens already folded into input_tokens
            {"input_tokens": 3050, "output_tokens": 300, "total_tokens": 3350, "cached_prompt_tokens": 2000,
             "cache_creation_tokens": 1000},
            Usage(input_tokens=3050, output_tokens=300, cache_read_tokens=2000, cache_write_tokens=1000),
            id="anthropic",
        ),
        pytest.param(  # native Gemini: completion_tokens = candidates + thoughts
            {"prompt_token_count": 1200, "candidates_token_count": 300, "completion_tokens": 800,
             "total_token_count": 2000, "total_tokens": 2000, "cached_prompt_tokens": 1000, "reasoning_tokens": 500},
            Usage(input_tokens=1200, output_tokens=800, cache_read_tokens=1000, reasoning_tokens=500),
            id="gemini",
        ),
        pytest.param(  # LiteLLM through CrewAI's _usage_to_dict: LiteLLM's dump plus flat parts
            {**LITELLM_ANTHROPIC, "cached_prompt_tokens": 2000, "cache_creation_tokens": 1000},
            LITELLM_EXPECTED,
            id="litellm",
        ),
        pytest.param(  # raw Anthropic shape reaching CrewAI's aggregation: cache beside input_tokens
            {"input_tokens": 50, "output_tokens": 300, "cache_read_input_tokens": 2000,
             "cache_creation_input_tokens": 1000, "cached_prompt_tokens": 2000, "cache_creation_tokens": 1000},
            Usage(input_tokens=3050, output_tokens=300, cache_read_tokens=2000, cache_write_tokens=1000),
            id="raw-anthropic",
        ),
    ],
)  # fmt: skip
def test_crewai_llm_call_completed_event_usage(event_usage, expected):
    assert Usage.from_provider(event_usage) == expected


def test_crewai_usage_without_input_names_the_key():
    with pytest.raises(
        UsageError, match=re.escape("usage is missing 'prompt_tokens' (got keys ['cached_prompt_tokens'])")
    ):
        Usage.from_crewai({"cached_prompt_tokens": 3})


# -- totals --------------------------------------------------------------------------------

counts = st.integers(min_value=0, max_value=2**70)


@given(counts, counts)
def test_total_is_always_input_plus_output_saturated(input_tokens, output_tokens):
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    assert usage.total_tokens == min(min(input_tokens, MAX) + min(output_tokens, MAX), MAX)


def test_a_matching_total_is_accepted():
    assert Usage(input_tokens=3, output_tokens=4, total_tokens=7).total_tokens == 7


def test_a_conflicting_total_raises():
    with pytest.raises(UsageError, match=re.escape("total_tokens must equal input_tokens + output_tokens (7), got 8")):
        Usage(input_tokens=3, output_tokens=4, total_tokens=8)


def test_a_negative_total_raises():
    with pytest.raises(UsageError, match=re.escape("total_tokens must be >= 0, got -1")):
        Usage(input_tokens=0, output_tokens=0, total_tokens=-1)


# -- validation ----------------------------------------------------------------------------

FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "{f} must be >= 0, got -1"),
        (float("nan"), "{f} must be a whole number of tokens, got nan"),
        (float("inf"), "{f} must be a whole number of tokens, got inf"),
        (12.5, "{f} must be a whole number of tokens, got 12.5"),
        (True, "{f} must be an integer token count, got True"),
        ("12.5", "{f} must be an integer token count, got '12.5'"),
        ("abc", "{f} must be an integer token count, got 'abc'"),
        ("²", "{f} must be an integer token count, got '²'"),
        ("+-5", "{f} must be an integer token count, got '+-5'"),
        ("-3", "{f} must be >= 0, got -3"),
        (None, "{f} must be an integer token count, got None"),
        ([1], "{f} must be an integer token count, got list [1]"),
    ],
)
def test_bad_token_values_raise_a_value_error_naming_the_field(field, value, message):
    # Parts need a whole to belong to, so give the whole room.
    others = {"input_tokens": 100, "output_tokens": 100} if field not in ("input_tokens", "output_tokens") else {}
    with pytest.raises(UsageError, match=re.escape(message.format(f=field))) as info:
        Usage(**others, **{field: value})
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prompt_tokens": "abc", "completion_tokens": 1}, "prompt_tokens must be an integer token count, got 'abc'"),
        ({"prompt_tokens": 1, "completion_tokens": -2}, "completion_tokens must be >= 0, got -2"),
        ({"prompt_tokens": 1, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": float("nan")}},
         "cached_tokens must be a whole number of tokens, got nan"),
        ({"completion_tokens": 5}, "usage is missing 'prompt_tokens' (got keys ['completion_tokens'])"),
        ({"prompt_tokens": None, "completion_tokens": 5},
         "usage is missing 'prompt_tokens' (got keys ['completion_tokens', 'prompt_tokens'])"),
        ({"input_tokens": 5, "cache_read_input_tokens": True},
         "cache_read_input_tokens must be an integer token count"),
        ({"output_tokens": 5}, "usage is missing 'input_tokens' (got keys ['output_tokens'])"),
        ({"prompt_token_count": 5, "thoughts_token_count": "x"}, "thoughts_token_count must be an integer token count"),
        ({"input_tokens": 1, "output_tokens": 1, "total_tokens": 2, "input_token_details": 7},
         "input_token_details must be a mapping, got int"),
    ],
)  # fmt: skip
def test_bad_provider_values_raise_naming_the_field(data, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        Usage.from_provider(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "usage is missing (got None)"),
        (42, "cannot read token usage from int"),
        ("12 tokens", "cannot read token usage from str"),
    ],
)
def test_unreadable_usage_raises(data, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        Usage.from_provider(data)


def test_a_normaliser_given_a_non_mapping_raises():
    with pytest.raises(UsageError, match=re.escape("usage must be a mapping, got list")):
        Usage.from_openai([1, 2])


@pytest.mark.parametrize(
    ("value", "expected"),
    [("42", 42), (" 42 ", 42), ("+7", 7), ("0", 0), (12.0, 12), (0.0, 0), (Decimal("3"), 3), (Decimal("3.0"), 3)],
)
def test_integer_strings_and_integral_numbers_are_accepted(value, expected):
    assert coerce_count(value, "input_tokens") == expected
    assert Usage(input_tokens=value).input_tokens == expected


def test_int_subclasses_are_plain_ints():
    class Count(int):
        pass

    usage = Usage(input_tokens=Count(5))
    assert usage.input_tokens == 5 and type(usage.input_tokens) is int


def test_provider_strings_are_accepted():
    assert Usage.from_provider({"prompt_tokens": "10", "completion_tokens": 2.0}) == Usage(
        input_tokens=10, output_tokens=2
    )


@pytest.mark.parametrize("huge", [2**63, 2**100, "99999999999999999999999", 1e30, Decimal("1e40")])
def test_huge_values_saturate(huge):
    usage = Usage(input_tokens=huge, output_tokens=5)
    assert usage.input_tokens == MAX
    assert usage.total_tokens == MAX


def test_huge_provider_values_saturate():
    usage = Usage.from_provider({"prompt_tokens": 2**64, "completion_tokens": 2**64, "total_tokens": 2**65})
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (MAX, MAX, MAX)


def test_cache_parts_cannot_exceed_input():
    with pytest.raises(
        UsageError, match=re.escape("cache_read_tokens + cache_write_tokens (6 + 5) cannot exceed input_tokens (10)")
    ):
        Usage(input_tokens=10, cache_read_tokens=6, cache_write_tokens=5)


def test_reasoning_cannot_exceed_output():
    with pytest.raises(UsageError, match=re.escape("reasoning_tokens (4) cannot exceed output_tokens (3)")):
        Usage(output_tokens=3, reasoning_tokens=4)


def test_a_provider_reporting_more_cache_than_input_is_refused():
    with pytest.raises(UsageError, match=re.escape("cannot exceed input_tokens (10)")):
        Usage.from_provider(
            {"prompt_tokens": 10, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 11}}
        )


# -- addition ------------------------------------------------------------------------------


@st.composite
def usages(draw: Any, max_value: int = 10**12) -> Usage:
    input_tokens = draw(st.integers(0, max_value))
    output_tokens = draw(st.integers(0, max_value))
    cache_read = draw(st.integers(0, input_tokens))
    cache_write = draw(st.integers(0, input_tokens - cache_read))
    reasoning = draw(st.integers(0, output_tokens))
    cost = draw(st.none() | st.decimals(min_value=0, max_value=10**6, places=12))
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
        cost_usd=cost,
    )


@given(usages(), usages())
def test_addition_sums_every_field(a, b):
    total = a + b
    for name in (*FIELDS, "total_tokens"):
        assert getattr(total, name) == getattr(a, name) + getattr(b, name)
    if a.cost_usd is None or b.cost_usd is None:
        assert total.cost_usd is None
    else:
        assert total.cost_usd == a.cost_usd + b.cost_usd


@given(usages(max_value=MAX), usages(max_value=MAX))
def test_addition_saturates_and_never_raises(a, b):
    total = a + b
    for name in ("input_tokens", "output_tokens", "cache_read_tokens", "reasoning_tokens", "total_tokens"):
        assert getattr(total, name) == min(getattr(a, name) + getattr(b, name), MAX)
    # When the input saturates, the write part is clamped so that the parts still fit in it.
    assert total.cache_write_tokens <= min(a.cache_write_tokens + b.cache_write_tokens, MAX)
    assert total.cache_read_tokens + total.cache_write_tokens <= total.input_tokens
    assert total.reasoning_tokens <= total.output_tokens


def test_addition_saturates_cache_parts_of_a_saturated_input():
    half = Usage(input_tokens=MAX, cache_read_tokens=MAX // 2 + 1, cache_write_tokens=MAX // 2 - 1)
    total = half + half
    assert total.input_tokens == MAX and total.total_tokens == MAX
    assert total.cache_read_tokens == MAX
    assert total.cache_write_tokens == 0


def test_cost_is_unknown_if_either_side_is():
    known = Usage(input_tokens=1, cost_usd="0.1")
    unknown = Usage(input_tokens=1)
    assert (known + unknown).cost_usd is None
    assert (unknown + known).cost_usd is None
    assert (known + known).cost_usd == Decimal("0.2")


def test_adding_something_else_is_a_type_error():
    with pytest.raises(TypeError):
        Usage() + 1  # type: ignore[operator]


# -- cost ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.1", Decimal("0.1")),
        (0.1, Decimal("0.1")),  # what was written, not the binary double 0.1000000000000000055...
        (2, Decimal(2)),
        (Decimal("0.000000000001"), Decimal("1E-12")),
        (" 1.50 ", Decimal("1.50")),
        (1e-12, Decimal("1E-12")),
    ],
)
def test_cost_coercion_is_exact(value, expected):
    usage = Usage(input_tokens=1, cost_usd=value)
    assert type(usage.cost_usd) is Decimal
    assert usage.cost_usd == expected
    assert coerce_cost(value) == expected


def test_float_cost_keeps_its_written_value():
    assert Usage(cost_usd=0.1).cost_usd + Usage(cost_usd=0.2).cost_usd == Decimal("0.3")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "cost_usd must be a number of dollars, got 'abc'"),
        (True, "cost_usd must be a number of dollars, got True"),
        ([1], "cost_usd must be a number of dollars, got list [1]"),
        (-0.5, "cost_usd must be >= 0, got -0.5"),
        (Decimal("-1"), "cost_usd must be >= 0, got Decimal('-1')"),
        (float("nan"), "cost_usd must be finite, got nan"),
        ("Infinity", "cost_usd must be finite, got 'Infinity'"),
        (Decimal("NaN"), "cost_usd must be finite, got Decimal('NaN')"),
    ],
)
def test_bad_costs_raise_naming_the_field(value, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        Usage(input_tokens=1, cost_usd=value)


def test_with_cost_sets_the_cost_and_keeps_the_tokens():
    usage = Usage(input_tokens=5, output_tokens=3, cache_read_tokens=2, reasoning_tokens=1)
    priced = usage.with_cost("0.25")
    assert priced.cost_usd == Decimal("0.25")
    assert priced == Usage(
        input_tokens=5, output_tokens=3, cache_read_tokens=2, reasoning_tokens=1, cost_usd=Decimal("0.25")
    )
    assert usage.cost_usd is None  # values are immutable
    assert priced.with_cost(None).cost_usd is None


@pytest.mark.parametrize("bad", [Decimal("NaN"), Decimal("-1"), Decimal("Infinity")])
def test_with_cost_refuses_bad_decimals(bad):
    with pytest.raises(UsageError, match=re.escape("cost_usd must be")):
        Usage(input_tokens=1).with_cost(bad)


def test_replace_recomputes_the_total_and_copies_keep_every_field():
    import copy
    import dataclasses
    import pickle

    usage = Usage(input_tokens=10, output_tokens=5, cache_read_tokens=3, cost_usd=Decimal("0.1"))
    changed = dataclasses.replace(usage, output_tokens=7)
    assert (changed.total_tokens, changed.cache_read_tokens, changed.cost_usd) == (17, 3, Decimal("0.1"))
    assert pickle.loads(pickle.dumps(usage)) == usage == copy.deepcopy(usage)
    with pytest.raises(UsageError):
        dataclasses.replace(usage, reasoning_tokens=9)  # more reasoning than output: validated again
