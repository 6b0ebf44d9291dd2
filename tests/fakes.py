"""Offline fakes at the provider edge, shared by tests, examples and benchmarks.

`FakeChatModel` is a LangChain chat model and `FakeCrewLLM` a CrewAI LLM. Both
report provider-shaped usage exactly like real providers do (on invoke, and
on the final chunk when streaming) and count the calls that reach the
"provider", so tests can compare the ledger with what the provider reported.
`FakeChatModel` exists only when LangChain is installed; `FakeCrewLLM` is built
on first access (importing CrewAI takes seconds).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["CallLog", "FakeChatModel", "FakeCrewLLM"]  # noqa: F822 - FakeCrewLLM is built on first access


class CallLog:
    """A thread-safe record of calls that reached the fake provider; shared by copies of a model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> int:
        with self._lock:
            self.records.append(record)
            return len(self.records) - 1

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.records)

    def __len__(self) -> int:
        return self.count

    def __copy__(self) -> CallLog:
        return self  # pydantic copies fields; the log must stay shared

    def __deepcopy__(self, memo: dict[int, Any]) -> CallLog:
        return self


try:
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from pydantic import ConfigDict, Field
except ImportError:  # LangChain not installed: no FakeChatModel
    pass
else:

    class FakeChatModel(BaseChatModel):
        """A chat model that answers from a list (or a function) and reports usage like OpenAI does.

        ``usage`` is the ``usage_metadata`` reported for every call whose response
        carries none (LangChain shape, with optional ``input_token_details`` and
        ``output_token_details``). ``model_name`` is what the request names
        (``ls_model_name``); ``billed_model_name`` what the response says was billed.
        """

        model_config = ConfigDict(arbitrary_types_allowed=True)

        responses: list[Any] = Field(default_factory=lambda: ["ok"])
        responder: Callable[[list[BaseMessage]], Any] | None = None
        usage: dict[str, Any] | None = Field(
            default_factory=lambda: {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
        )
        model_name: str = "gpt-4o-mini"
        billed_model_name: str | None = None
        max_tokens: int | None = None
        stream_usage: bool = True
        delay: float = 0.0
        error: BaseException | None = None
        calls: CallLog = Field(default_factory=CallLog)
        cursor: Any = Field(default_factory=lambda: itertools.count())

        @property
        def _llm_type(self) -> str:
            return "fake-chat"

        @property
        def _identifying_params(self) -> dict[str, Any]:
            return {"model_name": self.model_name, "max_tokens": self.max_tokens}

        def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
            params = super()._get_ls_params(stop=stop, **kwargs)
            params["ls_provider"] = "openai"
            params["ls_model_name"] = self.model_name
            max_tokens = kwargs.get("max_tokens", self.max_tokens)
            if max_tokens is not None:
                params["ls_max_tokens"] = max_tokens
            return params

        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self  # the scripted responses already contain any tool calls

        def _answer(self, messages: list[BaseMessage]) -> AIMessage:
            index = self.calls.add({"messages": messages})
            if self.error is not None:
                raise self.error
            raw = (
                self.responder(messages) if self.responder else self.responses[next(self.cursor) % len(self.responses)]
            )
            message = AIMessage(content=raw) if isinstance(raw, str) else raw.model_copy(deep=True)
            if message.usage_metadata is None and self.usage is not None:
                message.usage_metadata = dict(self.usage)  # type: ignore[assignment]
            message.response_metadata = {
                **message.response_metadata,
                "model_name": self.billed_model_name or self.model_name,
                "call_index": index,
            }
            return message

        def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                      **kwargs: Any) -> ChatResult:  # fmt: skip
            if self.delay:
                time.sleep(self.delay)
            return ChatResult(generations=[ChatGeneration(message=self._answer(messages))])

        async def _agenerate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                             **kwargs: Any) -> ChatResult:  # fmt: skip
            if self.delay:
                await asyncio.sleep(self.delay)
            return ChatResult(generations=[ChatGeneration(message=self._answer(messages))])

        def _chunks(self, message: AIMessage) -> Iterator[ChatGenerationChunk]:
            words = str(message.content).split(" ")
            for i, word in enumerate(words):
                yield ChatGenerationChunk(message=AIMessageChunk(content=word + (" " if i < len(words) - 1 else "")))
            # Usage and the model name once, on the last chunk: chunk merging concatenates strings.
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content="",
                    usage_metadata=message.usage_metadata if self.stream_usage else None,
                    response_metadata=message.response_metadata,
                    chunk_position="last",
                    tool_call_chunks=[
                        {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": k}
                        for k, c in enumerate(message.tool_calls)
                    ],
                )
            )

        def _stream(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                    **kwargs: Any) -> Iterator[ChatGenerationChunk]:  # fmt: skip
            if self.delay:
                time.sleep(self.delay)
            for chunk in self._chunks(self._answer(messages)):
                if run_manager is not None:
                    run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
                yield chunk

        async def _astream(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                           **kwargs: Any) -> Any:  # fmt: skip
            if self.delay:
                await asyncio.sleep(self.delay)
            for chunk in self._chunks(self._answer(messages)):
                if run_manager is not None:
                    await run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
                yield chunk


