"""SPEC §1: `Usage` and the provider normalisers."""

from __future__ import annotations

import math
from decimal import Decimal
from types import MappingProxyType, SimpleNamespace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from budgetary import Usage, UsageError

MAX = 2**63 - 1


def test_langchain_usage_metadata():
    u = Usage.from_provider(
        {
            "input_tokens": 120,
            "output_tokens": 30,
            "total_tokens": 150,
            "input_token_details": {"cache_read": 100, "cache_creation": 10},
            "output_token_details": {"reasoning": 12},
        }
    )
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (120, 30, 150)
    assert (u.cache_read_tokens, u.cache_write_tokens, u.reasoning_tokens) == (100, 10, 12)


def test_openai_chat_and_responses_usage():
    chat = Usage.from_provider(
        {
            "prompt_tokens": 11,
            "completion_tokens": 7,
            "total_tokens": 18,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 3},
        }
    )
    assert (chat.input_tokens, chat.output_tokens, chat.cache_read_tokens, chat.reasoning_tokens) == (11, 7, 4, 3)
    responses = Usage.from_openai(
        {
            "input_tokens": 50,
            "output_tokens": 20,
            "total_tokens": 70,
            "input_tokens_details": {"cached_tokens": 30},
            "output_tokens_details": {"reasoning_tokens": 5},
        }
    )
    assert (responses.input_tokens, responses.cache_read_tokens, responses.reasoning_tokens) == (50, 30, 5)
    detected = Usage.from_provider(
        {"input_tokens": 50, "output_tokens": 20, "input_tokens_details": {"cached_tokens": 30}}
    )
    assert (detected.input_tokens, detected.cache_read_tokens) == (
        50,
        30,
    )  # detected as OpenAI responses, not Anthropic


def test_anthropic_cache_tokens_are_folded_into_input():
    u = Usage.from_provider(
        {"input_tokens": 20, "output_tokens": 9, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 30}
    )
    assert u.input_tokens == 150  # Anthropic reports cache tokens beside input_tokens
    assert (u.cache_read_tokens, u.cache_write_tokens, u.total_tokens) == (100, 30, 159)
    assert Usage.from_anthropic({"input_tokens": 3, "output_tokens": 4}).total_tokens == 7


def test_gemini_thinking_tokens_are_output_and_camel_case_works():
    snake = Usage.from_provider(
        {
            "prompt_token_count": 100,
            "candidates_token_count": 40,
            "thoughts_token_count": 25,
            "cached_content_token_count": 60,
            "total_token_count": 165,
        }
    )
    assert (snake.input_tokens, snake.output_tokens, snake.reasoning_tokens, snake.cache_read_tokens) == (
        100,
        65,
        25,
        60,
    )
    camel = Usage.from_gemini({"promptTokenCount": 100, "candidatesTokenCount": 40, "thoughtsTokenCount": 25,
                               "cachedContentTokenCount": 60, "toolUsePromptTokenCount": 5})  # fmt: skip
    assert camel.input_tokens == 105 and camel.output_tokens == 65


def test_litellm_objects_and_crewai_metrics():
    class LiteLLMUsage:
        def model_dump(self):
            return {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                    "prompt_tokens_details": {"cached_tokens": 6}}  # fmt: skip

    assert Usage.from_provider(LiteLLMUsage()).cache_read_tokens == 6
    crew = Usage.from_provider(
        {"prompt_tokens": 1000, "completion_tokens": 50, "cached_prompt_tokens": 600, "reasoning_tokens": 7}
    )
    assert (crew.input_tokens, crew.cache_read_tokens, crew.reasoning_tokens) == (1000, 600, 7)


def test_an_ai_message_is_read_through_its_usage_metadata():
    class Message:
        def __init__(self) -> None:
            self.usage_metadata = {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}

    assert Usage.from_provider(Message()).total_tokens == 5


