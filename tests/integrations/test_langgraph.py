"""The LangGraph adapter against real compiled graphs, with a fake model only at the provider edge."""

from __future__ import annotations

import asyncio
import operator
from typing import Annotated, Any, TypedDict

import pytest

pytest.importorskip("langgraph")

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, RetryPolicy, Send, interrupt

from budgetary import Budget, BudgetExceeded, Limits, Skipped, UsageError, is_budget_skipped
from budgetary.integrations.langchain import BudgetCallbackHandler
from budgetary.integrations.langgraph import budget_node, govern_graph
from tests.fakes import FakeChatModel, record_store_threads

USAGE = {"input_tokens": 80, "output_tokens": 20, "total_tokens": 100}


def fake(**kwargs: Any) -> FakeChatModel:
    kwargs.setdefault("usage", dict(USAGE))
    kwargs.setdefault("max_tokens", 20)
    return FakeChatModel(**kwargs)


class Research(TypedDict, total=False):
    topic: str
    notes: Annotated[list[str], operator.add]
    budget_skipped: Annotated[list[Skipped], operator.add]


class Fan(TypedDict, total=False):
    items: list[int]
    results: Annotated[list[str], operator.add]


def fan_out(worker: Any) -> StateGraph:
    """A graph that sends each of ``items`` to its own ``worker`` branch (``Send``)."""
    builder = StateGraph(Fan)
    builder.add_node("worker", worker)
    builder.add_conditional_edges(START, lambda s: [Send("worker", {"item": i}) for i in s["items"]])
    builder.add_edge("worker", END)
    return builder


def research_builder(model: FakeChatModel, *, asynchronous: bool = False) -> StateGraph:
    def step(name: str):
        def node(state: Research) -> dict:
            reply = model.invoke(f"{name}: {state['topic']}")  # no config passed: the context carries it
            return {"notes": [f"{name}:{reply.content}"]}

        async def async_node(state: Research) -> dict:
            reply = await model.ainvoke(f"{name}: {state['topic']}")
            return {"notes": [f"{name}:{reply.content}"]}

        return async_node if asynchronous else node

    builder = StateGraph(Research)
    for name in ("planner", "researcher", "writer", "critic"):
        builder.add_node(name, step(name))
    builder.add_edge(START, "planner")
    builder.add_edge("planner", "researcher")
    builder.add_edge("researcher", "writer")
    builder.add_edge("writer", "critic")
    builder.add_edge("critic", END)
    return builder


def test_research_graph_skip_deny_resume_and_interrupt():
    model = fake()
    # Each call holds a prompt bound plus 20 output tokens and charges 100: three calls fit, the fourth does not.
    budget = Budget(Limits(max_total_tokens=330), name="research")
    app = govern_graph(research_builder(model), budget, policies={"critic": "skip"}, checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "run-1"}}
    state = app.invoke({"topic": "otters"}, config)
    assert [n.split(":")[0] for n in state["notes"]] == ["planner", "researcher", "writer"]
    assert [m.agent for m in state["budget_skipped"]] == ["critic"]
    assert is_budget_skipped(state["budget_skipped"][0])
    assert model.calls.count == 3
    assert {e.agent for e in budget.ledger.history(kind="llm")} == {"planner", "researcher", "writer"}
    assert budget.ledger.history(kind="skip")[0].location == "critic"

    # The writer is denied in a second run; a top-up and invoke(None) re-run only the writer.
    model2 = fake()
    budget2 = Budget(Limits(max_total_tokens=230), name="research-2")
    app2 = govern_graph(research_builder(model2), budget2, policies={"critic": "skip"}, checkpointer=InMemorySaver())
    config2 = {"configurable": {"thread_id": "run-2"}}
    with pytest.raises(BudgetExceeded) as info:
        app2.invoke({"topic": "otters"}, config2)
    assert info.value.agent == "writer"
    assert app2.get_state(config2).next == ("writer",)
    assert model2.calls.count == 2
    budget2.top_up(total_tokens=200)
    resumed = app2.invoke(None, config2)
    assert model2.calls.count == 4  # writer and critic ran once each; planner and researcher were not repeated
    assert [n.split(":")[0] for n in resumed["notes"]] == ["planner", "researcher", "writer", "critic"]


def test_interrupt_resumes_with_a_top_up_applied_once():
    model = fake()
    budget = Budget(Limits(max_total_tokens=230), name="research-3")
    app = govern_graph(research_builder(model), budget, on_exhausted="interrupt", checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "run-3"}}
    paused = app.invoke({"topic": "otters"}, config)
    (pending,) = paused["__interrupt__"]
    assert pending.value["node"] == "writer" and pending.value["resource"] == "total_tokens"
    assert pending.value["limit"] == 230
    done = app.invoke(Command(resume={"total_tokens": 500}), config)
    assert [n.split(":")[0] for n in done["notes"]] == ["planner", "researcher", "writer", "critic"]
    assert budget.snapshot().limits.max_total_tokens == 730  # once, though the writer re-ran after the resume
    assert model.calls.count == 4


@pytest.mark.parametrize("runner", ["sync", "async"])
def test_a_subgraph_node_refused_inside_pauses_once_and_goes_on_after_the_top_up(runner: str) -> None:
    """A call refused in a nested graph stops it; the node pauses as it ends, and the resume's answer lets it finish."""
    search, summarize = fake(), fake()
    inner = StateGraph(Research)
    inner.add_node("search", lambda state: {"notes": [search.invoke("search").content]})
    inner.add_node("summarize", lambda state: {"notes": [summarize.invoke("sum up").content]})
    inner.add_edge(START, "search")
    inner.add_edge("search", "summarize")
    outer = StateGraph(Research)
    outer.add_node("research", inner.compile())
    outer.add_edge(START, "research")
    budget = Budget(Limits(max_llm_calls=1))
    app = govern_graph(outer, budget, on_exhausted="interrupt", checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t"}}

    def run(value: Any) -> dict:
        return app.invoke(value, config) if runner == "sync" else asyncio.run(app.ainvoke(value, config))

    (pending,) = run({"topic": "otters"})["__interrupt__"]
    assert (pending.value["agent"], pending.value["resource"]) == ("research", "llm_calls")
    done = run(Command(resume={"llm_calls": 3}))
    assert "__interrupt__" not in done and done["notes"] == [search.responses[0], summarize.responses[0]]
    # The resumed node re-ran from its start: the search call is repeated (see the README).
    assert (search.calls.count, summarize.calls.count) == (2, 1)
    assert budget.snapshot().limits.max_llm_calls == 4 and budget.snapshot().held_llm_calls == 0


def test_an_async_graph_interrupts_and_resumes_with_the_store_off_its_loop(tmp_path: Any) -> None:
    import threading

    model = fake()
    builder = research_builder(model, asynchronous=True)
    budget = Budget(Limits(max_total_tokens=230), name="research-a", store=f"sqlite:///{tmp_path}/b.db")
    seen = record_store_threads(budget, "begin_agent", "reserve", "settle", "figures", "top_up", "record_entry")
    app = govern_graph(builder, budget, on_exhausted="interrupt", checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "run-a"}}

    async def go() -> tuple[dict, dict, str]:
        paused = await app.ainvoke({"topic": "otters"}, config)
        done = await app.ainvoke(Command(resume={"total_tokens": 500}), config)
        return paused, done, threading.current_thread().name

    paused, done, loop_thread = asyncio.run(go())
    during, seen[:] = list(seen), []
    assert paused["__interrupt__"][0].value["node"] == "writer"
    assert [n.split(":")[0] for n in done["notes"]] == ["planner", "researcher", "writer", "critic"]
    assert budget.snapshot().limits.max_total_tokens == 730  # applied once
    assert model.calls.count == 4
    assert during and loop_thread not in during


def test_an_interrupted_run_resumes_after_a_top_up_from_the_command_line(tmp_path):
    import io

    from budgetary.cli import main as cli

    model = fake()
    url = f"sqlite:///{tmp_path / 'budget.db'}"
    budget = Budget(Limits(max_total_tokens=230), name="research-4", store=url)
    app = govern_graph(research_builder(model), budget, on_exhausted="interrupt", checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "run-4"}}
    (pending,) = app.invoke({"topic": "otters"}, config)["__interrupt__"]
    assert pending.value["node"] == "writer"
    # An operator raises the budget from another process; the run continues with an empty resume.
    assert cli(["--store", url, "top-up", "research-4", "--total-tokens", "500"], out=io.StringIO()) == 0
    done = app.invoke(Command(resume={}), config)
    assert [n.split(":")[0] for n in done["notes"]] == ["planner", "researcher", "writer", "critic"]
    assert budget.snapshot().limits.max_total_tokens == 730 and model.calls.count == 4


class Reviewed(TypedDict, total=False):
    draft: str
    approved: Any


def reviewed_draft(model: FakeChatModel, *, ask_first: bool) -> StateGraph:
    """One node that asks a human (its own interrupt()) and calls the model, in either order."""

    def write(state: Reviewed) -> dict:
        approved = interrupt({"q": "write it?"}) if ask_first else None
        draft = str(model.invoke("write").content)
        if not ask_first:
            approved = interrupt({"q": f"approve {draft!r}?"})
        return {"draft": draft, "approved": approved}

    return one_node(write)