def _build_fake_crew_llm() -> type:
    # Importing crewai takes seconds: only tests that use the fake pay for it.
    from crewai.events.types.llm_events import LLMCallType
    from crewai.llms.base_llm import BaseLLM, llm_call_context

    def _text(messages: Any) -> str:
        if isinstance(messages, str):
            return messages
        return "\n".join(str(m.get("content", "")) for m in messages)

    def _shape(shape: str, prompt: int, completion: int, cached: int, reasoning: int) -> dict[str, Any]:
        """Usage as each provider reports it (Anthropic reports cache reads beside input)."""
        if shape == "anthropic":
            return {"input_tokens": prompt - cached, "output_tokens": completion,
                    "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}  # fmt: skip
        if shape == "gemini":
            return {"prompt_token_count": prompt, "candidates_token_count": completion - reasoning,
                    "thoughts_token_count": reasoning, "cached_content_token_count": cached,
                    "total_token_count": prompt + completion}  # fmt: skip
        return {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }  # fmt: skip

    class FakeCrewLLM(BaseLLM):  # type: ignore[misc]
        """A CrewAI LLM speaking the ReAct text protocol, reporting usage like a real provider.

        ``responder(messages, call_index, from_agent, from_task) -> str`` scripts the
        answers (tool actions, delegation); the default is a final answer. Tokens:
        ``prompt_tokens`` per call if set, else one per 4 characters of the prompt;
        ``completion_tokens`` likewise. ``shape`` is "openai", "anthropic", "gemini" or "litellm".
        """

        llm_type: str = "fake"
        responder: Any = None
        shape: str = "openai"
        prompt_tokens: int | None = None
        completion_tokens: int | None = None
        cached_tokens: int = 0
        reasoning_tokens: int = 0
        calls: Any = None

        def model_post_init(self, context: Any) -> None:
            super().model_post_init(context)
            if self.calls is None:
                self.calls = CallLog()

        def supports_function_calling(self) -> bool:
            return False

        def get_context_window_size(self) -> int:
            return 128_000

        def get_input_tokens_count(self, *args: Any, **kwargs: Any) -> int:
            return 0  # the real providers call the network here

        def call(self, messages: Any, tools: Any = None, callbacks: Any = None, available_functions: Any = None,
                 from_task: Any = None, from_agent: Any = None, response_model: Any = None) -> str:  # fmt: skip
            with llm_call_context():
                self._emit_call_started_event(messages=messages, tools=tools, callbacks=callbacks,
                                              available_functions=available_functions, from_task=from_task,
                                              from_agent=from_agent)  # fmt: skip
                msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
                try:
                    self._invoke_before_llm_call_hooks(msgs, from_agent)  # a no-op inside an agent executor
                except Exception as exc:
                    self._emit_call_denied_event(exc, from_task, from_agent)  # type: ignore[attr-defined]
                    raise
                record: dict[str, Any] = {
                    "agent": getattr(from_agent, "role", None),
                    "task": getattr(from_task, "name", None) or getattr(from_task, "description", None),
                }
                index = self.calls.add(record)
                text = (self.responder(msgs, index, from_agent, from_task) if self.responder
                        else "Thought: I now know the final answer\nFinal Answer: canned answer")  # fmt: skip
                prompt = self.prompt_tokens if self.prompt_tokens is not None else max(1, len(_text(msgs)) // 4)
                completion = self.completion_tokens if self.completion_tokens is not None else max(1, len(text) // 4)
                usage = _shape(self.shape, prompt, completion, min(self.cached_tokens, prompt),
                               min(self.reasoning_tokens, completion))  # fmt: skip
                record["usage"] = usage
                record["prompt_tokens"], record["completion_tokens"] = prompt, completion
                self._track_token_usage_internal(usage)
                text = self._invoke_after_llm_call_hooks(msgs, text, from_agent)
                self._emit_call_completed_event(response=text, call_type=LLMCallType.LLM_CALL, from_task=from_task,
                                                from_agent=from_agent, messages=msgs, usage=usage,
                                                finish_reason="stop", response_id=f"fake-{index}")  # fmt: skip
                return str(text)

        async def acall(self, *args: Any, **kwargs: Any) -> str:
            return self.call(*args, **kwargs)

    return FakeCrewLLM


_crew_llm: type | None = None


def __getattr__(name: str) -> Any:
    global _crew_llm
    if name == "FakeCrewLLM":
        if _crew_llm is None:
            _crew_llm = _build_fake_crew_llm()
        return _crew_llm
    raise AttributeError(name)
