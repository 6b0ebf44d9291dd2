"""The LangChain adapter against real runnables, with a fake model only at the provider edge."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from decimal import Decimal
from typing import Any
from uuid import uuid4

import pytest

pytest.importorskip("langchain_core")

from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler, UsageMetadataCallbackHandler
from langchain_core.globals import set_llm_cache
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.language_models.llms import BaseLLM
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import Generation, LLMResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnableParallel
from langchain_core.tools import tool

from budgetary import Budget, BudgetExceeded, ConfigurationError, Limits, SoftLimit
from budgetary.integrations.langchain import (
    SOFT_LIMIT_EVENT,
    BudgetCallbackHandler,
    agent_from_metadata,
    budget_scope,
)
from tests.fakes import FakeChatModel, record_store_threads

USAGE = {
    "input_tokens": 120,
    "output_tokens": 30,
    "total_tokens": 150,
    "input_token_details": {"cache_read": 100},
    "output_token_details": {"reasoning": 12},
}


def make_model(**kwargs: Any) -> FakeChatModel:
    kwargs.setdefault("usage", dict(USAGE))
    kwargs.setdefault("model_name", "gpt-4o-mini")
    return FakeChatModel(**kwargs)


def make_chain(model: FakeChatModel):
    return ChatPromptTemplate.from_messages([("user", "{question}")]) | model | StrOutputParser()


def provider_calls(model: FakeChatModel) -> int:
    return model.calls.count


# -- the cap of 3 LLM calls, for every way of running a chain ----------------------------------


def _run_sync_invoke(chain, handler):
    return chain.invoke({"question": "q"}, config={"callbacks": [handler]})


def _run_with_config(chain, handler):
    return chain.with_config(callbacks=[handler]).invoke({"question": "q"})


def _run_stream(chain, handler):
    return "".join(chain.stream({"question": "q"}, config={"callbacks": [handler]}))


def _run_ainvoke(chain, handler):
    return asyncio.run(chain.ainvoke({"question": "q"}, config={"callbacks": [handler]}))


def _run_astream(chain, handler):
    async def go():
        return "".join([c async for c in chain.astream({"question": "q"}, config={"callbacks": [handler]})])

    return asyncio.run(go())


def _run_astream_events(chain, handler):
    async def go():
        return [e async for e in chain.astream_events({"question": "q"}, config={"callbacks": [handler]})]

    return asyncio.run(go())


@pytest.mark.parametrize(
    "run",
    [_run_sync_invoke, _run_with_config, _run_stream, _run_ainvoke, _run_astream, _run_astream_events],
    ids=["invoke", "with_config", "stream", "ainvoke", "astream", "astream_events"],
)
def test_a_cap_of_three_calls_lets_exactly_three_reach_the_provider(run):
    model = make_model()
    budget = Budget(Limits(max_llm_calls=3))
    handler = BudgetCallbackHandler(budget)
    chain = make_chain(model)
    for _ in range(3):
        run(chain, handler)
    with pytest.raises(BudgetExceeded) as info:
        run(chain, handler)
    assert info.value.resource == "llm_calls"
    assert provider_calls(model) == 3
    snap = budget.snapshot()
    assert snap.llm_calls == 3 and snap.held_llm_calls == 0
    assert snap.input_tokens == 3 * 120 and snap.output_tokens == 3 * 30


def test_batch_and_abatch_stop_at_the_cap():
    model = make_model()
    budget = Budget(Limits(max_llm_calls=3))
    chain = make_chain(model)
    with pytest.raises(BudgetExceeded):
        chain.batch([{"question": str(i)} for i in range(5)], config={"callbacks": [BudgetCallbackHandler(budget)]})
    assert provider_calls(model) == 3 == budget.snapshot().llm_calls

    model2 = make_model()
    budget2 = Budget(Limits(max_llm_calls=3))
    results = asyncio.run(
        make_chain(model2).abatch(
            [{"question": str(i)} for i in range(5)],
            config={"callbacks": [BudgetCallbackHandler(budget2)]},
            return_exceptions=True,
        )
    )
    assert sum(isinstance(r, BudgetExceeded) for r in results) == 2
    assert provider_calls(model2) == 3 == budget2.snapshot().llm_calls


def test_ten_parallel_calls_against_a_cap_of_three_reach_the_provider_three_times():
    model = make_model(delay=0.05)
    budget = Budget(Limits(max_llm_calls=3))
    handler = BudgetCallbackHandler(budget)
    branches = RunnableParallel({f"b{i}": make_chain(model) for i in range(10)})
    with pytest.raises(BudgetExceeded):
        branches.invoke({"question": "q"}, config={"callbacks": [handler], "max_concurrency": 10})
    assert provider_calls(model) == 3

    async_model = make_model(delay=0.05)
    async_budget = Budget(Limits(max_llm_calls=3))

    async def go():
        chain = make_chain(async_model)
        handler = BudgetCallbackHandler(async_budget)
        return await asyncio.gather(
            *(chain.ainvoke({"question": str(i)}, config={"callbacks": [handler]}) for i in range(10)),
            return_exceptions=True,
        )

    results = asyncio.run(go())
    assert sum(isinstance(r, BudgetExceeded) for r in results) == 7
    assert provider_calls(async_model) == 3
    assert async_budget.snapshot().held_llm_calls == 0


# -- what is charged ---------------------------------------------------------------------------


def test_recorded_tokens_equal_the_reported_tokens_with_cache_and_reasoning():
    model = make_model(billed_model_name="gpt-4o-mini-2024-07-18")
    budget = Budget()
    make_chain(model).invoke({"question": "q"}, config={"callbacks": [BudgetCallbackHandler(budget)]})
    (entry,) = budget.ledger.history(kind="llm")
    assert entry.usage is not None
    assert (entry.usage.input_tokens, entry.usage.output_tokens) == (120, 30)
    assert (entry.usage.cache_read_tokens, entry.usage.reasoning_tokens) == (100, 12)
    assert entry.model == "gpt-4o-mini-2024-07-18" and not entry.estimated
    # gpt-4o-mini: $0.15/M input, $0.075/M cached input, $0.60/M output
    expected = (Decimal(20) * Decimal("0.15") + Decimal(100) * Decimal("0.075") + Decimal(30) * Decimal("0.6")) / 10**6
    assert entry.cost_usd == expected


def test_streaming_without_a_usage_chunk_charges_the_estimate_flagged():
    model = make_model(stream_usage=False, max_tokens=64)
    budget = Budget()
    "".join(make_chain(model).stream({"question": "q"}, config={"callbacks": [BudgetCallbackHandler(budget)]}))
    (entry,) = budget.ledger.history(kind="llm")
    assert entry.estimated
    assert entry.usage is not None and entry.usage.output_tokens == 64  # the reserve for max_tokens


def test_the_call_max_tokens_is_what_is_held():
    model = make_model(delay=0.2)
    budget = Budget(Limits(max_total_tokens=100_000))
    held = []

    def watch():
        while not held:
            if budget.snapshot().held_tokens:
                held.append(budget.snapshot().held_tokens)

    watcher = threading.Thread(target=watch)
    watcher.start()
    model.bind(max_tokens=77).invoke("hello", config={"callbacks": [BudgetCallbackHandler(budget)]})
    watcher.join(timeout=5)
    prompt_bound = held[0] - 77
    assert 0 < prompt_bound < 50  # "hello" plus framing, bounded by its bytes


def test_a_max_tokens_that_is_not_a_count_holds_the_default_reserve_instead_of_failing_the_call():
    # -1 is what LangChain's OpenAI text LLM takes for "as many as fit"; such values are the
    # user's model settings, not a reason to crash their run.
    budget = Budget(Limits(max_total_tokens=100_000))
    handler = BudgetCallbackHandler(budget)
    for value in (-1, True, 2.5):
        assert make_model(usage=None).bind(max_tokens=value).invoke("hi", config={"callbacks": [handler]}).content
    assert [e.usage.output_tokens for e in budget.ledger.history(kind="llm")] == [1024] * 3  # the default reserve
    assert budget.snapshot().held_tokens == 0


class _BatchUsageLLM(BaseLLM):
    """A text LLM that reports one usage for a whole batch of prompts, as OpenAI's completions API does."""

    model_name: str = "gpt-3.5-turbo-instruct"
    max_tokens: int = 200

    @property
    def _llm_type(self) -> str:
        return "batch-usage-fake"

    def _generate(self, prompts: list[str], stop: Any = None, run_manager: Any = None, **kwargs: Any) -> LLMResult:
        n = len(prompts)
        usage = {"prompt_tokens": 11 * n, "completion_tokens": 7 * n, "total_tokens": 18 * n}
        return LLMResult(generations=[[Generation(text="answer")] for _ in prompts], llm_output={"token_usage": usage})