def one_node(fn: Any) -> StateGraph:
    builder = StateGraph(Reviewed)
    builder.add_node(fn.__name__, fn)
    builder.add_edge(START, fn.__name__)
    return builder


def pausing(builder: StateGraph, budget: Budget) -> tuple[Any, dict]:
    """``builder`` governed under ``interrupt`` with a checkpointer, and a thread's config."""
    app = govern_graph(builder, budget, on_exhausted="interrupt", checkpointer=InMemorySaver())
    return app, {"configurable": {"thread_id": "t"}}


@pytest.mark.parametrize("runner", ["sync", "async"])
@pytest.mark.parametrize("refused_at, ask_first", [("call", False), ("call", True), ("entry", False)])
def test_a_node_asking_its_own_questions_gets_its_answers_around_a_budget_interrupt(
    runner: str, refused_at: str, ask_first: bool
) -> None:
    """LangGraph hands resume values to a task's interrupts by position: the budget's must not shift the node's."""
    model = fake()
    budget = Budget(Limits(max_llm_calls=0) if refused_at == "call" else Limits(max_agents=0))
    app = govern_graph(reviewed_draft(model, ask_first=ask_first), budget, on_exhausted="interrupt",
                       checkpointer=InMemorySaver())  # fmt: skip
    config = {"configurable": {"thread_id": "t"}}

    def run(value: Any) -> dict:
        return app.invoke(value, config) if runner == "sync" else asyncio.run(app.ainvoke(value, config))

    # Room for the call and its repeat: the node re-runs from its start when the human answers.
    top_up = {"llm_calls": 2} if refused_at == "call" else {"agents": 1}
    asked, state = [], run({})
    while "__interrupt__" in state:
        (pending,) = state["__interrupt__"]
        question = pending.value.get("q", "budget")
        asked.append(question)
        state = run(Command(resume={"budget": top_up, "write it?": "go"}.get(question, "yes")))
    if ask_first:  # the human's go-ahead, then the refused call: once topped up, the node finishes
        assert asked == ["write it?", "budget"]  # each asked once
        assert (state["draft"], state["approved"]) == (model.responses[0], "go")
        assert model.calls.count == budget.snapshot().llm_calls == 1
    else:  # the call (refused, then made), then the human's approval: the re-run repeats the call
        assert asked == ["budget", f"approve {model.responses[0]!r}?"]
        assert (state["draft"], state["approved"]) == (model.responses[0], "yes")
        assert model.calls.count == budget.snapshot().llm_calls == 2
    limits = budget.snapshot().limits
    assert (limits.max_llm_calls, limits.max_agents) == ((2, None) if refused_at == "call" else (None, 1))


@pytest.mark.parametrize("by_id", [False, True], ids=["resume", "resume by id"])
def test_a_node_question_after_a_resume_without_an_answer_gets_its_own_answer(by_id: bool) -> None:
    """Resumed with an empty answer after a top-up made elsewhere, then the node asks: the answer is its own."""
    model = fake()
    budget = Budget(Limits(max_llm_calls=0))
    app = govern_graph(reviewed_draft(model, ask_first=False), budget, on_exhausted="interrupt",
                       checkpointer=InMemorySaver())  # fmt: skip
    config = {"configurable": {"thread_id": "t"}}
    (pause,) = app.invoke({}, config)["__interrupt__"]
    assert pause.value["resource"] == "llm_calls"
    budget.top_up(llm_calls=2)
    (question,) = app.invoke(Command(resume={pause.id: {}} if by_id else {}), config)["__interrupt__"]
    assert question.value == {"q": f"approve {model.responses[0]!r}?"}
    assert app.invoke(Command(resume={question.id: "yes"} if by_id else "yes"), config)["approved"] == "yes"
    assert model.calls.count == 2 and budget.snapshot().limits.max_llm_calls == 2


def test_a_roomy_answer_to_a_later_call_also_covers_the_repeat_of_an_earlier_one():
    """The re-run's first call is refused before the answer reaches the second call's pause: still one question."""
    model = fake()

    def write(state: Reviewed) -> dict:
        return {"draft": f"{model.invoke('outline').content} {model.invoke('draft').content}"}

    budget = Budget(Limits(max_llm_calls=1))
    app, config = pausing(one_node(write), budget)
    assert app.invoke({}, config)["__interrupt__"][0].value["resource"] == "llm_calls"
    done = app.invoke(Command(resume={"llm_calls": 20}), config)
    assert "__interrupt__" not in done and done["draft"] == "ok ok"
    assert budget.snapshot().limits.max_llm_calls == 21 and model.calls.count == 3


def test_a_tool_the_node_calls_itself_pauses_where_it_is_refused():
    """The node's questions before and after a refused tool call keep their answers."""
    sent: list[str] = []

    @tool
    def send_email(to: str) -> str:
        """Send an email."""
        sent.append(to)
        return f"sent to {to}"

    def mail(state: Reviewed) -> dict:
        first = interrupt("send it?")
        result = send_email.invoke({"to": "ann"})
        return {"draft": f"{first} {result}", "approved": interrupt("done?")}

    budget = Budget(Limits(max_tool_calls=0))
    app, config = pausing(one_node(mail), budget)
    answers = {"send it?": "go", "done?": "yes"}
    asked, state = [], app.invoke({}, config)
    while "__interrupt__" in state:
        question = state["__interrupt__"][0].value
        asked.append(question if isinstance(question, str) else "budget")
        state = app.invoke(
            Command(resume=answers[question] if isinstance(question, str) else {"tool_calls": 2}), config
        )
    assert asked == ["send it?", "budget", "done?"]
    # The run after the last answer re-ran the node: its tool call too (the top-up left room for it).
    assert (state["draft"], state["approved"], sent) == ("go sent to ann", "yes", ["ann", "ann"])


def test_interrupt_without_a_checkpointer_is_refused_up_front():
    with pytest.raises(ValueError, match="checkpointer"):
        govern_graph(research_builder(fake()), Budget(), on_exhausted="interrupt")
    with pytest.raises(ValueError, match="checkpointer"):
        govern_graph(research_builder(fake()).compile(), Budget(), policies={"critic": "interrupt"})
    with pytest.raises(ValueError, match="checkpointer"):  # False: not even the parent graph's
        govern_graph(research_builder(fake()).compile(checkpointer=False), Budget(), on_exhausted="interrupt")


def test_a_checkpointer_given_with_a_compiled_graph_is_used_and_the_original_keeps_none():
    # The error above tells the user to pass checkpointer= to govern_graph: that must work after compile() too.
    model = fake()
    compiled = research_builder(model).compile()
    saver = InMemorySaver()
    app = govern_graph(compiled, Budget(Limits(max_total_tokens=230)), on_exhausted="interrupt", checkpointer=saver)
    assert app.checkpointer is saver and compiled.checkpointer is None
    config = {"configurable": {"thread_id": "compiled-cp"}}
    assert app.invoke({"topic": "otters"}, config)["__interrupt__"][0].value["node"] == "writer"
    done = app.invoke(Command(resume={"total_tokens": 500}), config)
    assert [n.split(":")[0] for n in done["notes"]] == ["planner", "researcher", "writer", "critic"]


def test_interrupt_set_on_a_budget_node_is_refused_up_front_without_a_checkpointer_too():
    # govern_graph keeps a budget_node's own policy: an interrupt there could never be resumed either.
    budget = Budget(Limits(max_llm_calls=0))
    builder = StateGraph(Research)
    builder.add_node("w", budget_node(lambda state: {}, budget, agent="writer", on_exhausted="interrupt"))
    builder.add_edge(START, "w")
    for graph in (builder, builder.compile()):
        with pytest.raises(ValueError, match=r"checkpointer.*\['w'\]"):
            govern_graph(graph, budget)
    assert govern_graph(builder, budget, checkpointer=InMemorySaver()).checkpointer is not None


def test_end_returns_the_state_so_far_without_raising():
    model = fake()
    for compiled in (research_builder(model).compile(), research_builder(model).compile(checkpointer=False)):
        model.calls.records.clear()
        budget = Budget(Limits(max_total_tokens=230))
        app = govern_graph(compiled, budget, on_exhausted="end")
        state = app.invoke({"topic": "otters"}, {"configurable": {"thread_id": "t"}})
        assert [n.split(":")[0] for n in state["notes"]] == ["planner", "researcher"]
        assert [m.agent for m in state["budget_skipped"]] == ["writer"]
        assert model.calls.count == 2


def test_end_returns_what_invoke_returns_for_its_output_schema_keys_mode_and_version():
    from langgraph.types import GraphOutput

    class Out(TypedDict, total=False):
        notes: Annotated[list[str], operator.add]
        budget_skipped: Annotated[list[Skipped], operator.add]

    class Full(Out, total=False):
        topic: str
        draft: str

    model = fake()
    builder = StateGraph(Full, output_schema=Out)
    builder.add_node("plan", lambda state: {"draft": "d", "notes": [model.invoke("plan").content]})
    for name in ("write", "review"):
        builder.add_node(name, lambda state: {"notes": [model.invoke("more").content]})
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "write")
    builder.add_edge("write", "review")

    def ended(saver: InMemorySaver | None, **kwargs: Any) -> Any:
        app = govern_graph(builder, Budget(Limits(max_llm_calls=1)), on_exhausted="end", checkpointer=saver)
        return app.invoke({"topic": "x"}, {"configurable": {"thread_id": repr(kwargs)}}, **kwargs)

    for saver in (None, InMemorySaver()):
        state = ended(saver)
        assert set(state) == {"notes", "budget_skipped"} and state["notes"] == ["ok"], saver  # the output schema
        assert ended(saver, output_keys="notes") == ["ok"], saver
        assert ended(saver, output_keys=["notes"]) == {"notes": ["ok"]}, saver
        updates = ended(saver, stream_mode="updates")  # the chunks so far, as invoke returns for this mode
        assert isinstance(updates, list) and updates[0] == {"plan": {"notes": ["ok"]}}, saver
        output = ended(saver, version="v2")
        assert isinstance(output, GraphOutput) and output.value["notes"] == ["ok"], saver


