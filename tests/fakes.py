"""Offline fake models at the provider edge, shared by tests, examples and benchmarks.

* ``FakeChatModel``: a LangChain chat model, defined only when ``langchain_core`` imports.
* ``FakeCrewLLM``: a CrewAI LLM, built on first access (``from tests.fakes import FakeCrewLLM``)
  because importing CrewAI takes seconds; that access raises ImportError when CrewAI is missing.
* ``CallLog``: the thread-safe record of the calls that reached a fake "provider".

Both fakes report deterministic, provider-shaped usage through the path a real provider uses,
so a test can assert that what was recorded equals what the fake reported.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["CREW_SHAPES", "CallLog", "FakeChatModel", "FakeCrewLLM", "crew_usage", "tool_observations"]  # noqa: F822

CREW_SHAPES = ("openai", "anthropic", "gemini", "litellm", "native-openai", "native-anthropic", "native-gemini", "none")


class CallLog:
    """Thread-safe records of the calls that reached a fake provider, in arrival order.

    Copying a log returns the log itself, so every copy of a model (``bind_tools``, ``model_copy``,
    ``copy.copy``/``deepcopy``, CrewAI's agent copies) shares one log. ``records`` is the list itself.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: list[dict[str, Any]] = []
        self._cursor = 0  # position in the scripted responses; not reset by clear()

    def add(self, record: dict[str, Any]) -> int:
        """Append a record; return its position, also stored as ``record["index"]``."""
        with self._lock:
            record["index"] = len(self.records)
            self.records.append(record)
            return record["index"]

    def take(self, responses: Any) -> Any:
        """The next scripted response: a list or tuple cycles, an iterator is consumed, anything else repeats."""
        with self._lock:
            if isinstance(responses, Iterator):
                if (item := next(responses, StopIteration)) is StopIteration:
                    raise RuntimeError("the fake's scripted responses are exhausted")
            else:
                script = responses if isinstance(responses, (list, tuple)) else [responses]
                item = script[self._cursor % len(script)]
            self._cursor += 1
            return item

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.records)

    def clear(self) -> None:
        with self._lock:
            self.records.clear()

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            return iter(list(self.records))

    def __getitem__(self, index: int) -> dict[str, Any]:
        with self._lock:
            return self.records[index]

    def __copy__(self) -> CallLog:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> CallLog:
        return self


try:
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from pydantic import ConfigDict, Field
except ImportError:  # LangChain is not installed: FakeChatModel is not defined
    pass