def test_a_text_llm_batch_reported_as_one_usage_is_charged_that_usage_once():
    # LangChain hands a batch's usage to the first prompt's run and an empty one to the others:
    # charging those their estimates would count the batch again.
    llm = _BatchUsageLLM()
    budget = Budget()
    llm.batch(["a", "b", "c"], config={"callbacks": [BudgetCallbackHandler(budget)]})
    asyncio.run(llm.abatch(["a", "b", "c"], config={"callbacks": [BudgetCallbackHandler(budget)]}))
    entries = budget.ledger.history(kind="llm")
    assert [(e.usage.input_tokens, e.usage.output_tokens) for e in entries] == [(33, 21), (0, 0), (0, 0)] * 2
    assert not any(e.estimated for e in entries)
    assert budget.snapshot().total_tokens == 2 * 54 and budget.snapshot().llm_calls == 6


def test_llm_cache_hits_are_not_charged_as_provider_spend():
    model = make_model()
    budget = Budget()
    handler = BudgetCallbackHandler(budget)
    set_llm_cache(InMemoryCache())
    try:
        model.invoke("same prompt", config={"callbacks": [handler]})
        model.invoke("same prompt", config={"callbacks": [handler]})
    finally:
        set_llm_cache(None)
    assert provider_calls(model) == 1
    assert budget.snapshot().llm_calls == 1 and budget.snapshot().total_tokens == 150
    assert budget.snapshot().held_tokens == 0


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
def test_with_charge_failed_calls_cache_hits_and_re_attributed_holds_are_still_not_charged(run_async):
    # charge_failed_calls charges the hold of a call that failed (the provider may have billed it);
    # a cache hit never reached the provider, and a hold re-attributed to a more specific handler
    # is charged by that handler: charging them too counted calls that were never made, or twice.
    model = make_model()
    budget = Budget(charge_failed_calls=True)
    handlers = [BudgetCallbackHandler(budget), BudgetCallbackHandler(budget, agent="writer")]

    def call(prompt: str) -> None:
        config: Any = {"callbacks": handlers}
        asyncio.run(model.ainvoke(prompt, config=config)) if run_async else model.invoke(prompt, config=config)

    set_llm_cache(InMemoryCache())
    try:
        call("same prompt")
        call("same prompt")
    finally:
        set_llm_cache(None)
    assert provider_calls(model) == 1
    assert (budget.snapshot().llm_calls, budget.snapshot().total_tokens, budget.snapshot().held_tokens) == (1, 150, 0)
    assert [e.agent for e in budget.ledger.history(kind="llm")] == ["writer"]


def test_a_failed_call_releases_its_hold():
    model = make_model(error=ConnectionError("provider down"))
    budget = Budget(Limits(max_total_tokens=10_000))
    with pytest.raises(ConnectionError):
        model.invoke("x", config={"callbacks": [BudgetCallbackHandler(budget)]})
    snap = budget.snapshot()
    assert snap.held_tokens == 0 and snap.total_tokens == 0 and snap.llm_calls == 0
    assert budget.ledger.history(kind="release")


def test_the_same_budget_attached_twice_charges_each_call_once():
    model = make_model()
    budget = Budget()
    with budget_scope(budget):
        make_chain(model).invoke({"question": "q"}, config={"callbacks": [BudgetCallbackHandler(budget)]})
    assert budget.snapshot().llm_calls == 1 and budget.snapshot().total_tokens == 150


def test_two_objects_of_one_shared_budget_attached_to_a_run_charge_each_call_once(tmp_path):
    # A worker that builds its budgets by name on a shared store may hold two objects of one budget.
    url = f"sqlite:///{tmp_path / 'budget.db'}"
    first = Budget(Limits(max_llm_calls=5), name="run", store=url)
    second = Budget(Limits(max_llm_calls=5), name="run", store=url)
    model = make_model()
    with budget_scope(first):
        make_chain(model).invoke({"question": "q"}, config={"callbacks": [BudgetCallbackHandler(second, agent="w")]})
        with budget_scope(second):  # the same budget again: it replaces the outer scope
            make_chain(model).invoke({"question": "q"})
    assert provider_calls(model) == 2
    assert first.snapshot().llm_calls == 2 and first.snapshot().held_tokens == 0
    assert [e.agent for e in first.ledger.history(kind="llm")] == ["w", None]


def test_two_handlers_of_one_budget_across_threads_charge_each_call_once_and_leave_nothing_behind():
    from concurrent.futures import ThreadPoolExecutor

    from budgetary.integrations.langchain import _claims_of

    model = make_model()
    budget = Budget()
    budget.agent("writer")
    explicit = BudgetCallbackHandler(budget, agent="writer")  # outranks the scope's handler

    def call(i: int) -> None:
        with budget_scope(budget):
            make_chain(model).invoke({"question": f"q{i}"}, config={"callbacks": [explicit]})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(48)))
    entries = budget.ledger.history(kind="llm")
    assert len(entries) == 48 == model.calls.count and {e.agent for e in entries} == {"writer"}
    assert budget.snapshot().held_tokens == 0 and not _claims_of(budget)


def test_budget_scope_governs_runs_without_config_and_sync_and_async():
    model = make_model()
    budget = Budget(Limits(max_llm_calls=2))
    chain = make_chain(model)
    with budget_scope(budget):
        chain.invoke({"question": "q"})
        asyncio.run(chain.ainvoke({"question": "q"}))
        with pytest.raises(BudgetExceeded):
            chain.invoke({"question": "q"})
    chain.invoke({"question": "outside"})  # not governed outside the block
    assert provider_calls(model) == 3 and budget.snapshot().llm_calls == 2


def test_scopes_of_different_budgets_nest_and_each_charges_its_own():
    model = make_model()
    chain = make_chain(model)
    tenant, run = Budget(Limits(max_llm_calls=3), name="tenant"), Budget(Limits(max_llm_calls=1), name="run")
    with budget_scope(tenant):
        with budget_scope(run, agent="writer"):
            chain.invoke({"question": "q"})
            with pytest.raises(BudgetExceeded, match="'run'"):
                chain.invoke({"question": "q"})
        chain.invoke({"question": "q"})  # the inner scope ended: only the tenant governs
    assert [e.agent for e in run.ledger.history(kind="llm")] == ["writer"]
    assert tenant.snapshot().llm_calls == 2 and provider_calls(model) == 2