def test_the_users_graph_is_left_alone_and_governing_twice_wraps_once():
    model = fake()
    builder = research_builder(model)
    compiled = builder.compile()
    budget = Budget(Limits(max_llm_calls=1))
    governed = govern_graph(compiled, budget)
    assert govern_graph(governed, budget) is governed
    compiled.invoke({"topic": "x"})  # the original still runs ungoverned
    assert model.calls.count == 4 and budget.snapshot().llm_calls == 0
    with pytest.raises(BudgetExceeded):
        governed.invoke({"topic": "x"})
    assert budget.snapshot().llm_calls == 1 and budget.snapshot().agents_started == 2


def test_governing_again_with_new_policies_regoverns_the_original_and_another_budget_is_refused():
    model = fake()
    builder = research_builder(model)
    budget = Budget(Limits(max_llm_calls=3))
    for graph in (builder, builder.compile(checkpointer=InMemorySaver())):
        governed = govern_graph(graph, budget, checkpointer=InMemorySaver() if graph is builder else None)
        regoverned = govern_graph(governed, budget, policies={"critic": "skip"})
        assert regoverned is not governed and regoverned.checkpointer is governed.checkpointer
        with pytest.raises(ValueError, match="already governed by budget"):
            govern_graph(governed, Budget(name="other"))
    fresh = Budget(Limits(max_llm_calls=3))
    state = govern_graph(govern_graph(builder, fresh), fresh, policies={"critic": "skip"}).invoke({"topic": "x"})
    assert [m.agent for m in state["budget_skipped"]] == ["critic"]  # the new policy applies


def test_copies_of_a_governed_graph_stay_governed_and_can_be_governed_again():
    # with_config and copy build a new graph object: it must still know how it was governed.
    budget = Budget(Limits(max_llm_calls=3))
    app = govern_graph(research_builder(fake()), budget)
    for copied in (app.with_config({"recursion_limit": 30}), app.copy()):
        assert govern_graph(copied, budget) is copied
        regoverned = govern_graph(copied, budget, policies={"critic": "skip"})
        assert regoverned.config == copied.config  # the copy's config is kept
        assert [m.agent for m in regoverned.invoke({"topic": "x"})["budget_skipped"]] == ["critic"]
        budget.top_up(llm_calls=3)
        with pytest.raises(ValueError, match="already governed by budget"):
            govern_graph(copied, Budget(name="other"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policies": {"critc": "skip"}}, r"policies names nodes the graph does not have: \['critc'\]"),
        ({"agents": {"writr": "writer"}}, r"agents names nodes the graph does not have: \['writr'\]"),
        ({"policies": {"critic": "bogus"}}, "policy for 'critic' must be one of"),
        ({"on_exhausted": "bogus"}, "policy for 'on_exhausted' must be one of"),
    ],
)
def test_govern_graph_refuses_unknown_nodes_and_policies(kwargs, message):
    # A typo must not silently turn a skip into a deny.
    for graph in (research_builder(fake()), research_builder(fake()).compile()):
        with pytest.raises(ValueError, match=message):
            govern_graph(graph, Budget(), **kwargs)


class FanOut(TypedDict, total=False):
    items: list[int]
    results: Annotated[list[str], operator.add]
    summary: str
    budget_skipped: Annotated[list[Skipped], operator.add]


def fan_out_builder(model: FakeChatModel) -> StateGraph:
    """START -> one `worker` per item (a `Send` each, one LLM call) -> `reduce` -> END."""

    def worker(state: dict) -> dict:
        return {"results": [model.invoke(f"item {state['item']}").content]}

    builder = StateGraph(FanOut)
    builder.add_node("worker", worker)
    builder.add_node("reduce", lambda state: {"summary": f"{len(state['results'])} results"})
    builder.add_conditional_edges(START, lambda s: [Send("worker", {"item": i}) for i in s["items"]])
    builder.add_edge("worker", "reduce")
    builder.add_edge("reduce", END)
    return builder


def test_skip_on_a_send_fan_out_skips_the_refused_branches_and_the_run_goes_on():
    # Siblings refused in the same step are not a loop: only a node skipped again at a later step ends the run.
    model = fake()
    builder = fan_out_builder(model)
    for runner in ("sync", "async"):
        model.calls.records.clear()
        budget = Budget(Limits(max_llm_calls=3))
        app = govern_graph(builder, budget, on_exhausted="skip")
        items = {"items": list(range(6))}
        state = app.invoke(items) if runner == "sync" else asyncio.run(app.ainvoke(items))
        assert (len(state["results"]), state["summary"]) == (3, "3 results"), runner
        assert len(state["budget_skipped"]) == 3 == len(budget.ledger.history(kind="skip")), runner
        assert model.calls.count == 3 and budget.snapshot().held_llm_calls == 0, runner


def test_end_on_a_send_fan_out_without_a_checkpointer_keeps_the_branches_that_finished():
    # Nothing would keep the paid results of the step's finished branches: the step ends (the
    # refused ones skipped), and the run ends before the next node.
    model = fake()
    builder = fan_out_builder(model)
    for runner in ("sync", "async"):
        model.calls.records.clear()
        budget = Budget(Limits(max_llm_calls=3))
        app = govern_graph(builder, budget, on_exhausted="end")
        items = {"items": list(range(6))}
        state = app.invoke(items) if runner == "sync" else asyncio.run(app.ainvoke(items))
        assert len(state["results"]) == 3 == model.calls.count, runner  # what was paid for is returned
        assert "summary" not in state, runner  # the run ended before the next node
        assert len(state["budget_skipped"]) == 3 and budget.snapshot().agents_started == 6, runner


def test_budget_node_alone_ends_by_raising_and_says_govern_graph_ends_cleanly():
    model = fake()
    budget = Budget(Limits(max_llm_calls=1))

    @budget_node(budget, agent="w", on_exhausted="end")
    def write(state: Research) -> dict:
        return {"notes": [model.invoke("w").content]}

    builder = StateGraph(Research)
    builder.add_node("w1", write)
    builder.add_node("w2", write)
    builder.add_edge(START, "w1")
    builder.add_edge("w1", "w2")
    with pytest.raises(BudgetExceeded, match="govern_graph ends a run without raising") as info:
        builder.compile().invoke({"topic": "x"})
    assert type(info.value) is BudgetExceeded and info.value.resource == "llm_calls"
    assert model.calls.count == 1


def test_a_denial_is_not_retried_by_the_retry_policy():
    model = fake()
    builder = StateGraph(Research)

    def planner(state: Research) -> dict:
        return {"notes": [model.invoke("plan").content]}

    builder.add_node("planner", planner, retry_policy=RetryPolicy(max_attempts=3))
    builder.add_edge(START, "planner")
    budget = Budget(Limits(max_llm_calls=0))
    with pytest.raises(BudgetExceeded):
        govern_graph(builder, budget).invoke({"topic": "x"})
    assert budget.snapshot().agents_started == 1  # entered once: no retry
    assert len(budget.ledger.history(kind="deny")) == 1


def test_send_fan_out_reaches_the_provider_exactly_three_times_and_leaves_no_hold():
    model = fake(delay=0.02)

    def worker(state: dict) -> dict:
        return {"results": [model.invoke(f"item {state['item']}").content]}

    builder = fan_out(worker)
    for runner in ("sync", "async"):
        model.calls.records.clear()
        budget = Budget(Limits(max_llm_calls=3))
        app = govern_graph(builder, budget)
        with pytest.raises(BudgetExceeded):
            if runner == "sync":
                app.invoke({"items": list(range(8))})
            else:
                asyncio.run(app.ainvoke({"items": list(range(8))}))
        assert model.calls.count == 3, runner
        snap = budget.snapshot()
        assert snap.held_llm_calls == 0 and snap.held_tokens == 0, runner
        assert snap.llm_calls == 3 and snap.agents_started == 8, runner


def test_async_branches_cancelled_by_a_siblings_denial_close_their_holds_charged_as_estimates():
    # Async workers are cancelled mid-call when a sibling is refused: LangChain sends their calls
    # no end or error event. They had reached the provider, so each is charged its estimate.
    import time

    model = fake(delay=0.2)

    async def worker(state: dict) -> dict:
        return {"results": [(await model.ainvoke(f"item {state['item']}")).content]}

    builder = fan_out(worker)
    budget = Budget(Limits(max_llm_calls=3), lease_ttl=600)  # far longer than the test: no lease runs out
    with pytest.raises(BudgetExceeded):
        asyncio.run(govern_graph(builder, budget).ainvoke({"items": list(range(8))}))
    assert model.calls.count == 3
    deadline = time.monotonic() + 5
    while budget.snapshot().held_llm_calls and time.monotonic() < deadline:
        time.sleep(0.01)
    snap = budget.snapshot()
    assert (snap.held_llm_calls, snap.held_tokens) == (0, 0)
    assert snap.llm_calls == 3 == model.calls.count
    charged = budget.ledger.history(kind="llm")
    assert len(charged) == 3 and all(e.estimated for e in charged)
    assert not budget.ledger.history(kind="release")