else:

    class FakeChatModel(BaseChatModel):
        """A chat model that answers from a script and reports usage the way ChatOpenAI does.

        Answers come from ``responder(messages)`` if set, else from ``responses`` (AIMessage or str; a
        list or tuple cycles, an iterator is consumed). A response without ``usage_metadata`` gets
        ``usage`` (LangChain shape; ``total_tokens`` filled in; ``None`` reports no usage).
        ``model_name`` is the requested model (``ls_model_name``), ``billed_model_name`` the one the
        response names. Each call that reaches the provider is recorded in ``calls``.
        """

        model_config = ConfigDict(arbitrary_types_allowed=True)

        responses: Any = ("ok",)
        responder: Callable[[list[BaseMessage]], Any] | None = None
        usage: dict[str, Any] | None = Field(
            default_factory=lambda: {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
        )
        model_name: str = "gpt-4o-mini"
        billed_model_name: str | None = None
        max_tokens: int | None = None
        stream_usage: bool = True  # also per call: model.stream(..., stream_usage=False)
        streaming: bool = False  # True: invoke goes through _stream, as with ChatOpenAI(streaming=True)
        delay: float = 0.0
        error: BaseException | None = None
        calls: CallLog = Field(default_factory=CallLog)

        @property
        def _llm_type(self) -> str:
            return "fake-chat-model"

        @property
        def _identifying_params(self) -> dict[str, Any]:
            return {"model_name": self.model_name, "max_tokens": self.max_tokens}

        def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
            params = super()._get_ls_params(stop=stop, **kwargs)  # ls_model_name, ls_max_tokens (bound wins)
            params["ls_provider"] = "openai"
            return params

        def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any) -> Any:
            """Bind OpenAI-format tool schemas, as ChatOpenAI does; the script decides what is called."""
            if tool_choice is not None:
                kwargs["tool_choice"] = tool_choice
            return self.bind(tools=[convert_to_openai_tool(tool) for tool in tools], **kwargs)

        def _arrive(self, messages: list[BaseMessage], kwargs: dict[str, Any], stream: bool) -> None:
            self.calls.add({"messages": list(messages), "kwargs": dict(kwargs), "stream": stream})

        def _reply(self, messages: list[BaseMessage]) -> AIMessage:
            if self.error is not None:
                raise self.error
            raw = self.responder(messages) if self.responder is not None else self.calls.take(self.responses)
            message = AIMessage(content=raw) if isinstance(raw, str) else raw.model_copy(deep=True)
            if message.usage_metadata is None and self.usage is not None:
                usage = dict(self.usage)
                usage.setdefault("total_tokens", usage.get("input_tokens", 0) + usage.get("output_tokens", 0))
                message.usage_metadata = usage  # type: ignore[assignment]
            message.response_metadata = {
                "model_name": self.billed_model_name or self.model_name,
                "model_provider": "openai",
                "finish_reason": "tool_calls" if message.tool_calls else "stop",
                **message.response_metadata,
            }
            return message

        def _chunks(self, message: AIMessage, with_usage: bool) -> Iterator[ChatGenerationChunk]:
            """Content word by word, then one last chunk with usage, metadata (once: merging concatenates
            strings) and tool calls."""
            content = message.content
            if isinstance(content, str):
                words = content.split(" ") if content else []
                for i, word in enumerate(words):
                    piece = word if i == len(words) - 1 else word + " "
                    yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
            elif content:
                yield ChatGenerationChunk(message=AIMessageChunk(content=content))
            tool_chunks = [
                {"name": call["name"], "args": json.dumps(call["args"]), "id": call["id"], "index": i}
                for i, call in enumerate(message.tool_calls)
            ]
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content="" if isinstance(content, str) else [],
                    usage_metadata=message.usage_metadata if with_usage else None,
                    response_metadata=message.response_metadata,
                    tool_call_chunks=tool_chunks,
                    chunk_position="last",
                )
            )

        def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                      run_manager: Any = None, **kwargs: Any) -> ChatResult:  # fmt: skip
            self._arrive(messages, kwargs, stream=False)
            if self.delay:
                time.sleep(self.delay)
            return ChatResult(generations=[ChatGeneration(message=self._reply(messages))])

        async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                             run_manager: Any = None, **kwargs: Any) -> ChatResult:  # fmt: skip
            self._arrive(messages, kwargs, stream=False)
            if self.delay:
                await asyncio.sleep(self.delay)
            return ChatResult(generations=[ChatGeneration(message=self._reply(messages))])

        # No run_manager.on_llm_new_token here: BaseChatModel.stream/astream already call it per chunk.
        def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                    run_manager: Any = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:  # fmt: skip
            self._arrive(messages, kwargs, stream=True)
            if self.delay:
                time.sleep(self.delay)
            yield from self._chunks(self._reply(messages), kwargs.get("stream_usage", self.stream_usage))

        async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                           run_manager: Any = None, **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:  # fmt: skip
            self._arrive(messages, kwargs, stream=True)
            if self.delay:
                await asyncio.sleep(self.delay)
            for chunk in self._chunks(self._reply(messages), kwargs.get("stream_usage", self.stream_usage)):
                yield chunk