@pytest.mark.parametrize("parent_first", [True, False], ids=["parent-handler-first", "child-handler-first"])
def test_handlers_of_a_budget_and_its_parent_charge_the_parent_once(parent_first):
    # A child budget's charge is also its parent's: both handlers reserving would count the call twice.
    model = make_model()
    day = Budget(Limits(max_total_tokens=100_000), name="day")
    run = Budget(Limits(max_total_tokens=10_000), name="run", parent=day)
    handlers = [BudgetCallbackHandler(day), BudgetCallbackHandler(run, agent="writer")]
    make_chain(model).invoke({"question": "q"}, config={"callbacks": handlers if parent_first else handlers[::-1]})
    assert day.snapshot().total_tokens == run.snapshot().total_tokens == 150
    assert day.snapshot().llm_calls == 1 and day.snapshot().held_tokens == 0
    assert [e.agent for e in run.ledger.history(kind="llm")] == ["writer"]  # the innermost budget charged it

    @tool
    def lookup(term: str) -> str:
        """Look a term up."""
        return term

    lookup.invoke("otter", config={"callbacks": handlers if parent_first else handlers[::-1]})
    assert day.snapshot().tool_calls == 1


def test_nested_scopes_of_a_budget_and_its_parent_charge_the_parent_once():
    model = make_model()
    day = Budget(Limits(max_total_tokens=100_000), name="day")
    run = Budget(Limits(max_total_tokens=10_000), name="run", parent=day)
    with budget_scope(day), budget_scope(run):
        asyncio.run(make_chain(model).ainvoke({"question": "q"}))
        make_chain(model).invoke({"question": "q"})
    assert day.snapshot().llm_calls == run.snapshot().llm_calls == 2
    assert day.snapshot().total_tokens == 300 and day.snapshot().held_tokens == 0


def test_a_call_refused_by_one_budget_gives_back_what_another_budget_held_for_it():
    # LangChain stops at the refusing handler and sends no event: the first budget's hold would
    # otherwise stay until its lease ran out (a bare invoke has no parent chain to clean up after it).
    model = make_model()
    tenant, run = Budget(Limits(max_llm_calls=9), name="tenant"), Budget(Limits(max_llm_calls=0), name="run")
    handlers = [BudgetCallbackHandler(tenant), BudgetCallbackHandler(run)]
    with pytest.raises(BudgetExceeded):
        model.invoke("q", config={"callbacks": handlers})
    assert provider_calls(model) == 0
    assert (tenant.snapshot().held_llm_calls, tenant.snapshot().llm_calls) == (0, 0)
    assert [e.reason for e in tenant.ledger.history(kind="release")] == ["refused by budget 'run'"]


def test_a_tool_call_refused_by_one_budget_leaves_no_claim_of_another_behind():
    from budgetary.integrations.langchain import _claims_of

    @tool
    def search(query: str) -> str:
        """Search the web."""
        return "results"

    tenant, run = Budget(name="tenant"), Budget(Limits(max_tool_calls=0), name="run")
    for _ in range(3):
        with pytest.raises(BudgetExceeded):
            search.invoke("otters", config={"callbacks": [BudgetCallbackHandler(tenant), BudgetCallbackHandler(run)]})
    assert not _claims_of(tenant) and not _claims_of(run)  # they would pile up for the life of the process


def test_prompts_started_with_a_refused_one_give_their_holds_back():
    # A text LLM's batch is one generate call: LangChain starts a run per prompt, and when a later
    # prompt is refused it sends the earlier ones no end or error event. Their holds were renewed
    # for as long as the process lived, so the budget lost those calls for good.
    llm = FakeListLLM(responses=["a"])
    tenant, run = Budget(Limits(max_llm_calls=9), name="tenant"), Budget(Limits(max_llm_calls=2), name="run")
    handlers = [BudgetCallbackHandler(tenant), BudgetCallbackHandler(run)]
    with pytest.raises(BudgetExceeded):
        llm.batch(["a", "b", "c"], config={"callbacks": handlers})
    model = make_model()
    prompts = [[HumanMessage(text)] for text in "abc"]
    with pytest.raises(BudgetExceeded):
        asyncio.run(model.agenerate(prompts, callbacks=handlers))
    assert model.calls.count == 0
    for budget in (tenant, run):
        assert (budget.snapshot().llm_calls, budget.snapshot().held_llm_calls) == (0, 0)
    model.generate(prompts[:2], callbacks=handlers)  # the run's two calls are still there
    assert model.calls.count == 2 == run.snapshot().llm_calls


def test_an_inner_scope_of_the_same_budget_replaces_the_outer_one_until_it_ends():
    model = make_model()
    chain = make_chain(model)
    budget = Budget(Limits(max_llm_calls=9))
    with budget_scope(budget, agent="planner"):
        with budget_scope(budget, agent="writer"):
            chain.invoke({"question": "q"})
        chain.invoke({"question": "q"})
    assert [e.agent for e in budget.ledger.history(kind="llm")] == ["writer", "planner"]


# -- tools -------------------------------------------------------------------------------------


def test_a_denied_tool_body_never_runs():
    ran = []

    @tool
    def search(query: str) -> str:
        """Search the web."""
        ran.append(query)
        return "results"

    budget = Budget(Limits(max_tool_calls=1))
    handler = BudgetCallbackHandler(budget, agent="researcher")
    assert search.invoke("otters", config={"callbacks": [handler]}) == "results"
    with pytest.raises(BudgetExceeded) as info:
        search.invoke("beavers", config={"callbacks": [handler]})
    assert info.value.resource == "tool_calls" and info.value.agent == "researcher"
    assert ran == ["otters"]
    assert [e.location for e in budget.ledger.history(kind="tool")] == ["search"]


# -- attribution -------------------------------------------------------------------------------


def test_attribution_order():
    assert agent_from_metadata({"agent": "a", "langgraph_node": "n"}) == "a"
    assert agent_from_metadata({"langgraph_checkpoint_ns": "researcher:1|agent:2", "langgraph_node": "agent"}) == (
        "researcher"
    )
    assert agent_from_metadata({"langgraph_node": "writer"}) == "writer"
    assert agent_from_metadata({}) is None


def test_metadata_names_the_agent_and_the_handler_agent_wins():
    model = make_model()
    budget = Budget()
    chain = make_chain(model).with_config(metadata={"agent": "critic"})
    chain.invoke({"question": "q"}, config={"callbacks": [BudgetCallbackHandler(budget)]})
    chain.invoke({"question": "q"}, config={"callbacks": [BudgetCallbackHandler(budget, agent="pinned")]})
    assert [e.agent for e in budget.ledger.history(kind="llm")] == ["critic", "pinned"]
    assert budget.report()["critic"]["consumed"] == 150


def test_nested_runnable_calls_are_charged():
    model = make_model()
    budget = Budget()

    def step(x: dict) -> str:
        return model.invoke(x["question"]).content  # no config passed: the context carries the callbacks

    RunnableLambda(step).invoke({"question": "q"}, config={"callbacks": [BudgetCallbackHandler(budget)]})
    assert budget.snapshot().llm_calls == 1


# -- soft limits -------------------------------------------------------------------------------


def test_soft_limits_reach_the_user_as_callback_and_custom_event():
    model = make_model(max_tokens=40)
    budget = Budget(Limits(max_total_tokens=1_000, warn_at=(0.25,)))
    seen: list[SoftLimit] = []
    handler = BudgetCallbackHandler(budget, on_soft_limit=seen.append)
    chain = make_chain(model)

    async def go():
        events = []
        for _ in range(2):
            async for event in chain.astream_events({"question": "q"}, config={"callbacks": [handler]}):
                if event["event"] == "on_custom_event":
                    events.append(event)
        return events

    custom = asyncio.run(go())
    assert [e.threshold for e in seen] == [0.25]
    assert [e["name"] for e in custom] == [SOFT_LIMIT_EVENT]
    assert custom[0]["data"]["resource"] == "total_tokens"