def test_openai_sdk_cache_write_tokens_are_cache_writes():
    # openai>=2 names them cache_write_tokens in both APIs; they are priced above plain input.
    chat = Usage.from_provider(
        {"prompt_tokens": 200, "completion_tokens": 80, "prompt_tokens_details": {"cached_tokens": 100,
                                                                                  "cache_write_tokens": 50}}
    )  # fmt: skip
    responses = Usage.from_provider(
        {"input_tokens": 200, "output_tokens": 80,
         "input_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 50}}
    )  # fmt: skip
    for usage in (chat, responses):
        assert (usage.input_tokens, usage.cache_read_tokens, usage.cache_write_tokens) == (200, 100, 50)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (SimpleNamespace(prompt_tokens=11, completion_tokens=7,
                         prompt_tokens_details=SimpleNamespace(cached_tokens=4)), (11, 7, 4)),
        (SimpleNamespace(input_tokens=10, output_tokens=5, cache_read_input_tokens=20), (30, 5, 20)),
        (SimpleNamespace(prompt_token_count=9, candidates_token_count=3, thoughts_token_count=2,
                         cached_content_token_count=4), (9, 5, 4)),
        (SimpleNamespace(prompt_tokens=8, completion_tokens=2, cached_prompt_tokens=3,
                         successful_requests=1), (8, 2, 3)),
    ],
    ids=["openai", "anthropic", "gemini", "crewai"],
)  # fmt: skip
def test_usage_objects_without_model_dump_are_read_by_attribute(usage, expected):
    # Proto-plus messages (older Gemini SDKs) and plain SDK objects have no model_dump().
    for data in (usage, SimpleNamespace(usage=usage), SimpleNamespace(usage_metadata=usage)):
        u = Usage.from_provider(data)
        assert (u.input_tokens, u.output_tokens, u.cache_read_tokens) == expected


def test_an_object_with_no_usage_is_refused_clearly():
    with pytest.raises(UsageError, match="cannot read token usage from object"):
        Usage.from_provider(object())


def test_reported_cost_is_kept():
    assert Usage.from_openai({"prompt_tokens": 1, "completion_tokens": 1, "cost": "0.0021"}).cost_usd == Decimal(
        "0.0021"
    )


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"prompt_tokens": -1, "completion_tokens": 2}, "prompt_tokens"),
        ({"prompt_tokens": float("nan"), "completion_tokens": 2}, "prompt_tokens"),
        ({"prompt_tokens": True, "completion_tokens": 2}, "prompt_tokens"),
        ({"prompt_tokens": "12.5", "completion_tokens": 2}, "prompt_tokens"),
        ({"prompt_tokens": "abc", "completion_tokens": 2}, "prompt_tokens"),
        ({"prompt_tokens": 3}, "completion_tokens"),
        ({"input_tokens": 3, "output_tokens": None, "total_tokens": 3}, "output_tokens"),
        ({"candidates_token_count": 3, "total_token_count": 3}, "prompt_token_count"),  # Gemini, input missing
        ({"prompt_tokens": 3, "cached_prompt_tokens": 1}, "completion_tokens"),  # CrewAI, output missing
    ],
)
def test_bad_values_raise_a_value_error_naming_the_field(data, field):
    with pytest.raises(UsageError, match=field) as info:
        Usage.from_provider(data)
    assert isinstance(info.value, ValueError)


def test_integer_strings_and_integral_floats_are_accepted():
    assert Usage(input_tokens="12", output_tokens=3.0).total_tokens == 15  # type: ignore[arg-type]


def test_total_is_always_input_plus_output():
    assert Usage(input_tokens=2, output_tokens=3, total_tokens=5).total_tokens == 5
    with pytest.raises(UsageError, match="total_tokens"):
        Usage(input_tokens=2, output_tokens=3, total_tokens=9)


def test_parts_cannot_exceed_their_whole():
    with pytest.raises(UsageError, match="cache_read_tokens"):
        Usage(input_tokens=5, cache_read_tokens=6)
    with pytest.raises(UsageError, match="reasoning_tokens"):
        Usage(output_tokens=5, reasoning_tokens=6)


def test_huge_values_saturate():
    u = Usage(input_tokens=2**80, output_tokens=2**80)
    assert u.input_tokens == MAX and u.total_tokens == MAX
    assert (u + u).input_tokens == MAX