def crew_usage(shape: str, prompt: int, completion: int, cached: int = 0, reasoning: int = 0,
               cache_creation: int = 0) -> dict[str, Any] | None:  # fmt: skip
    """One call's usage as ``shape`` reports it (see ``CREW_SHAPES``).

    ``prompt`` counts every billed input token (cache reads and writes included) and ``completion``
    includes ``reasoning``. "openai", "anthropic", "gemini" are the raw API shapes; "litellm" is raw
    OpenAI plus the flat keys CrewAI's LiteLLM path adds; "native-*" are the dicts CrewAI 1.15's
    native providers build; "none" reports no usage.
    """
    total, candidates, uncached = prompt + completion, completion - reasoning, prompt - cached - cache_creation
    flat = {"cached_prompt_tokens": cached, "reasoning_tokens": reasoning}
    openai = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
    if shape == "openai" or shape == "litellm":
        details = {"prompt_tokens_details": {"cached_tokens": cached},
                   "completion_tokens_details": {"reasoning_tokens": reasoning}}  # fmt: skip
        return {**openai, **details, **(flat if shape == "litellm" else {})}
    if shape == "anthropic":
        return {"input_tokens": uncached, "output_tokens": completion, "cache_read_input_tokens": cached,
                "cache_creation_input_tokens": cache_creation}  # fmt: skip
    if shape == "gemini":
        return {"prompt_token_count": prompt, "candidates_token_count": candidates, "thoughts_token_count": reasoning,
                "cached_content_token_count": cached, "total_token_count": total}  # fmt: skip
    if shape == "native-openai":
        return {**openai, **flat}
    if shape == "native-anthropic":
        return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": total,
                "cached_prompt_tokens": cached, "cache_creation_tokens": cache_creation}  # fmt: skip
    if shape == "native-gemini":
        return {"prompt_token_count": prompt, "candidates_token_count": candidates, "completion_tokens": completion,
                "total_token_count": total, "total_tokens": total, **flat}  # fmt: skip
    if shape == "none":
        return None
    raise ValueError(f"unknown usage shape {shape!r}; expected one of {CREW_SHAPES}")


def tool_observations(messages: list[dict[str, Any]]) -> list[str]:
    """The tool results a CrewAI ReAct agent has seen so far (the system prompt mentions
    "Observation:" too, so look only at assistant messages)."""
    found = [str(m.get("content") or "") for m in messages if m.get("role") == "assistant"]
    return [text.split("\nObservation:", 1)[1].strip() for text in found if "\nObservation:" in text]