def test_on_soft_limit_is_called_once_per_crossing_not_on_every_later_call():
    model = make_model(max_tokens=40)
    budget = Budget(Limits(max_total_tokens=1_000, warn_at=(0.25, 0.5)))
    seen: list[SoftLimit] = []
    handler = BudgetCallbackHandler(budget, on_soft_limit=seen.append)
    for _ in range(5):  # 150 tokens a call: 30% after the 2nd, 60% after the 4th
        model.invoke("q", config={"callbacks": [handler]})
    assert [e.threshold for e in seen] == [0.25, 0.5]


def test_a_soft_limit_crossed_by_tool_calls_reaches_the_user_too():
    @tool
    def search(query: str) -> str:
        """Search the web."""
        return "results"

    class Events(BaseCallbackHandler):
        def __init__(self) -> None:
            self.seen: list[tuple[str, Any]] = []

        def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            self.seen.append((name, data["resource"]))

    budget = Budget(Limits(max_tool_calls=4, warn_at=(0.5,)))
    seen: list[SoftLimit] = []
    handler, events = BudgetCallbackHandler(budget, on_soft_limit=seen.append), Events()
    chain = RunnableLambda(lambda q: q) | search
    for _ in range(3):  # the 2nd call crosses 50%
        chain.invoke("otters", config={"callbacks": [handler, events]})
    asyncio.run(chain.ainvoke("otters", config={"callbacks": [handler, events]}))
    assert [(e.resource, e.threshold) for e in seen] == [("tool_calls", 0.5)]
    assert events.seen == [(SOFT_LIMIT_EVENT, "tool_calls")]


def test_on_soft_limit_of_a_handler_that_stood_aside_for_another_of_its_budget_is_still_called():
    # One handler of a budget family charges a shared call; the others' users still asked to hear
    # of their budget's crossings (and only of those: not of a child's).
    model = make_model(max_tokens=40)
    day = Budget(Limits(max_total_tokens=1_000, warn_at=(0.1,)), name="day")
    run = Budget(Limits(max_total_tokens=1_000, warn_at=(0.1,)), name="run", parent=day)
    heard_day: list[SoftLimit] = []
    heard_run: list[SoftLimit] = []
    handlers = [
        BudgetCallbackHandler(day, on_soft_limit=heard_day.append),
        BudgetCallbackHandler(run, on_soft_limit=heard_run.append),
        BudgetCallbackHandler(run, agent="writer"),  # outranks both: it charges the call
    ]
    make_chain(model).invoke({"question": "q"}, config={"callbacks": handlers})
    assert day.snapshot().llm_calls == 1 and [e.agent for e in run.ledger.history(kind="llm")] == ["writer"]
    assert [e.budget for e in heard_day] == ["day"]
    assert sorted(e.budget for e in heard_run) == ["day", "run"]


def test_an_on_soft_limit_callback_that_raises_is_logged_and_the_calls_go_on(caplog):
    model = make_model(max_tokens=40)
    budget = Budget(Limits(max_total_tokens=1_000, warn_at=(0.25,)))

    def broken(event: SoftLimit) -> None:
        raise ValueError("dashboard down")

    handler = BudgetCallbackHandler(budget, on_soft_limit=broken)
    with caplog.at_level(logging.ERROR, logger="budgetary"):
        for _ in range(3):
            assert model.invoke("q", config={"callbacks": [handler]}).content
    assert budget.snapshot().llm_calls == 3
    assert budget.ledger.history(kind="soft_limit")  # the crossing is still recorded
    assert "dashboard down" in caplog.text


def test_handler_is_shared_not_copied():
    import copy

    handler = BudgetCallbackHandler(Budget())
    assert copy.copy(handler) is handler and copy.deepcopy(handler) is handler
    assert handler.raise_error and handler.run_inline


def test_usage_metadata_handler_comparison_records_the_same_tokens():
    model = make_model()
    budget = Budget()
    usage_handler = UsageMetadataCallbackHandler()
    make_chain(model).invoke({"question": "q"}, config={"callbacks": [usage_handler, BudgetCallbackHandler(budget)]})
    (reported,) = usage_handler.usage_metadata.values()
    assert reported["input_tokens"] == budget.snapshot().input_tokens
    assert reported["output_tokens"] == budget.snapshot().output_tokens


def test_a_message_response_model_name_is_priced():
    model = make_model(responses=[AIMessage("fine")])
    budget = Budget(Limits(max_cost_usd="1"))
    model.invoke("x", config={"callbacks": [BudgetCallbackHandler(budget)]})
    assert budget.snapshot().cost_usd > 0


def _tool_with_a_long_description():
    @tool(description="Look an otter fact up. " + "Otters hold hands while they sleep. " * 300)
    def otter_facts(term: str) -> str:
        return term

    return otter_facts


def test_bound_tool_schemas_count_in_the_estimate_so_a_call_they_push_over_the_cap_is_refused():
    # The schemas (about 2,400 tokens) are sent with every call; the message alone is tiny.
    model = make_model(max_tokens=40)
    bound = model.bind_tools([_tool_with_a_long_description()])
    budget = Budget(Limits(max_input_tokens=1_000))
    with pytest.raises(BudgetExceeded):
        bound.invoke("hi", config={"callbacks": [BudgetCallbackHandler(budget)]})
    assert provider_calls(model) == 0
    model.invoke("hi", config={"callbacks": [BudgetCallbackHandler(budget)]})  # without the tools it fits
    assert provider_calls(model) == 1


# -- BudgetMiddleware for create_agent ---------------------------------------------------------


MESSAGES = {"messages": [("user", "what is an otter?")]}


def _agent_parts():
    pytest.importorskip("langchain.agents")
    from langchain.agents import create_agent

    @tool
    def lookup(term: str) -> str:
        """Look a term up."""
        return f"{term}: a semi-aquatic mammal"

    responses = [
        AIMessage("", tool_calls=[{"name": "lookup", "args": {"term": "otter"}, "id": "call-1"}]),
        AIMessage("Otters are semi-aquatic mammals."),
    ]
    return create_agent, lookup, make_model(responses=responses)


def test_middleware_end_finishes_the_agent_with_a_clear_message():
    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, lookup, model = _agent_parts()
    budget = Budget(Limits(max_llm_calls=1))
    agent = create_agent(model, tools=[lookup], middleware=[BudgetMiddleware(budget, exit_behavior="end")])
    result = agent.invoke({"messages": [("user", "what is an otter?")]})
    last = result["messages"][-1]
    assert isinstance(last, AIMessage) and "budget refused" in last.content and "llm_calls" in last.content
    assert provider_calls(model) == 1
    assert budget.snapshot().llm_calls == 1 and budget.snapshot().total_tokens == 150


def test_middleware_error_raises_budget_exceeded():
    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, lookup, model = _agent_parts()
    budget = Budget(Limits(max_llm_calls=1))
    agent = create_agent(model, tools=[lookup], middleware=[BudgetMiddleware(budget, exit_behavior="error")])
    with pytest.raises(BudgetExceeded) as info:
        agent.invoke({"messages": [("user", "what is an otter?")]})
    assert info.value.resource == "llm_calls"
    assert provider_calls(model) == 1