def test_subgraph_agents_are_charged_to_the_outer_node():
    model = fake()

    class Inner(TypedDict, total=False):
        notes: Annotated[list[str], operator.add]

    def inner_step(state: Inner) -> dict:
        return {"notes": [model.invoke("deep").content]}

    inner = StateGraph(Inner)
    inner.add_node("agent", inner_step)
    inner.add_edge(START, "agent")
    sub = inner.compile()

    outer = StateGraph(Inner)
    outer.add_node("researcher", sub)
    outer.add_node("writer", sub)
    outer.add_edge(START, "researcher")
    outer.add_edge("researcher", "writer")
    budget = Budget()
    user_handler = BudgetCallbackHandler(budget)  # the user's own handler too: still charged once
    govern_graph(outer, budget).invoke({"notes": []}, {"callbacks": [user_handler]})
    assert [e.agent for e in budget.ledger.history(kind="llm")] == ["researcher", "writer"]
    assert budget.snapshot().llm_calls == 2 == model.calls.count


def test_a_users_handler_of_another_object_of_the_shared_budget_charges_node_calls_once(tmp_path):
    # A worker building its budgets by name on a shared store: the graph governed with one object,
    # the user's handler built on another object of the same budget.
    url = f"sqlite:///{tmp_path / 'budget.db'}"
    governed_with = Budget(Limits(max_llm_calls=10), name="research", store=url)
    handler_of = Budget(Limits(max_llm_calls=10), name="research", store=url)
    model = fake()
    app = govern_graph(research_builder(model), governed_with)
    app.invoke({"topic": "otters"}, {"callbacks": [BudgetCallbackHandler(handler_of)]})
    assert model.calls.count == 4 == governed_with.snapshot().llm_calls
    assert [e.agent for e in governed_with.ledger.history(kind="llm")] == ["planner", "researcher", "writer", "critic"]
    assert governed_with.snapshot().held_tokens == 0


def test_a_budget_node_of_another_object_of_the_shared_budget_is_not_wrapped_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'budget.db'}"
    graph_budget = Budget(name="research", store=url)
    node_budget = Budget(name="research", store=url)
    model = fake()
    builder = research_builder(model)
    builder.nodes["writer"].runnable = budget_node(builder.nodes["writer"].runnable, node_budget, agent="author")
    govern_graph(builder, graph_budget).invoke({"topic": "otters"})
    # One agent start per node and the writer's own agent: the budget_node was left as the user set it.
    assert graph_budget.snapshot().agents_started == 4
    assert [e.agent for e in graph_budget.ledger.history(kind="llm")] == ["planner", "researcher", "author", "critic"]


def test_a_call_given_only_the_users_handler_inside_a_governed_node_is_still_enforced_and_charged():
    # `config={"callbacks": [...]}` replaces the callbacks the node inherits: the node's handler
    # never sees the call, so the user's handler (which stands aside for it) must charge it itself.
    model = fake()

    @tool
    def lookup(term: str) -> str:
        """Look a term up."""
        return "found"

    budget = Budget(Limits(max_llm_calls=1, max_tool_calls=1))
    mine = BudgetCallbackHandler(budget, agent="mine")

    def writer(state: Research) -> dict:
        notes = [lookup.invoke({"term": "t"}, config={"callbacks": [mine]})]
        with pytest.raises(BudgetExceeded):
            lookup.invoke({"term": "u"}, config={"callbacks": [mine]})
        notes.append(model.invoke("w", config={"callbacks": [mine]}).content)
        with pytest.raises(BudgetExceeded):
            model.invoke("again", config={"callbacks": [mine]})
        return {"notes": notes}

    builder = StateGraph(Research)
    builder.add_node("writer", writer)
    builder.add_edge(START, "writer")
    govern_graph(builder, budget).invoke({"topic": "x"})
    assert model.calls.count == 1
    snap = budget.snapshot()
    assert (snap.llm_calls, snap.tool_calls, snap.held_llm_calls) == (1, 1, 0)
    assert [e.agent for e in budget.ledger.history(kind="llm")] == ["writer"]  # the node's agent, as documented


def test_a_resume_replayed_to_another_budget_object_of_the_same_shared_budget_is_not_applied_again(tmp_path):
    # A service builds its budgets by name per request: the request that resumes a run holds another
    # Budget object than the one that applied the earlier resumes, which LangGraph replays to the node.
    model = fake()
    saver = InMemorySaver()
    store = f"sqlite:///{tmp_path / 'budget.db'}"

    def app_for(budget: Budget) -> Any:
        builder = StateGraph(Research)
        builder.add_node("planner", lambda state: {"notes": [model.invoke("plan").content]})
        builder.add_node("writer", lambda state: {"notes": [model.invoke(f"w{i}").content for i in range(3)]})
        builder.add_edge(START, "planner")
        builder.add_edge("planner", "writer")
        return govern_graph(builder, budget, on_exhausted="interrupt", checkpointer=saver)

    config = {"configurable": {"thread_id": "1"}}
    first = Budget(Limits(max_llm_calls=1), name="run", store=store)
    assert "__interrupt__" in app_for(first).invoke({"topic": "x"}, config)
    assert "__interrupt__" in app_for(first).invoke(Command(resume={"llm_calls": 2}), config)
    again = Budget(Limits(max_llm_calls=1), name="run", store=store)
    app_for(again).invoke(Command(resume={"llm_calls": 1}), config)
    assert again.snapshot().limits.max_llm_calls == 1 + 2 + 1  # each resume applied once


def test_a_governed_subgraph_inside_a_governed_graph_charges_its_own_nodes():
    model = fake()

    class Inner(TypedDict, total=False):
        notes: Annotated[list[str], operator.add]

    inner = StateGraph(Inner)
    inner.add_node("search", lambda state: {"notes": [model.invoke("deep").content]})
    inner.add_edge(START, "search")
    budget = Budget()
    outer = StateGraph(Inner)
    outer.add_node("research", govern_graph(inner, budget))  # the team governs its own subgraph
    outer.add_node("write", lambda state: {"notes": [model.invoke("write").content]})
    outer.add_edge(START, "research")
    outer.add_edge("research", "write")
    govern_graph(outer, budget).invoke({"notes": []})
    # The innermost governed node is the agent; nothing is reserved twice or re-attributed.
    assert [(e.agent, e.location) for e in budget.ledger.history(kind="llm")] == [
        ("search", "search"), ("write", "write"),
    ]  # fmt: skip
    assert budget.ledger.history(kind="release") == []
    assert budget.snapshot().llm_calls == 2 == model.calls.count


def test_end_at_a_governed_subgraphs_last_step_ends_the_outer_run_too():
    # The subgraph has no next step to end at: the outer graph must not go on to its next node.
    model = fake()

    class Team(TypedDict, total=False):
        notes: Annotated[list[str], operator.add]
        budget_skipped: Annotated[list[Skipped], operator.add]

    def step(name: str):
        return lambda state: {"notes": [f"{name}:{model.invoke(name).content}"]}

    inner = StateGraph(Team)
    inner.add_node("draft", step("draft"))
    inner.add_node("polish", step("polish"))
    inner.add_edge(START, "draft")
    inner.add_edge("draft", "polish")
    for runner in ("sync", "async"):
        model.calls.records.clear()
        budget = Budget(Limits(max_llm_calls=1))
        outer = StateGraph(Team)
        outer.add_node("team", govern_graph(inner, budget, on_exhausted="end"))
        outer.add_node("publish", step("publish"))
        outer.add_edge(START, "team")
        outer.add_edge("team", "publish")
        app = govern_graph(outer, budget, on_exhausted="end")
        state = app.invoke({}) if runner == "sync" else asyncio.run(app.ainvoke({}))
        assert state["notes"] == ["draft:ok"], runner
        assert [m.agent for m in state["budget_skipped"]] == ["polish"], runner
        assert budget.snapshot().agents_started == 3 and model.calls.count == 1, runner  # publish never entered


