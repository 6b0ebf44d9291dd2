"""SPEC §10 (estimation): tiktoken counts, the byte upper bound, the offline fallback, and
how `Budget.reserve` uses the cheap bound first.

Expected counts are computed here with ``tiktoken.get_encoding`` directly, plus the
documented framing constants.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetary import Budget, BudgetExceeded, Limits, UsageError
from budgetary.core import estimator
from budgetary.core.estimator import (
    DEFAULT_ENCODING,
    FRAMING_PER_MESSAGE,
    FRAMING_PER_PROMPT,
    EstimationWarning,
    count_tokens,
    encoding_name,
    estimate_text_tokens,
    message_texts,
    upper_bound,
)
from tests.conftest import tiktoken_cache_present

needs_cache = pytest.mark.skipif(
    not tiktoken_cache_present(),
    reason="tiktoken encoding files are not available offline (set TIKTOKEN_CACHE_DIR to a folder holding them)",
)


def tokens(text: str, encoding: str = "o200k_base") -> int:
    import tiktoken

    return len(tiktoken.get_encoding(encoding).encode(text, disallowed_special=()))


def framing(n_messages: int) -> int:
    return FRAMING_PER_MESSAGE * n_messages + FRAMING_PER_PROMPT


class Message:
    """A LangChain-like message: ``.content`` and optional ``.tool_calls``."""

    def __init__(self, content: Any, tool_calls: list[dict[str, Any]] | None = None) -> None:
        self.content = content
        self.tool_calls = tool_calls or []


# -- model -> encoding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("openai/gpt-4", "cl100k_base"),  # the provider prefix is stripped
        ("openrouter/openai/gpt-4", "cl100k_base"),
        ("claude-sonnet-4-5", "o200k_base"),  # tiktoken does not know it: the documented default
        ("gemini-2.5-pro", "o200k_base"),
        ("anthropic/claude-3-5-haiku", "o200k_base"),
        ("", "o200k_base"),
        (None, "o200k_base"),
    ],
)
def test_models_map_to_their_encoding(model, encoding):
    assert encoding_name(model) == encoding


def test_the_documented_default_encoding():
    assert DEFAULT_ENCODING == "o200k_base"


# -- exact counts ------------------------------------------------------------------------------


@needs_cache
def test_a_known_count():
    assert count_tokens("hello world", "gpt-4o") == 2
    assert count_tokens("hello world", "gpt-4") == 2


@needs_cache
@pytest.mark.parametrize(
    ("model", "encoding"),
    [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base"), ("openai/gpt-4", "cl100k_base"),
     ("claude-sonnet-4-5", "o200k_base")],
)  # fmt: skip
def test_a_plain_string_is_counted_without_framing(model, encoding):
    text = "Otters hold hands while they sleep, so they do not drift apart. Ünïcødé and 漢字 too."
    assert count_tokens(text, model) == tokens(text, encoding)
    assert tokens(text, "o200k_base") != tokens(text, "cl100k_base")  # the encodings can be told apart


@needs_cache
def test_chat_messages_are_counted_with_framing():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    expected = tokens("Be brief.") + tokens("Why is the sky blue?") + framing(2)
    assert count_tokens(messages, "gpt-4o-mini") == expected


@needs_cache
def test_special_token_text_is_counted_as_text():
    assert count_tokens("<|endoftext|>", "gpt-4") == tokens("<|endoftext|>", "cl100k_base") > 1


@needs_cache
def test_message_objects_and_nested_lists_are_counted():
    # LangChain's on_chat_model_start passes list[list[BaseMessage]].
    batch = [[Message("first question"), Message("second question")]]
    assert count_tokens(batch, "gpt-4o") == tokens("first question") + tokens("second question") + framing(2)
    assert count_tokens(Message("alone"), "gpt-4o") == tokens("alone") + framing(1)
    assert count_tokens({"role": "user", "content": "alone"}, "gpt-4o") == tokens("alone") + framing(1)


@needs_cache
def test_content_parts_count_their_text_and_over_count_other_parts():
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Describe this picture."}]}]
    with_image = [{"role": "user", "content": [
        {"type": "text", "text": "Describe this picture."},
        {"type": "image_url", "image_url": {"url": "https://example.com/otter.png"}},
    ]}]  # fmt: skip
    assert count_tokens(text_only, "gpt-4o") == tokens("Describe this picture.") + framing(1)
    # The image part is not free: it contributes (at least) its JSON text.
    assert count_tokens(with_image, "gpt-4o") >= (
        tokens("Describe this picture.") + tokens('"https://example.com/otter.png"') + framing(1)
    )


@needs_cache
def test_tool_calls_are_counted():
    call = {"name": "search", "args": {"query": "otters sleeping"}, "id": "call_1"}
    bare = count_tokens([{"role": "assistant", "content": ""}], "gpt-4o")
    as_dict = count_tokens([{"role": "assistant", "content": "", "tool_calls": [call]}], "gpt-4o")
    as_object = count_tokens([Message("", [call])], "gpt-4o")
    assert as_dict > bare + tokens("otters sleeping")
    assert as_object == as_dict


@needs_cache
def test_plain_texts_are_counted_without_framing():
    assert estimate_text_tokens(["Otters sleep.", "They hold hands."], "gpt-4") == (
        tokens("Otters sleep.", "cl100k_base") + tokens("They hold hands.", "cl100k_base")
    )
    assert estimate_text_tokens([], "gpt-4o") == 0


def test_message_texts_reads_every_shape():
    call = {"name": "search", "args": {"q": "otters"}}
    texts = message_texts([
        "a plain string",
        [Message("from a LangChain message"), Message(None, [call])],
        {"role": "user", "content": [{"type": "text", "text": "a part"}, "a bare part",
                                     {"type": "image_url", "image_url": "data:x"}]},
        {"role": "user", "content": None},
    ])  # fmt: skip
    assert texts[0] == "a plain string"
    assert texts[1] == "from a LangChain message"
    assert texts[2] == ""
    assert '"search"' in texts[3] and '"otters"' in texts[3]
    assert "a part" in texts[4] and "a bare part" in texts[4] and "image_url" in texts[4]
    assert texts[5] == ""
    assert len(texts) == 6
    assert message_texts(None) == []
    assert message_texts("just text") == ["just text"]


def test_empty_prompts():
    assert upper_bound(None) == 0
    assert upper_bound([]) == 0
    assert upper_bound("") == 0
    # An empty chat message still costs its framing.
    assert upper_bound([{"role": "user", "content": ""}]) == framing(1)


# -- the byte bound ----------------------------------------------------------------------------


def test_the_bound_is_utf8_bytes_plus_framing():
    assert upper_bound("héllo") == len("héllo".encode())
    messages = [{"role": "user", "content": "漢字"}, {"role": "assistant", "content": "ok"}]
    assert upper_bound(messages) == len("漢字".encode()) + 2 + framing(2)


def test_a_lone_surrogate_does_not_crash_the_bound():
    # A broken JSON escape ("\\ud83d") yields a lone surrogate; tiktoken accepts it, so must the bound.
    assert upper_bound("a\ud83db") == 1 + 3 + 1
    assert upper_bound([{"role": "user", "content": "\udfff"}]) == 3 + framing(1)


@needs_cache
def test_a_lone_surrogate_is_counted_within_the_bound():
    assert 1 <= count_tokens("a\ud83db", "gpt-4o") <= upper_bound("a\ud83db")


# Any code point, lone surrogates included (hypothesis leaves them out unless asked).
any_text = st.text(alphabet=st.characters() | st.characters(whitelist_categories=["Cs"]), max_size=200)
part = st.one_of(
    any_text,
    st.builds(lambda t: {"type": "text", "text": t}, any_text),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, any_text),
)
chat_message = st.one_of(
    st.builds(lambda r, c: {"role": r, "content": c}, st.sampled_from(["system", "user", "assistant"]), any_text),
    st.builds(lambda c: {"role": "user", "content": c}, st.lists(part, max_size=3)),
    st.builds(Message, any_text),
)


@needs_cache
@settings(max_examples=150, deadline=None)
@given(text=any_text, model=st.sampled_from(["gpt-4o", "gpt-4", "claude-sonnet-4-5"]))
def test_the_bound_is_never_below_the_exact_count_for_any_text(text, model):
    assert upper_bound(text) >= count_tokens(text, model)


@needs_cache
@settings(max_examples=100, deadline=None)
@given(messages=st.lists(chat_message, max_size=5), model=st.sampled_from(["gpt-4o", "gpt-4"]))
def test_the_bound_is_never_below_the_exact_count_for_any_messages(messages, model):
    assert upper_bound(messages) >= count_tokens(messages, model)
    assert upper_bound([messages]) >= count_tokens([messages], model)


# -- the offline fallback ----------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """tiktoken cannot load any encoding; yields the names it was asked for."""
    import tiktoken

    asked: list[str] = []

    def unavailable(name: str) -> Any:
        asked.append(name)
        raise OSError("no network and no TIKTOKEN_CACHE_DIR")

    estimator._reset_for_tests()
    monkeypatch.setattr(tiktoken, "get_encoding", unavailable)
    yield asked
    estimator._reset_for_tests()


def test_offline_counts_fall_back_to_the_bound_and_warn_once(offline):
    prompt = [{"role": "user", "content": "What do otters eat?"}]
    message = (
        "tiktoken could not load the 'o200k_base' encoding (OSError('no network and no TIKTOKEN_CACHE_DIR')); "
        "prompt tokens are estimated by their UTF-8 length (an upper bound)."
    )
    with pytest.warns(EstimationWarning, match=re.escape(message)) as caught:
        first = count_tokens(prompt, "gpt-4o")
        again = count_tokens(prompt, "gpt-4o")
        other_model = count_tokens("Otters eat fish.", "gpt-4")  # another encoding, still offline
        text_estimate = estimate_text_tokens(["naïve"], "gpt-4o")
    assert sum(issubclass(w.category, EstimationWarning) for w in caught) == 1
    assert first == again == upper_bound(prompt) == len("What do otters eat?") + framing(1)
    assert other_model == len("Otters eat fish.")
    assert text_estimate == len("naïve".encode())
    assert offline == ["o200k_base", "cl100k_base"]  # each encoding is tried once, not on every call


@pytest.mark.parametrize("prompt", ["x", "漢", [{"role": "user", "content": ""}], [Message("hi")]])
def test_the_fallback_is_never_zero_for_a_non_empty_prompt(offline, prompt):
    with pytest.warns(EstimationWarning):
        count = count_tokens(prompt, "gpt-4o")
    assert count == upper_bound(prompt) >= 1


def test_an_unloadable_encoding_refuses_a_prompt_the_bound_cannot_fit(offline):
    # Offline, the exact count is the bound itself, so a prompt whose bound does not fit is refused.
    prompt = [{"role": "user", "content": "otter " * 200}]
    budget = Budget(Limits(max_total_tokens=upper_bound(prompt) + 99))
    with pytest.warns(EstimationWarning), pytest.raises(BudgetExceeded) as info:
        budget.reserve(messages=prompt, max_output_tokens=100)
    assert info.value.resource == "total_tokens"


# -- the cheap bound decides first (through Budget.reserve) -------------------------------------


@pytest.fixture
def encoder_loads(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """Spy on the estimator's encoder loader: every exact count goes through it."""
    calls: list[str | None] = []
    real = estimator._encoding_for

    def spy(model: str | None) -> Any:
        calls.append(model)
        return real(model)

    monkeypatch.setattr(estimator, "_encoding_for", spy)
    return calls