def _pausing_agent(budget: Budget) -> tuple[Any, FakeChatModel]:
    """A ``create_agent`` agent whose BudgetMiddleware interrupts (with a checkpointer), and its model."""
    from langgraph.checkpoint.memory import InMemorySaver

    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, lookup, model = _agent_parts()
    middleware = [BudgetMiddleware(budget, exit_behavior="interrupt")]
    return create_agent(model, tools=[lookup], middleware=middleware, checkpointer=InMemorySaver()), model


def test_middleware_interrupt_hands_control_back_then_resumes_after_a_top_up():
    from langgraph.types import Command

    budget = Budget(Limits(max_llm_calls=1))
    agent, model = _pausing_agent(budget)
    config = {"configurable": {"thread_id": "t1"}}
    paused = agent.invoke({"messages": [("user", "what is an otter?")]}, config)
    (pending,) = paused["__interrupt__"]
    assert pending.value["resource"] == "llm_calls" and pending.value["limit"] == 1
    assert provider_calls(model) == 1
    done = agent.invoke(Command(resume={"llm_calls": 1}), config)
    assert done["messages"][-1].content == "Otters are semi-aquatic mammals."
    assert provider_calls(model) == 2
    assert budget.snapshot().limits.max_llm_calls == 2  # the top-up was applied once


def test_async_middleware_awaits_a_sqlite_store_off_the_loop_then_ends_and_resumes(tmp_path: Any) -> None:
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, lookup, model = _agent_parts()
    budget = Budget(Limits(max_llm_calls=1), store=f"sqlite:///{tmp_path}/b.db")
    seen = _spy_store_threads(budget)
    agent = create_agent(
        model, tools=[lookup], middleware=[BudgetMiddleware(budget, exit_behavior="interrupt")],
        checkpointer=InMemorySaver(),
    )  # fmt: skip
    config = {"configurable": {"thread_id": "t1"}}

    async def go() -> tuple[Any, Any, str]:
        paused = await agent.ainvoke({"messages": [("user", "what is an otter?")]}, config)
        done = await agent.ainvoke(Command(resume={"llm_calls": 1}), config)
        return paused, done, threading.current_thread().name

    paused, done, loop_thread = asyncio.run(go())
    during, seen[:] = list(seen), []  # what follows reads the store from this thread, outside the loop
    assert paused["__interrupt__"][0].value["resource"] == "llm_calls"
    assert done["messages"][-1].content == "Otters are semi-aquatic mammals."
    assert provider_calls(model) == 2 == budget.snapshot().llm_calls
    assert budget.snapshot().held_llm_calls == 0
    assert during and loop_thread not in during


def test_middleware_and_handler_together_charge_once():
    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, lookup, model = _agent_parts()
    budget = Budget()
    agent = create_agent(model, tools=[lookup], middleware=[BudgetMiddleware(budget)])
    agent.invoke({"messages": [("user", "q")]}, config={"callbacks": [BudgetCallbackHandler(budget)]})
    assert provider_calls(model) == 2 == budget.snapshot().llm_calls
    assert budget.snapshot().tool_calls == 1  # tools are counted by the handler


def test_middleware_of_a_child_budget_and_a_scope_of_its_parent_charge_the_parent_once():
    # The middleware's charge of the child budget is also the parent's: the parent's handler
    # reserving the same model call again would count every call twice against the parent.
    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, lookup, model = _agent_parts()
    day = Budget(Limits(max_total_tokens=100_000), name="day")
    run = Budget(Limits(max_total_tokens=10_000), name="run", parent=day)
    agent = create_agent(model, tools=[lookup], middleware=[BudgetMiddleware(run)])
    agent.invoke({"messages": [("user", "q")]}, config={"callbacks": [BudgetCallbackHandler(day)]})
    with budget_scope(day):
        asyncio.run(agent.ainvoke({"messages": [("user", "q")]}))
    assert provider_calls(model) == 4 == run.snapshot().llm_calls == day.snapshot().llm_calls
    assert day.snapshot().total_tokens == run.snapshot().total_tokens == 4 * 150
    assert day.snapshot().held_tokens == 0 and day.snapshot().tool_calls == 2


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
def test_middleware_of_a_parent_budget_and_a_scope_of_its_child_charge_the_parent_once(run_async):
    # A tenant's middleware on the agent, a run's budget (the tenant's child) as a scope around it:
    # the handler's charge of the child is also the tenant's, so the middleware's hold must go.
    # Both counted against the tenant, which refused the second of the two calls its cap allows.
    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, lookup, model = _agent_parts()
    tenant = Budget(Limits(max_llm_calls=2), name="tenant")
    run = Budget(name="run", parent=tenant)
    agent = create_agent(model, tools=[lookup], middleware=[BudgetMiddleware(tenant, exit_behavior="error")])
    with budget_scope(run):
        result = asyncio.run(agent.ainvoke(MESSAGES)) if run_async else agent.invoke(MESSAGES)
    assert result["messages"][-1].content == "Otters are semi-aquatic mammals."
    assert provider_calls(model) == 2 == tenant.snapshot().llm_calls == run.snapshot().llm_calls
    assert tenant.snapshot().total_tokens == 2 * 150 and tenant.snapshot().held_llm_calls == 0
    assert len(tenant.ledger.history(kind="llm")) == 2


def test_middleware_holds_the_max_tokens_the_call_is_made_with():
    from langchain.agents.middleware import AgentMiddleware

    from budgetary.integrations.langchain import BudgetMiddleware

    class Settings(AgentMiddleware):
        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            return handler(request.override(model_settings={"max_tokens": 33}))

    create_agent, lookup, _ = _agent_parts()
    for middleware, model_max, reserved in (([], -1, 1024), ([Settings()], None, 33)):
        model = make_model(responses=[AIMessage("Otters float.")], usage=None, max_tokens=model_max)
        budget = Budget(Limits(max_total_tokens=100_000))
        agent = create_agent(model, tools=[lookup], middleware=[*middleware, BudgetMiddleware(budget)])
        agent.invoke({"messages": [("user", "q")]})
        (entry,) = budget.ledger.history(kind="llm")  # no usage reported: the hold is what is charged
        assert entry.estimated and entry.usage.output_tokens == reserved


def test_middleware_of_two_budgets_govern_one_agent_together():
    # A per-user and a per-feature budget, neither the parent of the other: LangChain refuses two
    # middleware with one name, so each instance is named after its budget.
    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, lookup, model = _agent_parts()
    user, feature = Budget(name="user"), Budget(Limits(max_llm_calls=1), name="feature")
    middleware = [BudgetMiddleware(user), BudgetMiddleware(feature, agent="writer")]
    assert [m.name for m in middleware] == ["BudgetMiddleware[user]", "BudgetMiddleware[feature/writer]"]
    with budget_scope(user):  # the outer middleware's calls are not charged again by the user's scope
        result = create_agent(model, tools=[lookup], middleware=middleware).invoke(MESSAGES)
    assert "budget refused" in result["messages"][-1].content
    assert provider_calls(model) == 1 == user.snapshot().llm_calls == feature.snapshot().llm_calls
    assert BudgetMiddleware(Budget(name="a|b:c")).name == "BudgetMiddleware[a_b_c]"  # LangGraph's reserved characters


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
def test_a_model_call_refused_by_an_inner_middleware_is_not_charged_to_the_outer_ones_budget(run_async):
    # The inner middleware refuses at its reserve (the call's estimate is over its token cap) and
    # ends the agent with its message: no call reached the provider, so the outer budget's hold
    # must be given back, not charged as a call that answered without usage.
    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, lookup, model = _agent_parts()
    user, feature = Budget(name="user"), Budget(Limits(max_total_tokens=100), name="feature")
    agent = create_agent(model, tools=[lookup], middleware=[BudgetMiddleware(user), BudgetMiddleware(feature)])
    result = asyncio.run(agent.ainvoke(MESSAGES)) if run_async else agent.invoke(MESSAGES)
    assert "budget refused" in result["messages"][-1].content
    assert provider_calls(model) == 0
    assert (user.snapshot().llm_calls, user.snapshot().total_tokens, user.snapshot().held_tokens) == (0, 0, 0)
    assert not user.ledger.history(kind="llm")