@given(
    st.tuples(st.integers(0, 10**12), st.integers(0, 10**12)),
    st.tuples(st.integers(0, 10**12), st.integers(0, 10**12)),
)
def test_addition_sums_every_field(a, b):
    x, y = Usage(input_tokens=a[0], output_tokens=a[1]), Usage(input_tokens=b[0], output_tokens=b[1])
    z = x + y
    assert z.input_tokens == a[0] + b[0] and z.total_tokens == sum(a) + sum(b)


def test_cost_addition_is_unknown_if_either_side_is():
    known = Usage(input_tokens=1, cost_usd="0.1")
    assert (known + known).cost_usd == Decimal("0.2")  # exact: not 0.2000000000000000111
    assert (known + Usage(input_tokens=1)).cost_usd is None


@pytest.mark.parametrize("bad", [-1, "x", float("inf"), math.nan, True])
def test_bad_costs_are_refused(bad):
    with pytest.raises(UsageError, match="cost_usd"):
        Usage(cost_usd=bad)


def test_crewai_native_provider_dicts():
    # What CrewAI 1.15's native providers pass to its usage tracking (read from their source).
    anthropic = Usage.from_provider(
        {"input_tokens": 150, "output_tokens": 20, "total_tokens": 170, "cached_prompt_tokens": 100,
         "cache_creation_tokens": 30}
    )  # fmt: skip
    assert (anthropic.input_tokens, anthropic.cache_read_tokens, anthropic.cache_write_tokens) == (150, 100, 30)
    gemini = Usage.from_provider(
        {"prompt_token_count": 100, "candidates_token_count": 15, "completion_tokens": 20, "total_token_count": 120,
         "total_tokens": 120, "cached_prompt_tokens": 30, "reasoning_tokens": 5}
    )  # fmt: skip
    assert (gemini.input_tokens, gemini.output_tokens, gemini.cache_read_tokens, gemini.reasoning_tokens) == (
        100, 20, 30, 5,
    )  # fmt: skip
    openai = Usage.from_provider(
        {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120, "cached_prompt_tokens": 40,
         "reasoning_tokens": 7}
    )  # fmt: skip
    assert (openai.cache_read_tokens, openai.reasoning_tokens) == (40, 7)
    with pytest.raises(UsageError, match="prompt_tokens"):
        Usage.from_crewai({"cached_prompt_tokens": 3})


_weird_count = st.one_of(
    st.integers(min_value=-3, max_value=2**64),
    st.none(),
    st.booleans(),
    st.sampled_from([1.0, 2.5, "7", "", Decimal(3)]),
)
# Mostly the plain counts providers report, sometimes anything else a report could hold.
_count = st.one_of(st.integers(0, 50), st.integers(0, 50), st.integers(0, 50), _weird_count)
_details = st.one_of(
    st.none(),
    st.just({}),
    st.dictionaries(st.sampled_from(["cache_read", "cache_creation", "reasoning", "audio"]), _count),
)


@settings(max_examples=2000)  # cheap examples; odd values are a small share of each
@example({"input_tokens": 5, "output_tokens": 3, "input_token_details": {"cache_read": False}})
@example({"input_tokens": 5, "output_tokens": 3, "input_token_details": {"cache_creation": ""}})
@example({"input_tokens": 5, "output_tokens": 3, "output_token_details": {"reasoning": None}})
@example({"input_tokens": 5, "output_tokens": 3, "output_token_details": {"reasoning": 4}})
@given(
    st.fixed_dictionaries(
        {"input_tokens": _count, "output_tokens": _count},
        optional={"total_tokens": _count, "input_token_details": _details, "output_token_details": _details},
    )
)
def test_langchain_reports_read_in_one_step_agree_with_the_general_reader(report):
    # A plain dict takes the one-step path; the same report behind a read-only mapping takes the general one.
    def read(data: object) -> object:
        try:
            return Usage.from_langchain(data)
        except UsageError as exc:
            return type(exc)

    assert read(report) == read(MappingProxyType(report))