def test_end_inside_a_governed_subgraph_returns_the_outer_graphs_state():
    # The outer run ends; what it returns is the outer graph's state so far, not the subgraph's.
    model = fake()

    class Outer(TypedDict, total=False):
        topic: str
        report: str
        notes: Annotated[list[str], operator.add]
        budget_skipped: Annotated[list[Skipped], operator.add]

    class Inner(TypedDict, total=False):
        topic: str
        drafts: Annotated[list[str], operator.add]

    inner = StateGraph(Inner)
    for name in ("draft", "polish", "final"):
        inner.add_node(name, lambda state, name=name: {"drafts": [f"{name}:{model.invoke(name).content}"]})
    inner.add_edge(START, "draft")
    inner.add_edge("draft", "polish")
    inner.add_edge("polish", "final")
    for runner in ("sync", "async"):
        budget = Budget(Limits(max_llm_calls=2))
        team = govern_graph(inner, budget, on_exhausted="end")

        def write(state: Outer, team: Any = team) -> dict:
            return {"report": " ".join(team.invoke({"topic": state["topic"]})["drafts"])}

        async def awrite(state: Outer, team: Any = team) -> dict:
            return {"report": " ".join((await team.ainvoke({"topic": state["topic"]}))["drafts"])}

        outer = StateGraph(Outer)
        outer.add_node("plan", lambda state: {"notes": [model.invoke("plan").content]})
        outer.add_node("write", write if runner == "sync" else awrite)
        outer.add_node("publish", lambda state: {"notes": ["published"]})
        outer.add_edge(START, "plan")
        outer.add_edge("plan", "write")
        outer.add_edge("write", "publish")
        app = govern_graph(outer, budget, on_exhausted="end")
        state = app.invoke({"topic": "x"}) if runner == "sync" else asyncio.run(app.ainvoke({"topic": "x"}))
        assert {key: value for key, value in state.items() if key != "budget_skipped"} == {
            "topic": "x", "notes": ["ok"],
        }, runner  # fmt: skip
        assert [m.location for m in state["budget_skipped"]] == ["polish"], runner  # where the run ended


class Chat(TypedDict, total=False):
    messages: Annotated[list[Any], operator.add]


def tool_loop(model: FakeChatModel, tools: Any) -> StateGraph:
    """A plain agent loop: a "model" node that binds the tool node's tools, and the "tools" node."""
    bound = model.bind_tools(list(tools.tools_by_name.values()))
    builder = StateGraph(Chat)
    builder.add_node("model", lambda state: {"messages": [bound.invoke(state["messages"])]})
    builder.add_node("tools", tools)
    builder.add_edge(START, "model")
    builder.add_conditional_edges("model", lambda state: "tools" if state["messages"][-1].tool_calls else END)
    builder.add_edge("tools", "model")
    return builder


def test_a_users_handler_stands_aside_for_the_nodes_mapped_agents():
    from langgraph.prebuilt import ToolNode

    @tool
    def lookup(term: str) -> str:
        """Look a term up."""
        return "found"

    calls = [AIMessage("", tool_calls=[{"name": "lookup", "args": {"term": "otter"}, "id": "c1"}]), AIMessage("ok")]
    builder = tool_loop(fake(responses=calls), ToolNode([lookup]))
    budget = Budget()
    app = govern_graph(builder, budget, agents={"model": "thinker", "tools": "toolbox"})
    # The user's handler would attribute by node name; the nodes' mapped agents are charged instead.
    app.invoke({"messages": [HumanMessage("q")]}, {"callbacks": [BudgetCallbackHandler(budget)]})
    assert [e.agent for e in budget.ledger.history(kind="llm")] == ["thinker", "thinker"]
    assert [e.agent for e in budget.ledger.history(kind="tool")] == ["toolbox"]
    assert budget.ledger.history(kind="release") == []
    assert budget.snapshot().llm_calls == 2 and budget.snapshot().tool_calls == 1


@pytest.mark.parametrize("policy", ["skip", "end"])
def test_a_skipped_tool_node_answers_only_the_tool_calls_that_did_not_run(policy: str) -> None:
    """A tool that ran before its sibling call was refused keeps its answer: the model must not redo it."""
    from langgraph.prebuilt import ToolNode

    sent: list[str] = []

    @tool
    def send_email(to: str) -> str:
        """Send an email."""
        sent.append(to)
        return f"sent to {to}"

    two_calls = AIMessage("", tool_calls=[
        {"name": "send_email", "args": {"to": "ann"}, "id": "c1"},
        {"name": "send_email", "args": {"to": "bob"}, "id": "c2"},
    ])  # fmt: skip
    builder = tool_loop(fake(responses=[two_calls, AIMessage("done")]), ToolNode([send_email]))
    budget = Budget(Limits(max_tool_calls=1))
    state = govern_graph(builder, budget, policies={"tools": policy}).invoke(
        {"messages": [HumanMessage("mail both")]}, {"max_concurrency": 1}
    )
    answers = {m.tool_call_id: m for m in state["messages"] if m.type == "tool"}
    assert sent == ["ann"] and budget.snapshot().tool_calls == 1
    assert (answers["c1"].status, answers["c1"].content) == ("success", "sent to ann")
    assert answers["c2"].status == "error" and answers["c2"].content.startswith("Not run:")


# -- prebuilt ReAct agents -----------------------------------------------------------------------


def react_agent(model: FakeChatModel):
    pytest.importorskip("langchain.agents")
    from langchain.agents import create_agent

    @tool
    def lookup(term: str) -> str:
        """Look a term up."""
        return f"{term}: a mammal"

    return create_agent(model, [lookup])


def looping_model() -> FakeChatModel:
    # Always asks for another tool call: only the budget can stop this agent.
    call = AIMessage("", tool_calls=[{"name": "lookup", "args": {"term": "otter"}, "id": "c1"}])
    return fake(responses=[call])


@pytest.mark.parametrize("policy", ["skip", "end"])
def test_a_react_agent_stops_cleanly_without_a_recursion_error(policy):
    model = looping_model()
    budget = Budget(Limits(max_llm_calls=3))
    app = govern_graph(react_agent(model), budget, on_exhausted=policy)
    result = app.invoke({"messages": [HumanMessage("what is an otter?")]}, {"recursion_limit": 50})
    assert model.calls.count == 3
    assert budget.snapshot().llm_calls == 3
    assert budget.ledger.history(kind="skip")
    assert isinstance(result, dict) and result["messages"]


def test_a_skipped_tool_node_answers_pending_tool_calls():
    model = looping_model()
    budget = Budget(Limits(max_tool_calls=1, max_llm_calls=5))
    app = govern_graph(react_agent(model), budget, on_exhausted="skip")
    result = app.invoke({"messages": [HumanMessage("q")]}, {"recursion_limit": 50})
    tool_messages = [m for m in result["messages"] if m.type == "tool"]
    assert tool_messages[0].status == "success"
    assert tool_messages[1].status == "error" and "tool_calls" in tool_messages[1].content
    assert budget.snapshot().tool_calls == 1


def test_a_tool_node_that_handles_errors_swallows_a_tool_denial():
    from langgraph.prebuilt import ToolNode

    ran = []

    @tool
    def lookup(term: str) -> str:
        """Look a term up."""
        ran.append(term)
        return "found"

    node = ToolNode([lookup], handle_tool_errors=True)
    budget = Budget(Limits(max_tool_calls=0))
    call = AIMessage("", tool_calls=[{"name": "lookup", "args": {"term": "otter"}, "id": "c1"}])

    class S(TypedDict):
        messages: list

    builder = StateGraph(S)
    builder.add_node("tools", node)
    builder.add_edge(START, "tools")
    result = govern_graph(builder, budget).invoke({"messages": [call]})
    # Documented: handle_tool_errors=True turns the denial into an error message; the tool never ran.
    assert ran == [] and "BudgetExceeded" in result["messages"][-1].content


# -- budget_node ---------------------------------------------------------------------------------


def test_budget_node_decorates_sync_and_async_nodes_keeping_their_signature():
    model = fake()
    budget = Budget(Limits(max_llm_calls=2))
    seen_config = []

    @budget_node(budget=budget, agent="planner")
    def plan(state: Research, config) -> dict:
        seen_config.append(config)
        return {"notes": [model.invoke("plan").content]}

    @budget_node(budget=budget, agent="writer", on_exhausted="skip")
    async def write(state: Research) -> dict:
        return {"notes": [(await model.ainvoke("write")).content]}

    @budget_node(budget=budget, agent="critic", on_exhausted="skip")
    async def critique(state: Research) -> dict:
        return {"notes": [(await model.ainvoke("critique")).content]}

    builder = StateGraph(Research)
    builder.add_node("plan", plan)
    builder.add_node("write", write)
    builder.add_node("critique", critique)
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "write")
    builder.add_edge("write", "critique")
    state = asyncio.run(builder.compile().ainvoke({"topic": "x"}))
    assert len(state["notes"]) == 2 and seen_config and "callbacks" in seen_config[0]
    assert [m.agent for m in state["budget_skipped"]] == ["critic"]
    assert [e.agent for e in budget.ledger.history(kind="llm")] == ["planner", "writer"]


def test_budget_node_wraps_a_callable_object_with_an_async_call():
    model = fake()

    class Writer:
        async def __call__(self, state: Research) -> dict:
            return {"notes": [(await model.ainvoke("write")).content]}

    budget = Budget(Limits(max_llm_calls=1))
    builder = StateGraph(Research)
    builder.add_node("write", budget_node(Writer(), budget, agent="writer"))
    builder.add_edge(START, "write")
    assert asyncio.run(builder.compile().ainvoke({"topic": "x"}))["notes"] == ["ok"]
    assert [e.agent for e in budget.ledger.history(kind="llm")] == ["writer"]


def test_budget_node_takes_the_budget_positionally_as_a_decorator_or_a_call():
    model = fake()
    budget = Budget(Limits(max_llm_calls=5))

    @budget_node(budget, agent="planner")
    def plan(state: Research) -> dict:
        return {"notes": [model.invoke("plan").content]}

    def write(state: Research) -> dict:
        return {"notes": [model.invoke("write").content]}

    builder = StateGraph(Research)
    builder.add_node("plan", plan)
    builder.add_node("write", budget_node(write, budget, agent="writer"))
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "write")
    builder.compile().invoke({"topic": "x"})
    assert [e.agent for e in budget.ledger.history(kind="llm")] == ["planner", "writer"]
    assert [e.agent for e in budget.ledger.history(kind="agent_start")] == ["planner", "writer"]