def test_middleware_prices_with_the_billed_model_name():
    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, lookup, _ = _agent_parts()
    model = make_model(
        model_name="my-azure-deployment", billed_model_name="gpt-4o-mini-2024-07-18", responses=[AIMessage("hi")]
    )
    for run in (lambda agent: agent.invoke(MESSAGES), lambda agent: asyncio.run(agent.ainvoke(MESSAGES))):
        # No USD limit: the requested deployment name has no price, so only the billed name can price it.
        budget = Budget(Limits(max_total_tokens=100_000))
        run(create_agent(model, tools=[lookup], middleware=[BudgetMiddleware(budget)]))
        (entry,) = budget.ledger.history(kind="llm")
        assert entry.model == "gpt-4o-mini-2024-07-18" and entry.cost_usd is not None and entry.cost_usd > 0
        assert budget.snapshot().unpriced_calls == 0


def test_middleware_reports_soft_limits_by_callback_and_custom_event():
    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, lookup, _ = _agent_parts()
    budget = Budget(Limits(max_total_tokens=1_000, warn_at=(0.1,)))  # one call (150 tokens) crosses 10%
    seen: list[SoftLimit] = []
    agent = create_agent(
        make_model(max_tokens=40, responses=[AIMessage("hi")]), tools=[lookup],
        middleware=[BudgetMiddleware(budget, on_soft_limit=seen.append)],
    )  # fmt: skip

    async def go():
        return [e async for e in agent.astream_events(MESSAGES, version="v2") if e["event"] == "on_custom_event"]

    custom = asyncio.run(go())
    assert [e.threshold for e in seen] == [0.1]
    assert [e["name"] for e in custom] == [SOFT_LIMIT_EVENT]
    assert custom[0]["data"]["resource"] == "total_tokens"


def test_middleware_counts_the_agents_tool_schemas_in_the_estimate():
    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, _, _ = _agent_parts()
    model = make_model(max_tokens=40, responses=[AIMessage("hi")])
    budget = Budget(Limits(max_input_tokens=1_000))
    agent = create_agent(
        model, tools=[_tool_with_a_long_description()], middleware=[BudgetMiddleware(budget, exit_behavior="error")]
    )
    with pytest.raises(BudgetExceeded):
        agent.invoke(MESSAGES)
    assert provider_calls(model) == 0


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
def test_middleware_does_not_charge_llm_cache_hits(run_async):
    # The same question three times: one provider call, two answers from the cache. Charged as
    # calls, the cache hits counted 450 tokens nobody paid for and used up the cap of 2 calls.
    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, lookup, _ = _agent_parts()
    model = make_model(responses=[AIMessage("Otters float.")])
    budget = Budget(Limits(max_llm_calls=2))
    agent = create_agent(model, tools=[lookup], middleware=[BudgetMiddleware(budget, exit_behavior="error")])
    set_llm_cache(InMemoryCache())
    try:
        for _ in range(3):
            result = asyncio.run(agent.ainvoke(MESSAGES)) if run_async else agent.invoke(MESSAGES)
            assert result["messages"][-1].content == "Otters float."
    finally:
        set_llm_cache(None)
    assert provider_calls(model) == 1
    snapshot = budget.snapshot()
    assert (snapshot.llm_calls, snapshot.total_tokens, snapshot.held_tokens, snapshot.held_llm_calls) == (1, 150, 0, 0)
    assert len(budget.ledger.history(kind="llm")) == 1


class _LLMOutputUsageModel(FakeChatModel):
    """Reports usage only in ``llm_output["token_usage"]`` (OpenAI's shape), as older integrations do."""

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        return self._moved(super()._generate(messages, stop, run_manager, **kwargs))

    async def _agenerate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        return self._moved(await super()._agenerate(messages, stop, run_manager, **kwargs))

    @staticmethod
    def _moved(result: Any) -> Any:
        message = result.generations[0].message
        usage, message.usage_metadata = message.usage_metadata, None
        result.llm_output = {
            "model_name": message.response_metadata["model_name"],
            "token_usage": {
                "prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"],
                "total_tokens": usage["total_tokens"],
                "prompt_tokens_details": {"cached_tokens": usage["input_token_details"]["cache_read"]},
                "completion_tokens_details": {"reasoning_tokens": usage["output_token_details"]["reasoning"]},
            },
        }  # fmt: skip
        return result


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
def test_middleware_charges_usage_reported_only_in_llm_output(run_async):
    # LangChain copies llm_output into the reply's response_metadata: the middleware charged the
    # estimate, flagged, instead of the usage the provider reported there.
    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, lookup, _ = _agent_parts()
    model = _LLMOutputUsageModel(
        usage=dict(USAGE), model_name="my-azure-deployment", billed_model_name="gpt-4o-mini-2024-07-18",
        responses=[AIMessage("Otters float.")],
    )  # fmt: skip
    assert model.invoke("hi").usage_metadata is None  # the fake reports no usage_metadata
    budget = Budget(Limits(max_total_tokens=100_000))
    agent = create_agent(model, tools=[lookup], middleware=[BudgetMiddleware(budget)])
    asyncio.run(agent.ainvoke(MESSAGES)) if run_async else agent.invoke(MESSAGES)
    (entry,) = budget.ledger.history(kind="llm")
    assert not entry.estimated and entry.model == "gpt-4o-mini-2024-07-18"
    assert entry.usage is not None
    assert (entry.usage.input_tokens, entry.usage.output_tokens) == (120, 30)
    assert (entry.usage.cache_read_tokens, entry.usage.reasoning_tokens) == (100, 12)
    assert entry.cost_usd is not None and entry.cost_usd > 0  # priced by the billed name: the deployment has none


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("exit_behavior", ["end", "error"])
def test_middleware_records_each_refusal_it_acts_on_in_the_ledger_once(run_async, exit_behavior):
    # The cap is reached after the first call: the check before the second refuses (it writes no
    # entry itself); a call whose estimate is over the cap is refused by the reserve (which does).
    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, lookup, model = _agent_parts()
    by_check, by_reserve = Budget(Limits(max_llm_calls=1)), Budget(Limits(max_input_tokens=1_000))
    model_too_big = make_model(max_tokens=40, responses=[AIMessage("hi")])
    agents = (
        create_agent(model, tools=[lookup], middleware=[BudgetMiddleware(by_check, exit_behavior=exit_behavior)]),
        create_agent(
            model_too_big, tools=[_tool_with_a_long_description()],
            middleware=[BudgetMiddleware(by_reserve, exit_behavior=exit_behavior)],
        ),
    )  # fmt: skip
    for agent in agents:
        try:
            result = asyncio.run(agent.ainvoke(MESSAGES)) if run_async else agent.invoke(MESSAGES)
        except BudgetExceeded:
            assert exit_behavior == "error"
        else:
            assert exit_behavior == "end" and "budget refused" in result["messages"][-1].content
    (denied,) = by_check.ledger.history(kind="deny")
    assert denied.resource == "llm_calls" and denied.reason
    (denied,) = by_reserve.ledger.history(kind="deny")
    assert denied.resource == "input_tokens"
    assert provider_calls(model) == 1 and provider_calls(model_too_big) == 0


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
def test_middleware_records_a_refusal_that_pauses_the_agent_once_across_its_resume(run_async):
    from langgraph.types import Command

    budget = Budget(Limits(max_llm_calls=1))
    agent, model = _pausing_agent(budget)
    config = {"configurable": {"thread_id": "t1"}}

    def run(value: Any) -> Any:
        return asyncio.run(agent.ainvoke(value, config)) if run_async else agent.invoke(value, config)

    assert run(MESSAGES)["__interrupt__"]
    assert [e.resource for e in budget.ledger.history(kind="deny")] == ["llm_calls"]
    # The resume replays the pause (the check refuses again before the top-up): not a second refusal.
    assert run(Command(resume={"llm_calls": 1}))["messages"][-1].content == "Otters are semi-aquatic mammals."
    assert [e.resource for e in budget.ledger.history(kind="deny")] == ["llm_calls"]
    assert provider_calls(model) == 2


