"""Prompt-token estimation: a cheap upper bound first, tiktoken only when it matters.

A byte-level BPE token is at least one byte, so the UTF-8 length of a prompt
plus the chat framing bounds its token count from above. The budget holds that
bound when there is room for it, and runs tiktoken only when the bound would
be refused.

Model names map to their tiktoken encoding; models tiktoken does not know
(Claude, Gemini, Llama, ...) use ``o200k_base``, which is close enough for a
pre-call *estimate* (the provider's reported usage is what is charged). If the
encoding cannot be loaded (no network and no ``TIKTOKEN_CACHE_DIR``), the upper
bound is used instead, with one `EstimationWarning`: conservative, never zero.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from budgetary.core.errors import UsageError

__all__ = [
    "DEFAULT_ENCODING",
    "EstimationWarning",
    "FRAMING_PER_MESSAGE",
    "FRAMING_PER_PROMPT",
    "count_tokens",
    "estimate_text_tokens",
    "message_texts",
    "upper_bound",
]

DEFAULT_ENCODING = "o200k_base"
"""Encoding for models tiktoken does not know."""
FRAMING_PER_MESSAGE = 4
"""Tokens of chat framing per message (role and separators), an upper bound for OpenAI's chat format."""
FRAMING_PER_PROMPT = 3
"""Tokens that prime the assistant's reply."""


class EstimationWarning(UserWarning):
    """tiktoken could not load an encoding; the byte-length upper bound is used instead."""


_lock = threading.Lock()
_encodings: dict[str, Any] = {}
_model_encoding: dict[str | None, str] = {}
_failed: set[str] = set()
_warned = False


_NO_FIELDS: dict[str, Any] = {}


def message_texts(messages: Any) -> list[str]:
    """The texts a prompt is made of: strings, chat dicts, LangChain messages, content parts.

    Non-text parts (images, tool-call arguments) and the other fields of a message
    mapping (Gemini's ``parts``, a Responses item's ``output``) contribute their
    text or JSON text, which over-counts rather than under-counts.
    """
    if messages is None:
        return []
    if isinstance(messages, str):
        return [messages]
    if type(messages) is not list and (isinstance(messages, Mapping) or hasattr(messages, "content")):
        messages = [messages]  # one message
    try:
        items = iter(messages)
    except TypeError:
        raise UsageError(
            f"messages must be a string, a message or a list of messages, got {type(messages).__name__}"
        ) from None
    texts: list[str] = []
    for message in items:
        if type(message) is not dict and "content" in (fields := getattr(message, "__dict__", _NO_FIELDS)):
            # A LangChain (pydantic) message, the usual item: read its fields without attribute lookups.
            content = fields["content"]
            texts.append(content if type(content) is str else _content_text(content))
            if fields.get("tool_calls"):
                texts.append(_json(fields["tool_calls"]))
        elif isinstance(message, str):
            texts.append(message)
        elif isinstance(message, (list, tuple)):  # LangChain passes list[list[BaseMessage]]
            texts.extend(message_texts(message))
        elif isinstance(message, Mapping):
            text = _content_text(message.get("content"))
            if len(message) > 2 or "content" not in message:
                # Other fields carry text too (Gemini's ``parts``, an OpenAI Responses item's ``output`` or
                # ``arguments``, a legacy ``function_call``): count their JSON rather than nothing.
                extra = [v if isinstance(v, str) else _json(v) for k, v in message.items()
                         if k not in _COUNTED_KEYS and v is not None]  # fmt: skip
                if extra:
                    text = "\n".join([text, *extra]) if text else "\n".join(extra)
            texts.append(text)
            if message.get("tool_calls"):
                texts.append(_json(message["tool_calls"]))
        else:
            texts.append(_content_text(getattr(message, "content", message)))
            # Read the instance dict: on a pydantic message without the field, getattr raises inside.
            fields = getattr(message, "__dict__", None)
            tool_calls = fields.get("tool_calls") if fields is not None else getattr(message, "tool_calls", None)
            if tool_calls:
                texts.append(_json(tool_calls))
    return texts