def test_far_from_the_limit_tiktoken_is_not_called(encoder_loads):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    budget = Budget(Limits(max_total_tokens=1_000_000))
    reservation = budget.reserve(model="gpt-4o", messages=prompt, max_output_tokens=100)
    assert encoder_loads == []
    # What is held is the bound itself.
    assert reservation.estimate.input_tokens == upper_bound(prompt)
    assert budget.snapshot().held_tokens == upper_bound(prompt) + 100
    reservation.release()


@needs_cache
def test_near_the_limit_tiktoken_decides_and_the_exact_count_is_held(encoder_loads):
    prompt = [{"role": "user", "content": "Otters hold hands while they sleep. " * 20}]
    exact = tokens("Otters hold hands while they sleep. " * 20) + framing(1)
    bound = upper_bound(prompt)
    limit = exact + 100 + 5
    assert bound + 100 > limit  # the bound alone would be refused
    budget = Budget(Limits(max_total_tokens=limit))

    reservation = budget.reserve(model="gpt-4o", messages=prompt, max_output_tokens=100)
    assert encoder_loads == ["gpt-4o"]
    assert reservation.estimate.input_tokens == exact
    assert budget.snapshot().held_tokens == exact + 100


@needs_cache
def test_near_the_limit_a_prompt_that_does_not_fit_even_exactly_is_refused(encoder_loads):
    prompt = [{"role": "user", "content": "Otters hold hands while they sleep. " * 20}]
    exact = tokens("Otters hold hands while they sleep. " * 20) + framing(1)
    budget = Budget(Limits(max_total_tokens=exact + 99))
    with pytest.raises(BudgetExceeded) as info:
        budget.reserve(model="gpt-4o", messages=prompt, max_output_tokens=100)
    assert encoder_loads == ["gpt-4o"]
    assert info.value.resource == "total_tokens"
    assert budget.snapshot().held_tokens == 0