# -- a call longer than the lease keeps its hold ------------------------------------------------


def _held_midway(budget: Budget, after: float) -> tuple[threading.Timer, list[int]]:
    """Sample the budget's held tokens from another thread ``after`` seconds from now."""
    seen: list[int] = []
    timer = threading.Timer(after, lambda: seen.append(budget.snapshot().held_tokens))
    timer.start()
    return timer, seen


def test_a_slow_call_keeps_its_hold_past_the_lease():
    budget = Budget(Limits(max_total_tokens=100_000), lease_ttl=1.0)
    model = make_model(delay=2.5, max_tokens=50)
    sampler, seen = _held_midway(budget, 2.0)
    model.invoke("a long think", config={"callbacks": [BudgetCallbackHandler(budget)]})
    sampler.join()
    assert seen[0] > 50  # two leases in, the call still held its prompt and output reserve
    assert budget.ledger.history(kind="release") == []
    assert budget.snapshot().total_tokens == 150 and budget.snapshot().held_tokens == 0


def test_a_slow_middleware_call_keeps_its_hold_past_the_lease():
    from budgetary.integrations.langchain import BudgetMiddleware

    create_agent, lookup, _ = _agent_parts()
    model = make_model(responses=[AIMessage("Otters float.")], delay=2.5, max_tokens=50)
    budget = Budget(Limits(max_total_tokens=100_000), lease_ttl=1.0)
    agent = create_agent(model, tools=[lookup], middleware=[BudgetMiddleware(budget)])
    sampler, seen = _held_midway(budget, 2.0)
    agent.invoke({"messages": [("user", "q")]})
    sampler.join()
    assert seen[0] > 50
    assert budget.ledger.history(kind="release") == []
    assert budget.snapshot().llm_calls == 1 and budget.snapshot().held_tokens == 0


def test_garbage_usage_from_the_provider_charges_the_estimate_flagged(caplog):
    budget = Budget(Limits(max_total_tokens=100_000))
    model = make_model(usage={"input_tokens": -5, "output_tokens": 3, "total_tokens": -2}, max_tokens=40)
    reply = model.invoke("hello", config={"callbacks": [BudgetCallbackHandler(budget)]})
    assert reply.content  # the user's run is not crashed by the provider's report
    (entry,) = budget.ledger.history(kind="llm")
    assert entry.estimated and entry.usage.output_tokens == 40  # the hold: prompt bound + max_tokens
    assert "unreadable usage" in caplog.text


def test_usage_metadata_that_is_not_a_mapping_charges_the_estimate_flagged(caplog):
    reply = AIMessage("fine")
    object.__setattr__(reply, "usage_metadata", "n/a")  # what model_construct or a late assignment allows
    budget = Budget(Limits(max_total_tokens=100_000))
    model = make_model(responses=[reply], usage=None, max_tokens=40)
    assert model.invoke("hello", config={"callbacks": [BudgetCallbackHandler(budget)]}).content == "fine"
    (entry,) = budget.ledger.history(kind="llm")
    assert entry.estimated and entry.usage.output_tokens == 40
    assert budget.snapshot().held_tokens == 0
    assert "unreadable usage 'n/a'" in caplog.text


def test_a_slow_async_call_keeps_its_hold_and_a_cancelled_one_is_charged_its_estimate_at_once():
    async def scenario() -> tuple[int, int, int, int, list[Any]]:
        budget = Budget(Limits(max_total_tokens=100_000), lease_ttl=1.0)
        handler = BudgetCallbackHandler(budget)
        config = {"callbacks": [handler]}
        slow = asyncio.create_task(make_model(delay=2.5, max_tokens=50).ainvoke("think", config=config))
        doomed = asyncio.create_task(make_model(delay=30, max_tokens=500).ainvoke("x", config=config))
        await asyncio.sleep(0.2)
        doomed.cancel()  # as LangGraph cancels a branch when a sibling fails: LangChain reports nothing
        await asyncio.sleep(0.3)  # well within the lease: the cancelled task's end gave its hold back
        held_after_cancel = budget.snapshot().held_tokens
        await asyncio.sleep(1.5)
        held_midway = budget.snapshot().held_tokens  # past the lease: the live call still holds
        reported = (await slow).usage_metadata["output_tokens"]
        charged = [(e.estimated, e.usage.output_tokens) for e in budget.ledger.history(kind="llm")]
        return (
            held_after_cancel,
            held_midway,
            budget.snapshot().held_tokens,
            budget.snapshot().llm_calls,
            [(False, reported), *charged],
        )

    held_after_cancel, held_midway, held_after, calls, charged = asyncio.run(scenario())
    assert 50 < held_after_cancel == held_midway < 500  # the slow call's prompt bound + 50, not the 500
    # The cancelled call was already at the provider: its estimate is charged, flagged, not forgotten.
    assert (held_after, calls) == (0, 2)
    reported, *charged = charged
    assert sorted(charged) == [reported, (True, 500)]


@pytest.mark.parametrize("runner", ["sync", "async"])
def test_a_cancelled_chain_raises_its_cancellation_after_the_lease_keeper_charged_the_call(runner: str) -> None:
    """The call's task ends first (the keeper charges it), then the chain's own error: that finds nothing to do.

    The chain's error handler used to charge the estimate again and raise UsageError ("already closed")
    in place of the caller's CancelledError or TimeoutError.
    """
    budget = Budget(Limits(max_total_tokens=100_000), lease_ttl=30)
    handler = BudgetCallbackHandler(budget)
    chain_run, call_run = uuid4(), uuid4()
    messages = [[HumanMessage("otters?")]]

    async def call() -> None:  # LangChain runs a chain's model step in a task of its own
        metadata = {"ls_model_name": "gpt-4o-mini"}
        handler.on_chat_model_start({}, messages, run_id=call_run, parent_run_id=chain_run, metadata=metadata)
        await asyncio.sleep(30)

    async def scenario() -> None:
        task = asyncio.create_task(call())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the task's end wakes the keeper, which charges the abandoned call
            if budget.snapshot().held_tokens == 0:
                break
            await asyncio.sleep(0.01)
        if runner == "async":  # what LangChain's async manager awaits
            await handler._aon_chain_error(asyncio.CancelledError(), run_id=chain_run)
        else:
            handler.on_chain_error(asyncio.CancelledError(), run_id=chain_run)

    asyncio.run(scenario())
    (entry,) = budget.ledger.history(kind="llm")
    assert entry.estimated and budget.snapshot().held_tokens == 0 and budget.snapshot().llm_calls == 1