def test_a_graph_error_handler_catches_a_denial():
    """Documented: a graph-level error handler receives the denial and the run completes."""
    model = fake()
    builder = research_builder(model)
    handled = []

    def fallback(state: Research) -> dict:
        handled.append(True)
        return {"notes": ["fallback"]}

    builder.set_node_defaults(error_handler=fallback)
    budget = Budget(Limits(max_llm_calls=1))
    state = govern_graph(builder, budget).invoke({"topic": "otters"})
    assert handled and "fallback" in state["notes"]
    assert model.calls.count == 1 and budget.ledger.history(kind="deny")


@pytest.mark.parametrize("how", ["node handler, compiled", "node handler, builder", "default handler, builder"])
def test_an_error_handlers_llm_calls_are_checked_and_charged(how: str) -> None:
    """A fallback node falling back to a cheaper model is governed like any node, however it was added."""
    main, cheap = fake(), fake()

    def write(state: Research) -> dict:
        return {"notes": [main.invoke("write").content]}

    def fallback(state: Research) -> dict:
        return {"notes": [cheap.invoke("write cheaply").content]}

    builder = StateGraph(Research)
    if how.startswith("default"):
        builder.set_node_defaults(error_handler=fallback)
        builder.add_node("write", write)
    else:
        builder.add_node("write", write, error_handler=fallback)
    builder.add_edge(START, "write")
    builder.add_edge("write", END)
    graph = builder.compile() if how.endswith("compiled") else builder
    handler_node = "__default_error_handler__" if how.startswith("default") else "__error_handler__write"

    budget = Budget(Limits(max_llm_calls=1))
    budget.agent("write", max_tokens=1)  # the writer's own call is refused: its error handler takes over
    state = govern_graph(graph, budget).invoke({"topic": "otters"})
    assert main.calls.count == 0 and cheap.calls.count == 1 and state["notes"] == [cheap.responses[0]]
    assert [(e.agent, e.usage.total_tokens) for e in budget.ledger.history(kind="llm")] == [
        (handler_node, cheap.usage["total_tokens"])
    ]
    with pytest.raises(BudgetExceeded):  # the fallback is refused too once the run's calls are spent
        govern_graph(graph, budget).invoke({"topic": "otters"})
    assert cheap.calls.count == 1 and budget.snapshot().held_llm_calls == 0


def test_finished_send_branches_are_kept_on_resume():
    model = fake()

    def worker(state: dict) -> dict:
        item = state["item"]
        return {"results": [f"{item}:{model.invoke(f'item {item}').content}"]}

    builder = fan_out(worker)
    budget = Budget(Limits(max_llm_calls=3))
    app = govern_graph(builder, budget, checkpointer=InMemorySaver())
    # One branch at a time: LangGraph loses the writes of a branch still running when a sibling fails
    # (it finishes after the step's executor shut down), which would then run again on resume.
    config = {"configurable": {"thread_id": "fan"}, "max_concurrency": 1}
    with pytest.raises(BudgetExceeded):
        app.invoke({"items": list(range(8))}, config)
    assert model.calls.count == 3
    budget.top_up(llm_calls=10)
    state = app.invoke(None, config)
    assert sorted(int(r.split(":")[0]) for r in state["results"]) == list(range(8))
    assert model.calls.count == 8  # the 3 finished branches did not run again
    assert budget.snapshot().held_llm_calls == 0


def test_an_async_governed_graph_calls_a_sqlite_store_off_its_event_loop(tmp_path: Any) -> None:
    import threading

    model = fake()

    async def step(state: Research) -> dict:
        return {"notes": [(await model.ainvoke(state["topic"])).content]}

    builder = StateGraph(Research)
    for name in ("planner", "writer", "critic"):
        builder.add_node(name, step)
    builder.add_edge(START, "planner")
    builder.add_edge("planner", "writer")
    builder.add_edge("writer", "critic")
    builder.add_edge("critic", END)
    budget = Budget(Limits(max_llm_calls=2), name="run", store=f"sqlite:///{tmp_path}/b.db")
    seen = record_store_threads(budget, "ensure_agent", "begin_agent", "reserve", "settle", "record_entry", "figures")
    app = govern_graph(builder, budget, policies={"critic": "skip"})

    async def go() -> tuple[dict, str]:
        return await app.ainvoke({"topic": "otters"}), threading.current_thread().name

    state, loop_thread = asyncio.run(go())
    during, seen[:] = list(seen), []  # what follows reads the store from this thread, outside the loop
    assert len(state["notes"]) == 2 and [m.agent for m in state["budget_skipped"]] == ["critic"]
    assert model.calls.count == 2 == budget.snapshot().llm_calls
    # spawn gates, reserves, settles, the refusal's snapshot and the skip marker: none on the loop
    assert len(during) >= 3 + 2 + 2 + 2 and loop_thread not in during


# -- resumes, re-entries and nesting ------------------------------------------------------------


def test_two_interrupts_in_one_node_apply_each_resume_once():
    # The writer pauses at entry (tokens), then at its LLM call (calls): LangGraph replays the
    # first answer to the first interrupt of every re-run, which must not top up again.
    model = fake()
    budget = Budget(Limits(max_total_tokens=200, max_llm_calls=2))
    app = govern_graph(research_builder(model), budget, on_exhausted="interrupt", checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "twice"}}
    first = app.invoke({"topic": "x"}, config)["__interrupt__"][0].value
    second = app.invoke(Command(resume={"total_tokens": 1000}), config)["__interrupt__"][0].value
    done = app.invoke(Command(resume={"llm_calls": 5}), config)
    assert (first["resource"], second["resource"]) == ("total_tokens", "llm_calls")
    assert (budget.limits.max_total_tokens, budget.limits.max_llm_calls) == (1200, 7)
    assert len(done["notes"]) == 4 == model.calls.count


@pytest.mark.parametrize("policy", ["deny", "interrupt"])
def test_a_resumed_node_does_not_take_a_second_agent_slot(policy):
    model = fake()
    budget = Budget(Limits(max_agents=4, max_llm_calls=2))  # room for the 4 node executions, not 5
    app = govern_graph(research_builder(model), budget, on_exhausted=policy, checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": policy}}
    if policy == "deny":
        with pytest.raises(BudgetExceeded):
            app.invoke({"topic": "x"}, config)
        budget.top_up(llm_calls=2)
        done = app.invoke(None, config)
    else:
        app.invoke({"topic": "x"}, config)
        done = app.invoke(Command(resume={"llm_calls": 2}), config)
    assert len(done["notes"]) == 4
    assert [e.agent for e in budget.ledger.history(kind="agent_start")] == [
        "planner", "researcher", "writer", "critic",
    ]  # fmt: skip


def test_a_bad_resume_value_is_refused_once_and_the_next_resume_continues():
    model = fake()
    budget = Budget(Limits(max_llm_calls=2))
    app = govern_graph(research_builder(model), budget, on_exhausted="interrupt", checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "bad"}}
    app.invoke({"topic": "x"}, config)
    with pytest.raises(UsageError, match="top_up keywords"):
        app.invoke(Command(resume="5000"), config)
    done = app.invoke(Command(resume={"llm_calls": 2}), config)
    assert len(done["notes"]) == 4 and budget.limits.max_llm_calls == 4


def test_sub_agents_with_the_same_node_names_are_not_taken_for_a_loop():
    # Each team's "work" node is skipped once, at different inner steps: that is no loop.
    model = fake()

    def team(prep: bool) -> StateGraph:
        sub = StateGraph(Research)
        sub.add_node("work", lambda state: {"notes": [model.invoke("w").content]})
        if prep:
            sub.add_node("prep", lambda state: {"notes": ["prep"]})
            sub.add_edge(START, "prep")
            sub.add_edge("prep", "work")
        else:
            sub.add_edge(START, "work")
        return sub

    budget = Budget(Limits(max_llm_calls=0), on_exhausted="skip")
    outer = StateGraph(Research)
    outer.add_node("a", govern_graph(team(prep=True), budget))
    outer.add_node("b", govern_graph(team(prep=False), budget))
    outer.add_node("after", lambda state: {"notes": ["after"]})
    outer.add_edge(START, "a")
    outer.add_edge("a", "b")
    outer.add_edge("b", "after")
    state = govern_graph(outer, budget).invoke({"topic": "x"})
    assert state["notes"][-1] == "after"
    assert [e.location for e in budget.ledger.history(kind="skip")] == ["work", "work"]


def test_a_skip_that_would_loop_ends_the_run_with_every_tool_call_answered():
    model = looping_model()
    budget = Budget(Limits(max_tool_calls=2))
    result = govern_graph(react_agent(model), budget, on_exhausted="skip").invoke(
        {"messages": [HumanMessage("q")]}, {"recursion_limit": 50}
    )
    asked = sum(len(m.tool_calls) for m in result["messages"] if isinstance(m, AIMessage))
    answered = [m for m in result["messages"] if m.type == "tool"]
    assert asked == len(answered) == 4 and [m.status for m in answered].count("error") == 2