@pytest.mark.parametrize("messages", [12345, 1.5, object()])
def test_messages_that_are_no_prompt_are_a_usage_error(messages: Any) -> None:
    # A ValueError naming the argument, not a TypeError from iterating an int.
    budget = Budget(Limits(max_total_tokens=1_000))
    with pytest.raises(UsageError, match=re.escape(f"messages must be a string, a message or a list of messages, "
                                                   f"got {type(messages).__name__}")):  # fmt: skip
        budget.reserve(messages=messages)
    assert budget.snapshot().held_tokens == 0


@needs_cache
def test_message_mappings_count_their_other_fields_not_nothing():
    # Reserve mode holds the byte bound; a message shape whose text is not under "content" (Gemini's
    # parts, OpenAI Responses items, a legacy function_call) must not be held as an empty prompt.
    text = "otters hold hands while they sleep " * 20
    shapes = [
        {"role": "user", "parts": [{"text": text}]},
        {"type": "function_call_output", "call_id": "call_1", "output": text},
        {"type": "function_call", "call_id": "call_1", "name": "search", "arguments": text},
        {"role": "assistant", "content": None, "function_call": {"name": "search", "arguments": text}},
    ]
    for message in shapes:
        exact = count_tokens([message], "gpt-4o")
        assert exact >= tokens(text) + framing(1), message
        assert upper_bound([message]) >= exact
    # A plain chat message counts as before: its content only.
    assert count_tokens([{"role": "user", "content": text}], "gpt-4o") == tokens(text) + framing(1)