def test_async_branches_cancelled_by_a_siblings_refusal_count_so_the_cap_holds_across_runs():
    # A refused branch makes asyncio cancel its siblings mid-call, with no end or error event. Their
    # calls had reached the provider: if their holds were given back, every later run of the same
    # budget would pass the cap again.
    prompt = ChatPromptTemplate.from_messages([("user", "{q}")])
    model = make_model(delay=0.05)
    parallel = RunnableParallel({f"k{i}": prompt | model | StrOutputParser() for i in range(6)})
    budget = Budget(Limits(max_llm_calls=3))
    handler = BudgetCallbackHandler(budget)
    for _ in range(4):
        with pytest.raises(BudgetExceeded):
            asyncio.run(parallel.ainvoke({"q": "otters"}, config={"callbacks": [handler]}))
    snap = budget.snapshot()
    assert model.calls.count == 3
    assert (snap.llm_calls, snap.held_llm_calls) == (3, 0)
    assert all(e.estimated for e in budget.ledger.history(kind="llm"))


def test_a_stream_closed_early_is_charged_its_estimate_so_the_cap_holds():
    model = make_model(responses=["a b c d e f"], max_tokens=40)
    budget = Budget(Limits(max_llm_calls=3))
    handler = BudgetCallbackHandler(budget)
    for _ in range(3):
        for _chunk in model.stream("go", config={"callbacks": [handler]}):
            break  # the consumer stops reading; the provider has already billed the prompt
    with pytest.raises(BudgetExceeded):
        next(iter(model.stream("go", config={"callbacks": [handler]})))
    assert model.calls.count == 3
    entries = budget.ledger.history(kind="llm")
    assert len(entries) == 3 and all(e.estimated and e.usage.output_tokens == 40 for e in entries)
    assert budget.snapshot().held_llm_calls == 0


# -- async runs never block their event loop on the store ---------------------------------------


def _spy_store_threads(budget: Budget) -> list[str]:
    ops = ("ensure_agent", "reserve", "settle", "release", "count_tool", "record_entry", "figures")
    return record_store_threads(budget, *ops)


def test_async_runs_call_a_sqlite_store_off_the_event_loop_and_still_cap_exactly(tmp_path: Any) -> None:
    model = make_model(delay=0.02)
    budget = Budget(Limits(max_llm_calls=3, max_tool_calls=1), store=f"sqlite:///{tmp_path}/b.db")
    seen = _spy_store_threads(budget)
    handler = BudgetCallbackHandler(budget, agent="researcher")

    @tool
    async def search(query: str) -> str:
        """Search the web."""
        return "results"

    async def go() -> tuple[list[Any], str]:
        loop_thread = threading.current_thread().name
        chain = make_chain(model)
        results = await asyncio.gather(
            *(chain.ainvoke({"question": str(i)}, config={"callbacks": [handler]}) for i in range(6)),
            return_exceptions=True,
        )
        await search.ainvoke("otters", config={"callbacks": [handler]})
        with pytest.raises(BudgetExceeded):
            await search.ainvoke("beavers", config={"callbacks": [handler]})
        return results, loop_thread

    results, loop_thread = asyncio.run(go())
    during, seen[:] = list(seen), []  # what follows reads the store from this thread, outside the loop
    assert sum(isinstance(r, BudgetExceeded) for r in results) == 3
    assert provider_calls(model) == 3 == budget.snapshot().llm_calls
    assert budget.snapshot().held_llm_calls == 0 and budget.snapshot().tool_calls == 1
    assert during and loop_thread not in during  # reserves, settles, tool counts, the refusals' figures


def test_a_sync_call_inside_a_coroutine_is_still_refused(tmp_path: Any) -> None:
    # model.invoke() from async code runs LangChain's sync callback manager on the loop's thread:
    # the handler must answer it synchronously (a coroutine there would only be logged).
    model = make_model()
    budget = Budget(Limits(max_llm_calls=1))
    handler = BudgetCallbackHandler(budget)

    async def go() -> None:
        model.invoke("one", config={"callbacks": [handler]})
        with pytest.raises(BudgetExceeded):
            model.invoke("two", config={"callbacks": [handler]})

    asyncio.run(go())
    assert provider_calls(model) == 1


@pytest.mark.redis
def test_async_runs_await_a_redis_store_on_their_loop(redis_url: str, key_prefix: str) -> None:
    from budgetary.core.stores.redis import RedisStore

    model = make_model()
    store = RedisStore(redis_url, key_prefix=key_prefix)
    budget = Budget(Limits(max_llm_calls=2), name="b", store=store)
    handler = BudgetCallbackHandler(budget, agent="researcher")
    budget.ensure_agent("researcher")
    sync_ops: list[str] = []
    call = store._call

    def spy(keys: list[Any], argv: list[Any]) -> str:
        sync_ops.append(argv[0])
        return call(keys, argv)

    store._call = spy  # type: ignore[method-assign]

    async def go() -> None:
        chain = make_chain(model)
        await chain.ainvoke({"question": "q"}, config={"callbacks": [handler]})
        await chain.ainvoke({"question": "q"}, config={"callbacks": [handler]})
        with pytest.raises(BudgetExceeded):
            await chain.ainvoke({"question": "q"}, config={"callbacks": [handler]})
        await store.aclose()

    asyncio.run(go())
    assert sync_ops == []  # every store call of the run was awaited on its loop
    assert provider_calls(model) == 2
    store._call = call  # type: ignore[method-assign]
    assert budget.snapshot().llm_calls == 2 and budget.snapshot().held_llm_calls == 0
    store.close()


# -- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: BudgetCallbackHandler(None), "budget must be a Budget, got NoneType None"),
        (lambda: budget_scope("b").__enter__(), "budget must be a Budget, got str 'b'"),
        (lambda: BudgetCallbackHandler(Budget(), agent=5), "agent must be a str or None, got int 5"),
        (lambda: BudgetCallbackHandler(Budget(), agent=""), "agent must be a non-empty str or None (the run itself)"),
        (lambda: BudgetCallbackHandler(Budget(), on_soft_limit=3), "on_soft_limit must be a callable or None, got int"),
    ],
    ids=["handler-budget", "scope-budget", "handler-agent", "handler-empty-agent", "handler-on_soft_limit"],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(build, message):
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        build()


def test_bad_middleware_arguments_fail_at_construction():
    pytest.importorskip("langchain.agents")
    from budgetary.integrations.langchain import BudgetMiddleware

    with pytest.raises(ConfigurationError, match=re.escape("budget must be a Budget, got NoneType None")):
        BudgetMiddleware(None)
    with pytest.raises(ConfigurationError, match=re.escape("agent must be a str or None, got int 5")):
        BudgetMiddleware(Budget(), agent=5)


def test_a_refusal_is_not_logged_by_langchain_as_a_callback_error(caplog):
    class Broken(BaseCallbackHandler):
        def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
            raise ValueError("a real bug")

    class Mine(BudgetCallbackHandler):  # a subclass is named by its own class in LangChain's warning
        pass

    model = FakeChatModel(usage={"input_tokens": 10, "output_tokens": 5, "total_tokens": 15})
    caplog.set_level(logging.WARNING, logger="langchain_core.callbacks.manager")
    for handler in (BudgetCallbackHandler(Budget(Limits(max_llm_calls=0))), Mine(Budget(Limits(max_llm_calls=0)))):
        with pytest.raises(BudgetExceeded):
            model.invoke("hi", config={"callbacks": [handler]})
        with pytest.raises(BudgetExceeded):
            asyncio.run(model.ainvoke("hi", config={"callbacks": [handler]}))
    assert [r.getMessage() for r in caplog.records] == []
    model.invoke("hi", config={"callbacks": [Broken(), BudgetCallbackHandler(Budget())]})
    assert [r.getMessage() for r in caplog.records] == [
        "Error in Broken.on_chat_model_start callback: ValueError('a real bug')"
    ]  # other handlers' errors are still logged