def test_another_governed_graph_run_inside_a_stream_loop_is_its_own_run():
    outer_app = govern_graph(research_builder(fake()), Budget())
    builder = research_builder(fake())
    seen = []
    for _ in outer_app.stream({"topic": "x"}, stream_mode="updates"):
        ending = govern_graph(builder, Budget(Limits(max_llm_calls=2)), on_exhausted="end")
        seen.append(ending.invoke({"topic": "y"})["notes"])  # ends cleanly: its own run, not the stream's
    assert seen and all(len(notes) == 2 for notes in seen)


def test_budget_node_skip_records_its_marker_whatever_the_functions_annotation():
    budget = Budget(Limits(max_llm_calls=0))
    model = fake()

    @budget_node(budget, on_exhausted="skip")
    def critic(state):  # no annotation: the schema is not known to the wrapper
        return {"notes": [model.invoke("c").content]}

    builder = StateGraph(Research)
    builder.add_node("critic", critic)
    builder.add_edge(START, "critic")
    state = builder.compile().invoke({"topic": "x"})
    assert [m.agent for m in state["budget_skipped"]] == ["critic"] and model.calls.count == 0


def test_budget_node_on_a_tool_node_answers_pending_tool_calls_when_skipped():
    from langgraph.graph import MessagesState
    from langgraph.prebuilt import ToolNode

    @tool
    def lookup(term: str) -> str:
        """Look a term up."""
        raise AssertionError("a skipped tool must not run")

    budget = Budget(Limits(max_tool_calls=0))
    builder = StateGraph(MessagesState)
    builder.add_node("tools", budget_node(ToolNode([lookup]), budget, on_exhausted="skip"))
    builder.add_edge(START, "tools")
    call = AIMessage("", tool_calls=[{"name": "lookup", "args": {"term": "otter"}, "id": "c1"}])
    state = builder.compile().invoke({"messages": [call]})
    assert [(m.type, m.tool_call_id, m.status) for m in state["messages"][1:]] == [("tool", "c1", "error")]


def test_govern_graph_leaves_a_budget_node_of_the_same_budget_as_it_is():
    model = fake()
    budget = Budget()
    builder = StateGraph(Research)
    builder.add_node("w", budget_node(lambda state: {"notes": [model.invoke("w").content]}, budget, agent="writer"))
    builder.add_edge(START, "w")
    govern_graph(builder, budget).invoke({"topic": "x"})
    assert [e.agent for e in budget.ledger.history(kind="agent_start")] == ["writer"]  # entered once, its agent
    assert [e.agent for e in budget.ledger.history(kind="llm")] == ["writer"]


def test_a_node_mapped_to_no_agent_charges_the_run():
    model = fake()
    budget = Budget()
    govern_graph(research_builder(model), budget, agents={"critic": None}).invoke({"topic": "x"})
    assert [e.agent for e in budget.ledger.history(kind="llm")] == ["planner", "researcher", "writer", None]


_RESUMING_WORKER = """
import json, sqlite3, sys
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import START, StateGraph
from langgraph.types import Command
from budgetary import Budget, Limits
from budgetary.integrations.langgraph import govern_graph
from tests.integrations.test_langgraph import Research, fake

checkpoints, store, answers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = fake()
builder = StateGraph(Research)
builder.add_node("planner", lambda state: {"notes": [model.invoke("plan").content]})
builder.add_node("writer", lambda state: {"notes": [model.invoke(f"w{i}").content for i in range(3)]})
builder.add_edge(START, "planner")
builder.add_edge("planner", "writer")
budget = Budget(Limits(max_llm_calls=1, max_agents=2), name="run", store=store)
saver = SqliteSaver(sqlite3.connect(checkpoints, check_same_thread=False))
app = govern_graph(builder, budget, on_exhausted="interrupt", checkpointer=saver)
config = {"configurable": {"thread_id": "1"}}
for answer in answers:
    out = app.invoke({"topic": "x"} if answer is None else Command(resume=answer), config)
snap = budget.snapshot()
print(json.dumps({"paused_on": out["__interrupt__"][0].value["resource"], "max_llm_calls": snap.limits.max_llm_calls,
                  "agents_started": snap.agents_started, "provider_calls": model.calls.count}))
"""


def test_a_run_resumed_in_another_process_applies_each_answer_once_and_takes_no_second_slot(tmp_path):
    # A server resumes a paused run in whichever worker takes the request: LangGraph replays the
    # answers of earlier interrupts to the re-run node there, and the node enters again.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("langgraph.checkpoint.sqlite")
    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "worker.py"
    script.write_text(_RESUMING_WORKER)
    env = {**os.environ, "PYTHONPATH": str(root)}
    store = f"sqlite:///{tmp_path / 'budget.db'}"

    def worker(*answers: dict | None) -> dict:
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "checkpoints.db"), store, json.dumps(answers)],
            capture_output=True, text=True, env=env, cwd=root, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    # First worker: the writer's first call is refused (1 call allowed); resumed with 2 more, it makes 2 and is refused.
    first = worker(None, {"llm_calls": 2})
    assert first == {"paused_on": "llm_calls", "max_llm_calls": 3, "agents_started": 2, "provider_calls": 3}
    # Second worker: the writer re-runs; the replayed answer (2 calls) is not applied again, the new one is.
    second = worker({"llm_calls": 1})
    assert second["max_llm_calls"] == 1 + 2 + 1
    assert second["agents_started"] == 2  # the re-run writer took no second max_agents slot (max_agents=2)
    assert second["paused_on"] == "llm_calls"


def test_a_budget_node_called_directly_runs_governed_by_its_entry_checks():
    # A unit test of a node calls it outside any graph: it runs as one node execution would.
    model = fake()
    budget = Budget(Limits(max_agents=2, max_llm_calls=5))
    seen_config = []

    @budget_node(budget, agent="writer")
    def write(state: Research, config) -> dict:
        seen_config.append(config)
        return {"notes": [model.invoke(f"write about {state['topic']}").content]}

    @budget_node(budget)  # no agent: the node's name, here the function's
    async def review(state: Research) -> dict:
        return {"notes": [(await model.ainvoke("review")).content]}

    assert write({"topic": "otters"}, config={"tags": ["unit"]}) == {"notes": ["ok"]}
    assert asyncio.run(review({"topic": "otters"})) == {"notes": ["ok"]}
    assert seen_config[0]["tags"] == ["unit"] and "callbacks" in seen_config[0]
    assert [e.agent for e in budget.ledger.history(kind="llm")] == ["writer", "review"]
    assert budget.snapshot().agents_started == 2
    with pytest.raises(BudgetExceeded) as info:  # a third node execution: max_agents is 2
        write({"topic": "otters"}, config={})
    assert info.value.resource == "agents" and model.calls.count == 2


def test_a_budget_node_called_directly_applies_skip_and_refuses_to_pause():
    model = fake()
    budget = Budget(Limits(max_llm_calls=0))

    @budget_node(budget, agent="writer", on_exhausted="skip")
    def write(state: Research) -> dict:
        return {"notes": [model.invoke("write").content]}

    @budget_node(budget, agent="critic", on_exhausted="interrupt")
    async def critique(state: Research) -> dict:
        return {"notes": [(await model.ainvoke("critique")).content]}

    update = write({"topic": "otters"})
    assert [m.agent for m in update["budget_skipped"]] == ["writer"] and "notes" not in update
    with pytest.raises(BudgetExceeded, match="interrupt can pause only a graph run") as info:
        asyncio.run(critique({"topic": "otters"}))
    assert info.value.resource == "llm_calls" and info.value.agent == "critic"
    assert model.calls.count == 0


def test_a_budget_node_called_inside_a_chain_outside_any_graph_is_named_by_its_function():
    # Called from a LangChain runnable (a RunnableLambda in a unit test, a chain step): there is a
    # run config, but no LangGraph node to name the agent; the function's (or runnable's) name does.
    from langchain_core.runnables import RunnableLambda

    model = fake()
    budget = Budget(Limits(max_llm_calls=5))

    @budget_node(budget)
    def summarise(state: Research) -> dict:
        return {"notes": [model.invoke("summarise").content]}

    @budget_node(budget)
    async def asummarise(state: Research) -> dict:
        return {"notes": [(await model.ainvoke("summarise")).content]}

    review = budget_node(RunnableLambda(lambda s: {"notes": [model.invoke("review").content]}, name="review"), budget)

    assert RunnableLambda(summarise).invoke({"topic": "otters"}) == {"notes": ["ok"]}
    assert asyncio.run(RunnableLambda(asummarise).ainvoke({"topic": "otters"})) == {"notes": ["ok"]}
    assert review.invoke({"topic": "otters"}) == {"notes": ["ok"]}
    starts = budget.ledger.history(kind="agent_start")
    assert [(e.agent, e.location) for e in starts] == [
        ("summarise", "summarise"),
        ("asummarise", "asummarise"),
        ("review", "review"),
    ]
    assert [e.agent for e in budget.ledger.history(kind="llm")] == ["summarise", "asummarise", "review"]