_COUNTED_KEYS = frozenset({"role", "content", "tool_calls"})
"""Fields of a message mapping counted on their own (any other field is counted as its text or JSON)."""


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                parts.append(_json(part))
        return "\n".join(parts)
    return str(content)


def _json(value: Any) -> str:
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def _framing(texts: list[str], chat: bool) -> int:
    return FRAMING_PER_MESSAGE * len(texts) + FRAMING_PER_PROMPT if chat and texts else 0


def upper_bound(messages: Any) -> int:
    """An upper bound on the prompt tokens of ``messages`` (UTF-8 bytes plus framing); no tiktoken."""
    # LangChain passes one list of messages per prompt: the usual single prompt skips a level.
    one_prompt = type(messages) is list and len(messages) == 1 and type(messages[0]) is list
    texts = message_texts(messages[0] if one_prompt else messages)
    total = 0
    for text in texts:
        # ASCII text is one byte per char; only encode when there may be multi-byte chars.
        total += len(text) if text.isascii() else _utf8_len(text)
    if texts and not isinstance(messages, str):
        total += FRAMING_PER_MESSAGE * len(texts) + FRAMING_PER_PROMPT  # `_framing`, inline
    return total


def _utf8_len(text: str) -> int:
    # A lone surrogate (from a broken JSON escape) must not crash the estimate: tiktoken replaces
    # it with U+FFFD (3 bytes); "surrogatepass" counts it as 3 bytes too, so the bound holds.
    return len(text.encode("utf-8", "surrogatepass"))


def count_tokens(messages: Any, model: str | None = None) -> int:
    """Prompt tokens of ``messages`` for ``model`` with tiktoken, framing included.

    Falls back to `upper_bound` (with one `EstimationWarning`) when the encoding
    cannot be loaded.
    """
    texts = message_texts(messages)
    encoding = _encoding_for(model)
    if encoding is None:
        return upper_bound(messages)
    tokens = sum(len(encoding.encode(text, disallowed_special=())) for text in texts)
    return tokens + _framing(texts, not isinstance(messages, str))


def estimate_text_tokens(texts: Iterable[str], model: str | None = None) -> int:
    """Tokens of plain texts (no chat framing), e.g. a governed function's arguments and result."""
    encoding = _encoding_for(model)
    texts = list(texts)
    if encoding is None:
        return sum(_utf8_len(t) for t in texts)
    return sum(len(encoding.encode(t, disallowed_special=())) for t in texts)


def encoding_name(model: str | None) -> str:
    """The tiktoken encoding used for ``model`` (``o200k_base`` when tiktoken does not know it)."""
    name = _model_encoding.get(model)
    if name is None:
        name = DEFAULT_ENCODING
        if model:
            import tiktoken

            bare = model.rsplit("/", 1)[-1]
            try:
                name = tiktoken.encoding_name_for_model(bare)
            except KeyError:
                name = DEFAULT_ENCODING
        _model_encoding[model] = name
    return name


def _encoding_for(model: str | None) -> Any | None:
    global _warned
    name = encoding_name(model)
    encoding = _encodings.get(name)
    if encoding is not None:
        return encoding
    if name in _failed:
        return None
    with _lock:
        if name in _encodings:
            return _encodings[name]
        if name in _failed:
            return None
        import tiktoken

        try:
            encoding = tiktoken.get_encoding(name)
        except Exception as exc:  # offline with no cache: network or file errors of any kind
            _failed.add(name)
            if _warned:  # once per process: a second encoding failing offline says nothing new
                return None
            _warned = True
            warnings.warn(
                f"tiktoken could not load the {name!r} encoding ({exc!r}); prompt tokens are estimated "
                "by their UTF-8 length (an upper bound). Set TIKTOKEN_CACHE_DIR to a folder holding the "
                "encoding files to count exactly.",
                EstimationWarning,
                stacklevel=3,
            )
            return None
        _encodings[name] = encoding
        return encoding


def _reset_for_tests() -> None:
    global _warned
    with _lock:
        _warned = False
        _encodings.clear()
        _model_encoding.clear()
        _failed.clear()