def _build_fake_crew_llm() -> type:
    from crewai.events.types.llm_events import LLMCallType
    from crewai.hooks.dispatch import HookAborted
    from crewai.llms.base_llm import BaseLLM, LLMCallBlockedError, llm_call_context
    from pydantic import Field

    def quarter(messages: Any) -> int:  # one token per four characters, at least one
        text = messages if isinstance(messages, str) else "\n".join(str(m.get("content") or "") for m in messages)
        return max(1, math.ceil(len(text) / 4))

    class FakeCrewLLM(BaseLLM):  # type: ignore[misc, valid-type]
        """A CrewAI LLM that speaks the ReAct text protocol and reports usage like a provider.

        Answers come from ``responder(messages, call_index, from_agent, from_task) -> str`` (verbatim:
        ``Action: <tool>\\nAction Input: {json}`` drives tools and delegation), else from ``responses``
        (cycled; a text with neither ``Final Answer:`` nor ``Action:`` is wrapped as a final answer).
        Tokens per call: ``prompt_tokens``/``completion_tokens`` if set, else one per 4 characters of
        the prompt/answer. ``shape`` picks the usage dict (``crew_usage``). Each call is recorded in
        ``calls`` (agent, task, usage, token counts); copies share it; pass ``calls=`` to share more.
        """

        llm_type: str = "fake"
        responder: Callable[..., str] | None = None
        responses: list[str] = Field(default_factory=lambda: ["canned answer"])
        shape: str = "openai"
        prompt_tokens: int | None = None
        completion_tokens: int | None = None
        cached_tokens: int = 0
        reasoning_tokens: int = 0
        cache_creation_tokens: int = 0
        context_window: int = 128_000
        delay: float = 0.0
        error: BaseException | None = None
        calls: CallLog = Field(default_factory=CallLog)

        def __init__(self, **data: Any) -> None:
            data.setdefault("model", "gpt-4o-mini")  # BaseLLM rejects a missing model before defaults apply
            crew_usage(data.get("shape", "openai"), 1, 1)  # fail fast on an unknown shape
            super().__init__(**data)

        def supports_function_calling(self) -> bool:
            return False

        def get_context_window_size(self) -> int:
            return self.context_window

        def get_input_tokens_count(self, messages: Any, tools: Any = None, response_model: Any = None) -> int:
            return quarter(messages)  # no warning; the real OpenAI/Anthropic ones call a count API

        @contextmanager
        def _provider_call(self, messages: Any, tools: Any, callbacks: Any, available_functions: Any,
                           from_task: Any, from_agent: Any) -> Iterator[tuple[list[Any], dict[str, Any]]]:  # fmt: skip
            """What native providers put around a call: call id, events, hooks, failure events."""
            with llm_call_context():
                self._emit_call_started_event(messages=messages, tools=tools, callbacks=callbacks,
                                              available_functions=available_functions, from_task=from_task,
                                              from_agent=from_agent)  # fmt: skip
                msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
                try:
                    self._invoke_before_llm_call_hooks(msgs, from_agent)  # a no-op inside an agent executor
                    task = getattr(from_task, "name", None) or getattr(from_task, "description", None)
                    record: dict[str, Any] = {"agent": getattr(from_agent, "role", None), "task": task, "usage": None}
                    self.calls.add(record)
                    yield msgs, record
                except (HookAborted, LLMCallBlockedError) as exc:
                    self._emit_call_denied_event(exc, from_task, from_agent)
                    raise
                except Exception as exc:
                    self._emit_call_failed_event(error=f"Fake provider call failed: {exc!s}",
                                                 from_task=from_task, from_agent=from_agent)  # fmt: skip
                    raise

        def _respond(self, msgs: list[Any], record: dict[str, Any], from_task: Any, from_agent: Any) -> str:
            if self.error is not None:
                raise self.error
            if self.responder is not None:
                text = self.responder(msgs, record["index"], from_agent, from_task)
            else:
                text = self.calls.take(self.responses)
                if "Final Answer:" not in text and "Action:" not in text:
                    text = f"Thought: I now know the final answer\nFinal Answer: {text}"
            prompt = self.prompt_tokens if self.prompt_tokens is not None else quarter(msgs)
            completion = self.completion_tokens if self.completion_tokens is not None else quarter(text)
            cached = min(self.cached_tokens, prompt)
            creation = min(self.cache_creation_tokens, prompt - cached)
            reasoning = min(self.reasoning_tokens, completion)
            usage = crew_usage(self.shape, prompt, completion, cached, reasoning, creation)
            record.update(usage=usage, input_tokens=prompt, output_tokens=completion, cached_tokens=cached,
                          reasoning_tokens=reasoning, cache_creation_tokens=creation)  # fmt: skip
            if usage is not None:
                self._track_token_usage_internal(usage)  # what feeds crew.usage_metrics
            text = self._invoke_after_llm_call_hooks(msgs, text, from_agent)
            self._emit_call_completed_event(response=text, call_type=LLMCallType.LLM_CALL, from_task=from_task,
                                            from_agent=from_agent, messages=msgs, usage=usage,
                                            finish_reason="stop", response_id=f"fake-{record['index']}")  # fmt: skip
            return str(text)

        def call(self, messages: Any, tools: Any = None, callbacks: Any = None, available_functions: Any = None,
                 from_task: Any = None, from_agent: Any = None, response_model: Any = None) -> str:  # fmt: skip
            frame = self._provider_call(messages, tools, callbacks, available_functions, from_task, from_agent)
            with frame as (msgs, record):
                if self.delay:
                    time.sleep(self.delay)
                return self._respond(msgs, record, from_task, from_agent)

        async def acall(self, messages: Any, tools: Any = None, callbacks: Any = None,
                        available_functions: Any = None, from_task: Any = None, from_agent: Any = None,
                        response_model: Any = None) -> str:  # fmt: skip
            frame = self._provider_call(messages, tools, callbacks, available_functions, from_task, from_agent)
            with frame as (msgs, record):
                if self.delay:
                    await asyncio.sleep(self.delay)
                return self._respond(msgs, record, from_task, from_agent)

    return FakeCrewLLM


_crew_llm: type | None = None
_crew_llm_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """Build ``FakeCrewLLM`` on first access, so importing this module never imports CrewAI."""
    global _crew_llm
    if name != "FakeCrewLLM":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _crew_llm_lock:
        if _crew_llm is None:
            _crew_llm = _build_fake_crew_llm()
    return _crew_llm


def record_store_threads(budget: Any, *operations: str) -> list[str]:
    """Wrap ``operations`` of ``budget``'s store so each call records the name of the thread it ran in."""
    store, seen = budget._store, []

    def spying(method: Any) -> Any:
        def spy(*args: Any, **kwargs: Any) -> Any:
            seen.append(threading.current_thread().name)
            return method(*args, **kwargs)

        return spy

    for name in operations:
        setattr(store, name, spying(getattr(store, name)))
    return seen