@pytest.mark.parametrize("runner", ["sync", "async"])
@pytest.mark.parametrize("checkpointer", [None, "memory"])
def test_a_node_retried_by_its_retry_policy_keeps_its_agent_slot_with_or_without_a_checkpointer(checkpointer, runner):
    # A RetryPolicy retry re-runs the same task after a transient error: like a resume, it takes
    # no second max_agents slot, whether or not the graph checkpoints.
    model = fake()
    failures = [ConnectionError("transient")]

    def flaky(state: Research) -> dict:
        reply = model.invoke("plan")
        if failures:
            raise failures.pop()
        return {"notes": [reply.content]}

    async def aflaky(state: Research) -> dict:
        reply = await model.ainvoke("plan")
        if failures:
            raise failures.pop()
        return {"notes": [reply.content]}

    builder = StateGraph(Research)
    retry = RetryPolicy(max_attempts=3, initial_interval=0.001, retry_on=ConnectionError)
    builder.add_node("planner", aflaky if runner == "async" else flaky, retry_policy=retry)
    builder.add_edge(START, "planner")
    budget = Budget(Limits(max_agents=1))  # the graph's one node execution
    app = govern_graph(builder, budget, checkpointer=InMemorySaver() if checkpointer else None)
    config = {"configurable": {"thread_id": "1"}}
    if runner == "sync":
        done = app.invoke({"topic": "x"}, config)
    else:
        done = asyncio.run(app.ainvoke({"topic": "x"}, config))
    assert done["notes"] == ["ok"] and model.calls.count == 2  # retried once
    assert [e.agent for e in budget.ledger.history(kind="agent_start")] == ["planner"]
    assert not budget.ledger.history(kind="deny")


class _RootRuns(BaseCallbackHandler):
    """How the root run of a graph ended, as a tracer (LangSmith, a logger) sees it."""

    def __init__(self) -> None:
        self.ends: list[Any] = []
        self.errors: list[BaseException] = []

    def on_chain_end(self, outputs: Any, *, run_id: Any, parent_run_id: Any = None, **kwargs: Any) -> None:
        if parent_run_id is None:
            self.ends.append(outputs)

    def on_chain_error(self, error: BaseException, *, run_id: Any, parent_run_id: Any = None, **kwargs: Any) -> None:
        if parent_run_id is None:
            self.errors.append(error)


@pytest.mark.parametrize("saver", [None, "memory"])
def test_end_ends_the_root_run_cleanly_for_tracers_streams_and_events(saver):
    def governed() -> Any:  # a new budget of two calls for each run
        checkpointer = InMemorySaver() if saver else None
        return govern_graph(research_builder(fake()), Budget(Limits(max_llm_calls=2)), on_exhausted="end",
                            checkpointer=checkpointer)  # fmt: skip

    config = {"configurable": {"thread_id": "1"}}
    tracer = _RootRuns()
    state = governed().invoke({"topic": "x"}, {**config, "callbacks": [tracer]})
    assert [n.split(":")[0] for n in state["notes"]] == ["planner", "researcher"]
    assert tracer.errors == [] and len(tracer.ends) == 1  # ended, not failed

    # Without a checkpointer the refused writer is skipped (its step ends) and the run ends before the critic.
    updates = list(governed().stream({"topic": "x"}, config, stream_mode="updates"))
    assert [next(iter(u)) for u in updates] == ["planner", "researcher"] + ([] if saver else ["writer"])

    async def root_events() -> list[str]:
        events = governed().astream_events({"topic": "x"}, config, version="v2")
        return [e["event"] async for e in events if not e["parent_ids"]]

    events = asyncio.run(root_events())
    assert events[0] == "on_chain_start" and events[-1] == "on_chain_end"  # the root run ends, with its output


def test_a_graph_error_handler_does_not_catch_end():
    model = fake()
    builder = research_builder(model)
    handled = []
    builder.set_node_defaults(error_handler=lambda state: handled.append(state) or {"notes": ["fallback"]})
    app = govern_graph(builder, Budget(Limits(max_llm_calls=1)), on_exhausted="end", checkpointer=InMemorySaver())
    state = app.invoke({"topic": "x"}, {"configurable": {"thread_id": "1"}})
    assert handled == [] and [n.split(":")[0] for n in state["notes"]] == ["planner"]
    assert [m.agent for m in state["budget_skipped"]] == ["researcher"]


def test_end_with_a_checkpointer_keeps_the_send_branches_that_finish_and_resumes_only_the_refused():
    model = fake(delay=0.05)

    async def worker(state: dict) -> dict:
        item = state["item"]
        reply = await model.ainvoke(f"item {item}")
        return {"results": [f"{item}:{reply.content}"]}

    builder = fan_out(worker)
    budget = Budget(Limits(max_llm_calls=2))
    app = govern_graph(builder, budget, on_exhausted="end", checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "1"}}
    asyncio.run(app.ainvoke({"items": [1, 2, 3, 4]}, config))
    assert model.calls.count == 2  # two branches ran, two were refused; none was cancelled half-way
    budget.top_up(llm_calls=2)
    done = asyncio.run(app.ainvoke(None, config))
    assert sorted(r.split(":")[0] for r in done["results"]) == ["1", "2", "3", "4"]
    assert model.calls.count == 4  # the finished branches were kept, not run (and paid) again


@pytest.mark.parametrize("runner", ["sync", "async"])
@pytest.mark.parametrize("called", ["as_node", "in_node"])
def test_end_in_a_governed_graph_under_a_plain_parent_returns_its_state_to_the_parent(called, runner):
    # The parent graph is not governed: the governed graph's run is its own, and `end` returns its state
    # so far to the parent, which goes on (no work lost, no empty interrupt reaching the user).
    def parent() -> Any:  # a new budget of one call for each run
        team = govern_graph(research_builder(fake(), asynchronous=runner == "async"), Budget(Limits(max_llm_calls=1)),
                            on_exhausted="end")  # fmt: skip

        def call_team(state: Research) -> dict:
            return {"notes": team.invoke({"topic": state["topic"]})["notes"]}

        async def acall_team(state: Research) -> dict:
            return {"notes": (await team.ainvoke({"topic": state["topic"]}))["notes"]}

        builder = StateGraph(Research)
        builder.add_node("team", team if called == "as_node" else call_team if runner == "sync" else acall_team)
        builder.add_node("publish", lambda state: {"notes": ["published"]})
        builder.add_edge(START, "team")
        builder.add_edge("team", "publish")
        return builder.compile()

    if runner == "sync":
        updates = list(parent().stream({"topic": "x"}, stream_mode="updates"))
        assert [next(iter(u)) for u in updates] == ["team", "publish"]
        state = parent().invoke({"topic": "x"})
    else:
        state = asyncio.run(parent().ainvoke({"topic": "x"}))
    assert "__interrupt__" not in state
    assert state["notes"][0] == "planner:ok" and state["notes"][-1] == "published"


@pytest.mark.parametrize("runner", ["sync", "async"])
def test_end_beside_a_real_interrupt_still_returns_the_interrupt(runner):
    # One branch asks the user (interrupt()), its sibling is ended by the budget in the same step:
    # invoke must still hand the question to the user, as the stream does.
    from langgraph.types import interrupt

    model = fake()

    class S(TypedDict, total=False):
        notes: Annotated[list[str], operator.add]
        budget_skipped: Annotated[list[Skipped], operator.add]

    def ask(state: S) -> dict:
        return {"notes": [f"ask:{interrupt('approve?')}"]}

    builder = StateGraph(S)
    builder.add_node("plan", lambda state: {"notes": [model.invoke("plan").content]})
    builder.add_node("ask", ask)
    builder.add_node("work", lambda state: {"notes": [f"work:{model.invoke('work').content}"]})
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "ask")
    builder.add_edge("plan", "work")
    budgets = {thread: Budget(Limits(max_llm_calls=1)) for thread in ("v1", "v2")}  # a budget per run
    saver = InMemorySaver()

    def invoke(input: Any, thread: str, **kwargs: Any) -> Any:
        app = govern_graph(builder, budgets[thread], on_exhausted="end", checkpointer=saver)
        config = {"configurable": {"thread_id": thread}}
        if runner == "sync":
            return app.invoke(input, config, **kwargs)
        return asyncio.run(app.ainvoke(input, config, **kwargs))

    state = invoke({}, "v1")
    (asked,) = state["__interrupt__"]
    assert asked.value == "approve?" and [m.agent for m in state["budget_skipped"]] == ["work"]
    output = invoke({}, "v2", version="v2")
    assert [i.value for i in output.interrupts] == ["approve?"] and "__interrupt__" not in output.value
    budgets["v1"].top_up(llm_calls=1)
    done = invoke(Command(resume={asked.id: "yes"}), "v1")
    assert sorted(done["notes"]) == ["ask:yes", "ok", "work:ok"] and "__interrupt__" not in done


def test_end_in_a_run_forked_from_an_earlier_checkpoint_returns_the_state_it_reached():
    model = fake()
    saver = InMemorySaver()
    config = {"configurable": {"thread_id": "1"}}
    govern_graph(research_builder(model), Budget(Limits(max_llm_calls=4)), checkpointer=saver).invoke(
        {"topic": "x"}, config
    )
    app = govern_graph(research_builder(model), Budget(Limits(max_llm_calls=2)), on_exhausted="end", checkpointer=saver)
    (start,) = [s for s in app.get_state_history(config) if s.next == ("planner",)]
    state = app.invoke(None, start.config)  # replay from before the planner (time travel)
    assert [n.split(":")[0] for n in state["notes"]] == ["planner", "researcher"]
    assert [m.agent for m in state["budget_skipped"]] == ["writer"]
