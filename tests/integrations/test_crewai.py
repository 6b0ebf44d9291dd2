"""The CrewAI adapter against real `Crew.kickoff()` runs, with a fake LLM only at the provider edge."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Any

import pytest
from pydantic import BaseModel, Field

pytest.importorskip("crewai")

from crewai import Agent, Crew, PlanningConfig, Process, Task
from crewai.events.event_bus import crewai_event_bus
from crewai.hooks import (
    HookAborted,
    InterceptionPoint,
    clear_all_global_hooks,
    clear_all_hooks,
    clear_hooks,
    get_hooks,
    register_hook,
)
from crewai.state.checkpoint_config import CheckpointConfig
from crewai.tools import tool

from budgetary import Budget, BudgetExceeded, ConfigurationError, Limits, Usage, is_budget_skipped
from budgetary.integrations.crewai import CrewBudgetExceeded, budget_scope, govern_crew
from tests.fakes import CallLog, FakeCrewLLM

MODEL = "gpt-4o-mini"


def llm(**kwargs: Any) -> Any:
    kwargs.setdefault("prompt_tokens", 100)
    kwargs.setdefault("completion_tokens", 20)
    kwargs.setdefault("max_tokens", 20)
    return FakeCrewLLM(model=MODEL, **kwargs)


def three_task_crew(shared_llm: Any, **crew_kwargs: Any) -> Crew:
    researcher = Agent(role="Researcher", goal="Find facts", backstory="Careful.", llm=shared_llm)
    writer = Agent(role="Writer", goal="Write", backstory="Terse.", llm=shared_llm)
    critic = Agent(role="Critic", goal="Review", backstory="Picky.", llm=shared_llm)
    tasks = [
        Task(name="research", description="Research {topic}", expected_output="facts", agent=researcher),
        Task(name="write", description="Write about {topic}", expected_output="a line", agent=writer),
        Task(name="review", description="Review the line about {topic}", expected_output="ok", agent=critic),
    ]
    return Crew(agents=[researcher, writer, critic], tasks=tasks, process=Process.sequential, **crew_kwargs)


def test_a_crew_cap_of_n_calls_lets_exactly_n_reach_the_provider():
    fake = llm()
    crew = three_task_crew(fake)
    budget = Budget(Limits(max_llm_calls=2))
    govern_crew(crew, budget)
    with pytest.raises(CrewBudgetExceeded) as info:
        crew.kickoff(inputs={"topic": "otters"})
    exc = info.value
    assert isinstance(exc, BudgetExceeded) and isinstance(exc, HookAborted)
    assert exc.resource == "llm_calls" and exc.agent == "Critic"
    assert fake.calls.count == 2 == budget.snapshot().llm_calls
    assert [t.output.raw for t in crew.tasks[:2]] == ["canned answer", "canned answer"]  # kept


def test_ledger_tokens_equal_what_the_provider_reported():
    for shape in ("openai", "anthropic", "gemini", "litellm", "native-openai", "native-anthropic", "native-gemini"):
        fake = llm(shape=shape, cached_tokens=60, reasoning_tokens=5)
        crew = three_task_crew(fake)
        budget = Budget()
        govern_crew(crew, budget)
        crew.kickoff(inputs={"topic": "otters"})
        entries = budget.ledger.history(kind="llm")
        assert len(entries) == fake.calls.count == 3
        reported = [Usage.from_provider(r["usage"]) for r in fake.calls.records]
        assert [e.usage.input_tokens for e in entries] == [u.input_tokens for u in reported] == [100] * 3
        assert [e.usage.output_tokens for e in entries] == [20] * 3
        assert all(e.usage.cache_read_tokens == 60 for e in entries)
        if "anthropic" not in shape:  # Anthropic reports no reasoning tokens
            assert all(e.usage.reasoning_tokens == 5 for e in entries), shape
        assert [e.agent for e in entries] == ["Researcher", "Writer", "Critic"]
        assert [e.location for e in entries] == ["research", "write", "review"]
        assert not any(e.estimated for e in entries)


def test_a_per_agent_cap_skips_that_agents_later_task_and_the_crew_finishes():
    fake = llm()
    crew = researcher_twice(fake)
    tasks = crew.tasks
    budget = Budget(Limits(max_total_tokens=10_000))
    budget.agent("Researcher", max_tokens=150)
    govern_crew(crew, budget, on_exhausted="skip")
    output = crew.kickoff()
    assert fake.calls.count == 2
    assert [is_budget_skipped(t.output) for t in tasks] == [False, False, True]
    assert "skipped by budget" in output.raw
    assert budget.ledger.history(kind="skip")[0].agent == "Researcher"
    refusals = budget.ledger.history(kind="deny")  # the task-start check's, at the task it refused
    assert [(e.agent, e.location) for e in refusals] == [("Researcher", "research-more")]


def test_priority_reallocation_lets_the_important_agent_finish():
    fake = llm()
    crew = three_task_crew(fake)
    budget = Budget(Limits(max_total_tokens=10_000))
    budget.agent("Researcher", priority=1, max_tokens=2_000)
    budget.agent("Writer", priority=5, max_tokens=100)  # far too little for one call on its own
    budget.agent("Critic", priority=1, max_tokens=2_000)
    govern_crew(crew, budget)
    crew.kickoff(inputs={"topic": "otters"})
    assert fake.calls.count == 3
    transfers = budget.ledger.history(kind="transfer")
    assert transfers and all(t.agent == "Writer" for t in transfers)
    assert sum(r["allocated"] for r in budget.report().values()) == 4_100


def test_end_skips_every_remaining_task_and_returns_normally():
    fake = llm()
    crew = three_task_crew(fake)
    budget = Budget(Limits(max_llm_calls=1))
    govern_crew(crew, budget, on_exhausted="end")
    result = crew.kickoff(inputs={"topic": "otters"})
    assert fake.calls.count == 1
    assert [is_budget_skipped(t.output) for t in crew.tasks] == [False, True, True]
    # The crew's result is the last task's placeholder: it carries the marker too.
    assert is_budget_skipped(result) and result.raw == crew.tasks[-1].output.raw


def test_akickoff_under_end_returns_a_marked_crew_output():
    fake = llm()
    crew = three_task_crew(fake)
    govern_crew(crew, Budget(Limits(max_llm_calls=2)), on_exhausted="end")
    result = asyncio.run(crew.akickoff(inputs={"topic": "otters"}))
    assert fake.calls.count == 2
    assert [is_budget_skipped(t.output) for t in crew.tasks] == [False, False, True]
    assert is_budget_skipped(result)


def test_two_crews_sharing_one_llm_in_parallel_get_separate_exact_ledgers():
    fake = llm()
    budgets = [Budget(name="crew-a"), Budget(name="crew-b")]
    crews = [three_task_crew(fake), three_task_crew(fake)]
    for crew, budget in zip(crews, budgets, strict=True):
        govern_crew(crew, budget)
    errors: list[BaseException] = []

    def run(crew: Crew) -> None:
        try:
            crew.kickoff(inputs={"topic": "otters"})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in crews]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert fake.calls.count == 6
    for budget in budgets:
        snap = budget.snapshot()
        assert snap.llm_calls == 3 and snap.input_tokens == 300 and snap.output_tokens == 60
        assert len({e.run_id for e in budget.ledger.history(kind="llm")}) == 1


def test_kickoff_for_each_gives_one_run_ledger_per_input():
    fake = llm()
    crew = three_task_crew(fake)
    budget = Budget()
    govern_crew(crew, budget)
    crew.kickoff_for_each(inputs=[{"topic": "otters"}, {"topic": "beavers"}, {"topic": "voles"}])
    entries = budget.ledger.history(kind="llm")
    runs = {e.run_id for e in entries}
    assert len(runs) == 3 and fake.calls.count == 9 == budget.snapshot().llm_calls
    for run in runs:
        assert [e.agent for e in entries if e.run_id == run] == ["Researcher", "Writer", "Critic"]


def test_a_denied_tool_is_not_run_and_the_agent_is_told_why():
    ran: list[str] = []

    @tool("search")
    def search(query: str) -> str:
        """Search the web."""
        ran.append(query)
        return "results"

    seen: list[str] = []

    def responder(messages, index, agent, task):
        seen.append(json.dumps(messages))
        if index < 2:
            return f'Thought: search\nAction: search\nAction Input: {{"query": "otters {index}"}}'
        return "Thought: done\nFinal Answer: otters are great"

    fake = llm(responder=responder)
    agent = Agent(role="Researcher", goal="Find", backstory="x", llm=fake, tools=[search])
    task = Task(name="research", description="Research otters", expected_output="facts", agent=agent)
    crew = Crew(agents=[agent], tasks=[task])
    budget = Budget(Limits(max_tool_calls=1))
    govern_crew(crew, budget)
    crew.kickoff()
    assert ran == ["otters 0"]
    assert budget.snapshot().tool_calls == 1
    assert "was not run: the budget refused it" in seen[-1]


def test_hierarchical_crews_charge_the_manager_as_its_own_agent():
    def manager_script(messages, index, agent, task):
        if index == 0:
            payload = {"task": "Find 3 facts about otters", "context": "report", "coworker": "Researcher"}
            return f"Thought: delegate\nAction: Delegate work to coworker\nAction Input: {json.dumps(payload)}"
        return "Thought: done\nFinal Answer: the report"

    manager = llm(responder=manager_script)
    worker_llm = llm()
    researcher = Agent(role="Researcher", goal="Find facts", backstory="Careful.", llm=worker_llm)
    task = Task(name="report", description="Write a report on otters", expected_output="a report")
    crew = Crew(agents=[researcher], tasks=[task], process=Process.hierarchical, manager_llm=manager)
    budget = Budget()
    govern_crew(crew, budget)
    crew.kickoff()
    entries = budget.ledger.history(kind="llm")
    agents = [e.agent for e in entries]
    assert agents.count("Crew Manager") == manager.calls.count >= 2
    assert agents.count("Researcher") == worker_llm.calls.count >= 1
    assert {e.location for e in entries} == {"report"}  # delegated work: the crew task it was done for


def test_kickoff_async_and_budget_scope():
    fake = llm()
    crew = three_task_crew(fake)
    budget = Budget(Limits(max_llm_calls=10))
    with budget_scope(budget):
        asyncio.run(crew.kickoff_async(inputs={"topic": "otters"}))
    assert budget.snapshot().llm_calls == 3 == fake.calls.count
    crew.kickoff(inputs={"topic": "outside the scope"})
    assert budget.snapshot().llm_calls == 3


def test_native_async_akickoff_is_capped_too():
    fake = llm()
    crew = three_task_crew(fake)
    budget = Budget(Limits(max_llm_calls=2))
    govern_crew(crew, budget)
    with pytest.raises(CrewBudgetExceeded) as info:
        asyncio.run(crew.akickoff(inputs={"topic": "otters"}))
    assert info.value.resource == "llm_calls"
    assert fake.calls.count == 2 == budget.snapshot().llm_calls
    assert budget.snapshot().held_llm_calls == 0


def test_soft_limit_tells_the_agent_once_and_calls_the_host():
    events = []
    seen: list[str] = []

    def responder(messages, index, agent, task):
        seen.append(json.dumps(messages))
        return "Thought: done\nFinal Answer: ok"

    fake = llm(responder=responder)
    crew = three_task_crew(fake)
    budget = Budget(Limits(max_total_tokens=400, warn_at=(0.5,)), on_soft_limit=events.append)
    govern_crew(crew, budget)
    crew.kickoff(inputs={"topic": "otters"})
    assert len(events) == 1 and events[0].resource == "total_tokens"
    assert ["Budget notice" in s for s in seen] == [False, False, True]


def _searching_forever() -> tuple[Any, Any]:
    """A search tool and a responder that keeps calling it until CrewAI forces a final answer."""

    @tool("search")
    def search(query: str) -> str:
        """Search the web."""
        return "more to read"

    def responder(messages, index, agent, task):
        if agent is None:  # CrewAI's forced final answer: no agent, no task, no executor
            return "Thought: forced\nFinal Answer: best effort"
        return f'Thought: keep looking\nAction: search\nAction Input: {{"query": "otters {index}"}}'

    return search, responder


def test_the_forced_final_answer_after_max_iter_is_charged_to_the_tasks_agent():
    search, responder = _searching_forever()

    fake = llm(responder=responder)
    agent = Agent(role="Researcher", goal="Find", backstory="x", llm=fake, tools=[search], max_iter=1)
    task = Task(name="research", description="Research otters", expected_output="facts", agent=agent)
    crew = Crew(agents=[agent], tasks=[task])
    budget = Budget()
    govern_crew(crew, budget)
    crew.kickoff()
    agentless = [r for r in fake.calls.records if r["agent"] is None]
    assert agentless, "CrewAI made no agent-less call"
    entries = budget.ledger.history(kind="llm")
    assert len(entries) == fake.calls.count
    assert {(e.agent, e.location) for e in entries} == {("Researcher", "research")}


def test_a_slow_call_keeps_its_hold_past_the_lease():
    fake = llm(delay=3.0)
    researcher = Agent(role="Researcher", goal="Find facts", backstory="Careful.", llm=fake)
    crew = Crew(agents=[researcher], tasks=[Task(description="Research otters", expected_output="facts",
                                                 agent=researcher)])  # fmt: skip
    budget = Budget(Limits(max_total_tokens=100_000), lease_ttl=1.0)
    govern_crew(crew, budget)
    seen: list[int] = []

    def sample() -> None:  # a lease and a half after the call reached the provider
        while fake.calls.count == 0:
            time.sleep(0.01)
        time.sleep(1.5)
        seen.append(budget.snapshot().held_tokens)

    sampler = threading.Thread(target=sample)
    sampler.start()
    crew.kickoff()
    sampler.join()
    assert seen[0] > 20  # past its first lease, the call still holds its prompt and output reserve
    assert budget.ledger.history(kind="release") == []
    assert budget.snapshot().total_tokens == 120 and budget.snapshot().held_tokens == 0


def test_calls_that_raise_give_their_holds_back():
    from budgetary.core._lease import keeper

    fake = llm(error=RuntimeError("provider down"))
    crew = three_task_crew(fake)
    budget = Budget(Limits(max_total_tokens=100_000))
    govern_crew(crew, budget)
    with pytest.raises(Exception, match="provider down"):
        crew.kickoff(inputs={"topic": "otters"})
    assert fake.calls.count >= 1  # CrewAI may retry the failing call before giving up
    released = budget.ledger.history(kind="release")
    assert len(released) == fake.calls.count  # every attempt's hold, none left renewed forever
    assert budget.snapshot().held_tokens == 0 and budget.snapshot().llm_calls == 0
    assert not [r for r in keeper.live.values() if r._budget is budget]  # nothing renewed any more


def planner_aware(messages, index, agent, task):
    if agent is not None and agent.role == "Task Execution Planner":
        plan = {"list_of_plans_per_task": [{"task_number": 1, "task": "research", "plan": "look it up"}]}
        return f"Thought: plan\nFinal Answer: {json.dumps(plan)}"
    return "Thought: done\nFinal Answer: ok"


def test_the_planners_calls_are_gated_and_charged_like_the_crews():
    fake = llm(responder=planner_aware)
    researcher = Agent(role="Researcher", goal="Find facts", backstory="Careful.", llm=fake)
    task = Task(name="research", description="Research otters", expected_output="facts", agent=researcher)
    crew = Crew(agents=[researcher], tasks=[task], planning=True, planning_llm=fake)
    budget = Budget()
    govern_crew(crew, budget)
    crew.kickoff()
    entries = budget.ledger.history(kind="llm")
    assert [e.agent for e in entries] == ["Task Execution Planner", "Researcher"]
    assert len(entries) == fake.calls.count == 2

    capped = Budget(Limits(max_llm_calls=1))
    crew = Crew(agents=[researcher], tasks=[task], planning=True, planning_llm=fake)
    govern_crew(crew, capped)
    with pytest.raises(CrewBudgetExceeded) as info:
        crew.kickoff()
    assert info.value.agent == "Researcher" and fake.calls.count == 3  # the planner's call, not the task's
    assert capped.snapshot().llm_calls == 1 and capped.snapshot().held_llm_calls == 0


@pytest.mark.parametrize(("budget_policy", "scope_policy"), [("interrupt", None), ("deny", "bogus")])
def test_budget_scope_refuses_a_policy_crewai_cannot_apply(budget_policy, scope_policy):
    fake = llm()
    crew = three_task_crew(fake)
    budget = Budget(Limits(max_llm_calls=1), on_exhausted=budget_policy)
    message = f"CrewAI policies are 'deny', 'skip' or 'end', got {scope_policy or budget_policy!r}"
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        with budget_scope(budget, on_exhausted=scope_policy):
            crew.kickoff(inputs={"topic": "otters"})
    assert fake.calls.count == 0


def test_a_task_skipped_at_its_start_takes_no_agent_slot():
    fake = llm()
    crew = three_task_crew(fake)
    budget = Budget(Limits(max_agents=2))
    budget.agent("Researcher", max_tokens=10)  # not enough for any call: its task is skipped at the start
    govern_crew(crew, budget, on_exhausted="skip")
    crew.kickoff(inputs={"topic": "otters"})
    assert [is_budget_skipped(t.output) for t in crew.tasks] == [True, False, False]
    assert [r["agent"] for r in fake.calls.records] == ["Writer", "Critic"]
    assert [e.agent for e in budget.ledger.history(kind="agent_start")] == ["Writer", "Critic"]


class Verdict(BaseModel):
    answer: str


@pytest.mark.parametrize("structured", ["output_pydantic", "output_json"])
def test_a_skipped_task_with_structured_output_is_skipped_and_keeps_its_settings(structured):
    fake = llm(responses=['{"answer": "x"}'])
    crew = three_task_crew(fake)
    writing = crew.tasks[1]
    setattr(writing, structured, Verdict)
    budget = Budget()
    budget.agent("Writer", max_tokens=10)
    govern_crew(crew, budget, on_exhausted="skip")
    crew.kickoff(inputs={"topic": "otters"})
    assert [is_budget_skipped(t.output) for t in crew.tasks] == [False, True, False]
    assert [r["agent"] for r in fake.calls.records] == ["Researcher", "Critic"]
    assert getattr(writing, structured) is Verdict  # put back for the next kickoff
    assert crew.agents[1].llm is fake


def test_a_call_no_hook_saw_is_still_charged_to_the_current_task():
    class HooklessLLM(FakeCrewLLM):  # a custom LLM that never calls CrewAI's LLM-level hooks
        def _invoke_before_llm_call_hooks(self, *args: Any, **kwargs: Any) -> bool:
            return True

        def _invoke_after_llm_call_hooks(self, messages: Any, response: Any, *args: Any) -> Any:
            return response

    search, responder = _searching_forever()

    fake = HooklessLLM(responder=responder, prompt_tokens=100, completion_tokens=20, max_tokens=20)
    agent = Agent(role="Researcher", goal="Find", backstory="x", llm=fake, tools=[search], max_iter=1)
    task = Task(name="research", description="Research otters", expected_output="facts", agent=agent)
    crew = Crew(agents=[agent], tasks=[task])
    budget = Budget()
    govern_crew(crew, budget)
    crew.kickoff()
    assert [r["agent"] for r in fake.calls.records] == ["Researcher", None]
    entries = budget.ledger.history(kind="llm")
    assert [(e.agent, e.location, e.usage.input_tokens) for e in entries] == [("Researcher", "research", 100)] * 2


def researcher_twice(fake: Any, **agent_kwargs: Any) -> Crew:
    researcher = Agent(role="Researcher", goal="Find facts", backstory="Careful.", llm=fake, **agent_kwargs)
    writer = Agent(role="Writer", goal="Write", backstory="Terse.", llm=fake)
    tasks = [
        Task(name="research", description="Research otters", expected_output="facts", agent=researcher),
        Task(name="write", description="Write", expected_output="a line", agent=writer),
        Task(name="research-more", description="Research more", expected_output="facts", agent=researcher),
    ]
    return Crew(agents=[researcher, writer], tasks=tasks, process=Process.sequential)


def test_skip_at_the_start_counts_crewais_prompt_and_the_tools_it_describes():
    @tool("lookup")
    def lookup(query: str) -> str:
        """Look a thing up in the encyclopedia and return a long, detailed article about it, with sources,
        dates, cross-references to related entries and a summary of the scholarly debate around it."""
        return "an article"

    fake = llm()
    crew = researcher_twice(fake, tools=[lookup])
    budget = Budget(Limits(max_total_tokens=100_000))
    # Each call holds its ~350-token prompt and is charged the 120 tokens the fake reports: after one call,
    # 280 are left, room for the task's own fields but not for the prompt CrewAI builds around them.
    budget.agent("Researcher", max_tokens=400)
    govern_crew(crew, budget, on_exhausted="skip")
    crew.kickoff()
    assert [is_budget_skipped(t.output) for t in crew.tasks] == [False, False, True]
    assert [r["agent"] for r in fake.calls.records] == ["Researcher", "Writer"]
    assert [e.agent for e in budget.ledger.history(kind="agent_start")] == ["Researcher", "Writer"]  # at the start


def test_skip_when_the_tasks_first_real_call_is_refused_though_its_start_check_passed():
    fake = llm()
    # The crew gives a delegating agent coworker tools: their ~600-token descriptions reach the first call,
    # which the task-start check cannot see.
    researcher = Agent(role="Researcher", goal="Find facts", backstory="Careful.", llm=fake, allow_delegation=True)
    writer = Agent(role="Writer", goal="Write", backstory="Terse.", llm=fake)
    tasks = [
        Task(name="research", description="Research otters", expected_output="facts", agent=researcher),
        Task(name="write", description="Write", expected_output="a line", agent=writer),
    ]
    crew = Crew(agents=[researcher, writer], tasks=tasks)
    budget = Budget(Limits(max_total_tokens=100_000))
    budget.agent("Researcher", max_tokens=400)
    govern_crew(crew, budget, on_exhausted="skip")
    for _ in range(3):  # more kickoffs than the agent's max_retry_limit: each skip gives CrewAI's retry back
        crew.kickoff()
        assert [is_budget_skipped(t.output) for t in tasks] == [True, False]
    assert [r["agent"] for r in fake.calls.records] == ["Writer"] * 3
    assert [e.location for e in budget.ledger.history(kind="skip")] == ["research"] * 3
    assert researcher.llm is fake and budget.snapshot().held_tokens == 0


def test_end_when_the_first_real_call_is_refused_skips_the_rest():
    fake = llm()
    researcher = Agent(role="Researcher", goal="Find facts", backstory="Careful.", llm=fake, allow_delegation=True)
    writer = Agent(role="Writer", goal="Write", backstory="Terse.", llm=fake)
    tasks = [
        Task(name="research", description="Research otters", expected_output="facts", agent=researcher),
        Task(name="write", description="Write", expected_output="a line", agent=writer),
    ]
    crew = Crew(agents=[researcher, writer], tasks=tasks)
    budget = Budget(Limits(max_total_tokens=100_000))
    budget.agent("Researcher", max_tokens=400)
    govern_crew(crew, budget, on_exhausted="end")
    crew.kickoff()
    assert [is_budget_skipped(t.output) for t in tasks] == [True, True]
    assert fake.calls.count == 0


def delegating_manager(delegations: int) -> Any:
    def script(messages, index, agent, task):
        if index < delegations:
            payload = {"task": f"Find fact {index} about otters", "context": "report", "coworker": "Researcher"}
            return f"Thought: delegate\nAction: Delegate work to coworker\nAction Input: {json.dumps(payload)}"
        return "Thought: done\nFinal Answer: the report"

    return llm(responder=script)


def hierarchical_crew(manager: Any, worker_llm: Any) -> Crew:
    researcher = Agent(role="Researcher", goal="Find facts", backstory="Careful.", llm=worker_llm)
    task = Task(name="report", description="Write a report on otters", expected_output="a report")
    return Crew(agents=[researcher], tasks=[task], process=Process.hierarchical, manager_llm=manager)


def test_a_workers_refusal_under_deny_ends_the_kickoff_though_delegation_swallows_it():
    manager, worker_llm = delegating_manager(3), llm()
    crew = hierarchical_crew(manager, worker_llm)
    budget = Budget(Limits(max_total_tokens=100_000))
    budget.agent("Researcher", max_tokens=50)  # not one call
    govern_crew(crew, budget)
    with pytest.raises(CrewBudgetExceeded) as info:
        crew.kickoff()
    assert info.value.agent == "Researcher" and info.value.resource == "allocation"
    assert manager.calls.count == 1 and worker_llm.calls.count == 0  # the manager made no paid call after it
    assert budget.snapshot().held_tokens == 0


def test_a_workers_refusal_under_skip_hands_the_manager_a_placeholder():
    manager, worker_llm = delegating_manager(1), llm()
    seen: list[str] = []
    inner = manager.responder
    manager.responder = lambda messages, *args: seen.append(json.dumps(messages)) or inner(messages, *args)
    crew = hierarchical_crew(manager, worker_llm)
    budget = Budget(Limits(max_total_tokens=100_000))
    budget.agent("Researcher", max_tokens=50)
    govern_crew(crew, budget, policies={"Researcher": "skip"})
    assert crew.kickoff().raw == "the report"
    assert manager.calls.count == 2 and worker_llm.calls.count == 0
    assert "skipped by budget" in seen[-1]
    assert [e.agent for e in budget.ledger.history(kind="skip")] == ["Researcher"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"budget": "budget"}, "budget must be a Budget, got str 'budget'"),
        ({"budget": None}, "budget must be a Budget, got NoneType None"),
        ({"crew": None}, "crew must be a crewai Crew, got NoneType None"),
        ({"agents": ["Researcher"]}, "agents must map agent roles to budget agent names, got list ['Researcher']"),
        (
            {"agents": {"Researcher": 5}},
            "agents must map agent roles to budget agent names, got dict {'Researcher': 5}",
        ),
        (
            {"agents": {"Researcher": ""}},
            "agents must map agent roles to budget agent names, got dict {'Researcher': ''}",
        ),
        ({"policies": "skip"}, "policies must map task names or agent roles to policies, got str 'skip'"),
        ({"policies": {3: "skip"}}, "policies must map task names or agent roles to policies, got dict {3: 'skip'}"),
    ],
)
def test_govern_crew_names_the_argument_it_cannot_use(arguments, message):
    fake = llm()
    crew = three_task_crew(fake)
    given = {"crew": crew, "budget": Budget(), **arguments}
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        govern_crew(given.pop("crew"), given.pop("budget"), **given)
    assert not hasattr(crew, "__budgetary__")
    with pytest.raises(ConfigurationError, match=re.escape("budget must be a Budget, got str 'b'")):
        with budget_scope("b"):  # type: ignore[arg-type]
            pass


def test_a_kickoff_interrupted_before_crewais_end_leaves_no_run_or_hold_behind():
    fake = llm(error=KeyboardInterrupt())  # Ctrl-C during the provider call: CrewAI dispatches no end
    crew = three_task_crew(fake)
    budget = Budget(Limits(max_total_tokens=100_000), lease_ttl=0.5)
    govern_crew(crew, budget)
    with pytest.raises(KeyboardInterrupt):
        crew.kickoff(inputs={"topic": "otters"})
    other = llm()
    three_task_crew(other).kickoff(inputs={"topic": "otters"})  # not governed, same thread
    assert other.calls.count == 3
    snap = budget.snapshot()
    assert snap.llm_calls == 0 and snap.held_tokens == 0 and snap.held_llm_calls == 0
    assert len(budget.ledger.history(kind="release")) == 1  # the interrupted call's hold, given back at once


def test_an_akickoff_cut_by_a_timeout_leaves_no_run_behind():
    async def cut_when_called(timeout: Any, fake: Any) -> None:
        while fake.calls.count == 0:
            await asyncio.sleep(0.01)
        timeout.reschedule(asyncio.get_running_loop().time())

    async def main() -> tuple[Budget, Any]:
        fake = llm(delay=1.0)
        crew = three_task_crew(fake)
        budget = Budget(Limits(max_total_tokens=100_000))
        govern_crew(crew, budget)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as timeout:  # cancels akickoff mid-call; the task itself goes on
                cut = asyncio.ensure_future(cut_when_called(timeout, fake))
                await crew.akickoff(inputs={"topic": "otters"})
        await cut
        other = llm()
        await three_task_crew(other).akickoff(inputs={"topic": "otters"})
        return budget, other

    budget, other = asyncio.run(main())
    assert other.calls.count == 3
    deadline = time.monotonic() + 10
    while budget.snapshot().llm_calls == 0 and time.monotonic() < deadline:  # CrewAI's worker finishes the call
        time.sleep(0.05)  # the timeout cut: it is charged what it reported
    snap = budget.snapshot()
    assert snap.llm_calls == 1 and snap.total_tokens == 120 and snap.held_tokens == 0


@pytest.mark.parametrize("policy", ["skip", "end"])
def test_delegated_work_follows_the_policy_of_the_crew_task_it_is_done_for(policy):
    manager, worker_llm = delegating_manager(1), llm()
    crew = hierarchical_crew(manager, worker_llm)
    budget = Budget(Limits(max_total_tokens=100_000))
    budget.agent("Researcher", max_tokens=50)  # not one call
    govern_crew(crew, budget, policies={"report": policy})  # the crew task's name; the default stays deny
    crew.kickoff()
    assert worker_llm.calls.count == 0
    assert [(e.agent, e.location) for e in budget.ledger.history(kind="skip")][:1] == [("Researcher", "report")]


def test_kickoff_for_each_of_a_governed_crews_model_copy_runs_the_copy():
    fake = llm()
    crew = three_task_crew(fake)
    budget = Budget()
    govern_crew(crew, budget)
    solo = Agent(role="Solo", goal="Go", backstory="Alone.", llm=fake)
    task = Task(name="solo", description="Solo on {topic}", expected_output="x", agent=solo)
    clone = crew.model_copy(update={"agents": [solo], "tasks": [task]})
    clone.kickoff_for_each(inputs=[{"topic": "otters"}])
    assert [r["agent"] for r in fake.calls.records] == ["Solo"]
    assert [e.agent for e in budget.ledger.history(kind="llm")] == ["Solo"]  # still under the budget


def test_the_refusal_pickles_as_itself():
    import pickle

    fake = llm()
    crew = three_task_crew(fake)
    govern_crew(crew, Budget(Limits(max_llm_calls=1)))
    with pytest.raises(CrewBudgetExceeded) as info:
        crew.kickoff(inputs={"topic": "otters"})
    copy = pickle.loads(pickle.dumps(info.value))  # a kickoff in a process pool hands it back pickled
    assert type(copy) is CrewBudgetExceeded
    assert (copy.message, copy.agent, copy.resource, copy.limit, copy.reason, copy.source) == (
        info.value.message, "Writer", "llm_calls", 1, info.value.message, "budgetary",
    )  # fmt: skip


def test_a_custom_managers_agent_less_calls_are_charged_to_it():
    def script(messages, index, agent, task):
        if agent is None:  # the forced final answer after the manager's max_iter
            return "Thought: forced\nFinal Answer: best effort"
        if agent.role == "Boss":
            payload = {"task": f"Find fact {index}", "context": "report", "coworker": "Researcher"}
            return f"Thought: delegate\nAction: Delegate work to coworker\nAction Input: {json.dumps(payload)}"
        return "Thought: done\nFinal Answer: a fact"

    fake = llm(responder=script)
    boss = Agent(role="Boss", goal="Lead", backstory="In charge.", llm=fake, allow_delegation=True, max_iter=1)
    researcher = Agent(role="Researcher", goal="Find facts", backstory="Careful.", llm=fake)
    task = Task(name="report", description="Write a report on otters", expected_output="a report")
    crew = Crew(agents=[researcher], tasks=[task], process=Process.hierarchical, manager_agent=boss)
    budget = Budget()
    govern_crew(crew, budget)
    crew.kickoff()
    assert [r["agent"] for r in fake.calls.records] == ["Boss", "Researcher", None]
    assert [e.agent for e in budget.ledger.history(kind="llm")] == ["Boss", "Researcher", "Boss"]
    assert set(budget.report()) == {"Boss", "Researcher"}


def test_a_tool_call_soft_limit_tells_the_agent_on_its_next_call():
    @tool("search")
    def search(query: str) -> str:
        """Search the web."""
        return "results"

    seen: list[str] = []

    def responder(messages, index, agent, task):
        seen.append(json.dumps(messages))
        if index == 0:
            return 'Thought: search\nAction: search\nAction Input: {"query": "otters"}'
        return "Thought: done\nFinal Answer: otters are great"

    events = []
    fake = llm(responder=responder)
    agent = Agent(role="Researcher", goal="Find", backstory="x", llm=fake, tools=[search])
    task = Task(name="research", description="Otters", expected_output="facts", agent=agent)
    crew = Crew(agents=[agent], tasks=[task])
    budget = Budget(Limits(max_tool_calls=2, warn_at=(0.5,)), on_soft_limit=events.append)
    govern_crew(crew, budget)
    crew.kickoff()
    assert [e.resource for e in events] == ["tool_calls"]
    assert ["Budget notice" in s for s in seen] == [False, True]


@pytest.mark.parametrize("crewai", ["missing", "too old"])
def test_without_a_supported_crewai_the_import_names_the_extra(crewai, tmp_path):
    import os
    import subprocess
    import sys

    if crewai == "too old":  # a crewai without the interception layer of 1.15
        (tmp_path / "crewai").mkdir()
        (tmp_path / "crewai" / "__init__.py").write_text("__version__ = '1.14.0'\n")
        (tmp_path / "crewai" / "context.py").write_text("def get_current_task_id(): return None\n")
    hide = "import sys; sys.modules['crewai'] = None\n" if crewai == "missing" else ""
    script = hide + (
        "import budgetary\n"
        "assert 'crewai' not in sys.modules or sys.modules['crewai'] is None\n"
        "import budgetary.integrations.crewai\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", "import sys\n" + script], capture_output=True, text=True, env=env)
    assert done.returncode == 1
    message = 'budgetary.integrations.crewai needs crewai>=1.15.30,<1.16: pip install "budgetary[crewai]"'
    assert f"ImportError: {message}" in done.stderr


def planning_writer(fake: Any) -> Crew:
    """A researcher, then a writer who plans before it works (no bound on the plan's refinements)."""
    researcher = Agent(role="Researcher", goal="Find facts", backstory="Careful.", llm=fake)
    writer = Agent(role="Writer", goal="Write", backstory="Terse.", llm=fake, planning_config=PlanningConfig())
    tasks = [
        Task(name="research", description="Research otters", expected_output="facts", agent=researcher),
        Task(name="write", description="Write", expected_output="a line", agent=writer),
    ]
    return Crew(agents=[researcher, writer], tasks=tasks)


def kickoff_within(crew: Crew, seconds: float) -> None:
    """Kick ``crew`` off in a daemon thread and fail if it has not returned after ``seconds``."""
    failure: list[BaseException] = []
    thread = threading.Thread(target=lambda: _run_into(crew, failure), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"kickoff still running after {seconds} s"
    if failure:
        raise failure[0]


def _run_into(crew: Crew, failure: list[BaseException]) -> None:
    try:
        crew.kickoff()
    except BaseException as exc:  # handed to the test's thread
        failure.append(exc)


def test_a_skipped_task_of_a_planning_agent_ends():
    # The stub never says the plan is ready: planning on it would refine forever.
    ready = "Thought: done\nFinal Answer: READY: I am ready to execute the task. the line"
    fake = llm(responder=lambda *args: ready)
    crew = planning_writer(fake)
    budget = Budget()
    budget.agent("Writer", max_tokens=10)  # not one call: the writing is skipped at its start
    govern_crew(crew, budget, on_exhausted="skip")
    kickoff_within(crew, 30)
    assert [is_budget_skipped(t.output) for t in crew.tasks] == [False, True]
    assert [r["agent"] for r in fake.calls.records] == ["Researcher"]
    assert crew.agents[1].planning_config is not None  # put back for the next kickoff


def test_skip_when_a_planning_agents_first_call_the_plan_is_refused():
    ready = "Thought: done\nFinal Answer: READY: I am ready to execute the task. the line"
    fake = llm(responder=lambda *args: ready)
    crew = planning_writer(fake)
    budget = Budget()
    # Room for the task's own first call (the start check passes), not for the larger planning prompt.
    budget.agent("Writer", max_tokens=150)
    govern_crew(crew, budget, on_exhausted="skip")
    kickoff_within(crew, 30)
    assert [is_budget_skipped(t.output) for t in crew.tasks] == [False, True]
    assert [r["agent"] for r in fake.calls.records] == ["Researcher"]
    assert [(e.agent, e.location) for e in budget.ledger.history(kind="skip")] == [("Writer", "write")]
    assert crew.agents[1].llm is fake and budget.snapshot().held_tokens == 0


def test_a_task_that_takes_a_skipped_task_as_context_gets_the_placeholder_and_runs():
    prompts: dict[str, str] = {}

    def answer(messages, index, agent, task):
        prompts[task.name] = json.dumps(messages)
        return f"Thought: done\nFinal Answer: {task.name} done"

    crew = three_task_crew(llm(responder=answer))
    crew.tasks[2].context = [crew.tasks[0]]
    budget = Budget()
    budget.agent("Researcher", max_tokens=10)
    govern_crew(crew, budget, on_exhausted="skip")
    result = crew.kickoff(inputs={"topic": "otters"})
    assert [is_budget_skipped(t.output) for t in crew.tasks] == [True, False, False]
    assert "[skipped by budget: agent 'Researcher'" in prompts["review"]
    assert result.raw == "review done" and not is_budget_skipped(result)


def test_a_skipped_task_skips_its_guardrails_and_keeps_them():
    checked: list[str] = []

    def json_only(output):
        checked.append(output.raw)
        return output.raw.startswith("{"), "answer in JSON"

    fake = llm(responses=['{"line": "otters"}'])
    crew = researcher_twice(fake)
    writing = Task(name="write", description="Write", expected_output="JSON", agent=crew.agents[1], guardrail=json_only)
    listed = Task(name="list", description="List", expected_output="JSON", agent=crew.agents[1], guardrails=[json_only])
    crew = Crew(agents=crew.agents, tasks=[crew.tasks[2], writing, listed])
    budget = Budget()
    budget.agent("Writer", max_tokens=10)  # the placeholder would fail the guardrail, three retries, then abort
    govern_crew(crew, budget, on_exhausted="skip")
    crew.kickoff()
    assert [is_budget_skipped(t.output) for t in crew.tasks] == [False, True, True]
    assert checked == []
    govern_crew(crew, Budget(), on_exhausted="skip")  # room again: the guardrails are back
    crew.kickoff()
    assert checked == ['{"line": "otters"}'] * 2


def test_a_skipped_task_asks_no_human_to_review_its_placeholder(monkeypatch):
    asked: list[Any] = []
    monkeypatch.setattr("builtins.input", lambda *args: asked.append(args) or "")
    crew = researcher_twice(llm())
    reviewed = Task(name="write", description="Write", expected_output="a line", agent=crew.agents[1], human_input=True)
    crew = Crew(agents=crew.agents, tasks=[reviewed, crew.tasks[0]])
    budget = Budget()
    budget.agent("Writer", max_tokens=10)
    govern_crew(crew, budget, on_exhausted="skip")
    crew.kickoff()
    assert [is_budget_skipped(t.output) for t in crew.tasks] == [True, False]
    assert asked == [] and reviewed.human_input is True


def test_replay_of_a_governed_crew_is_capped_and_charged_as_a_kickoff_is():
    fake = llm()
    crew = three_task_crew(fake)
    budget = Budget(Limits(max_llm_calls=4))
    govern_crew(crew, budget)
    crew.kickoff(inputs={"topic": "otters"})
    with pytest.raises(CrewBudgetExceeded):
        crew.replay(str(crew.tasks[1].id))  # write and review again: one call left
    assert fake.calls.count == 4 == budget.snapshot().llm_calls
    replayed = {e.run_id for e in budget.ledger.history(kind="llm")[3:]}
    assert len(replayed) == 1 and replayed.isdisjoint(e.run_id for e in budget.ledger.history(kind="llm")[:3])
    assert budget.snapshot().held_tokens == 0


# -- work outside a kickoff, inside budget_scope ------------------------------------------------


def test_a_bare_llm_call_in_budget_scope_is_reserved_and_charged():
    fake = llm()
    budget = Budget(Limits(max_llm_calls=2))
    with budget_scope(budget):
        assert fake.call("Summarize otters").endswith("canned answer")
        assert asyncio.run(fake.acall("Summarize beavers")).endswith("canned answer")
        with pytest.raises(CrewBudgetExceeded) as info:
            fake.call("And once more")
        assert info.value.resource == "llm_calls"
    assert fake.calls.count == 2
    entries = budget.ledger.history(kind="llm")
    assert [(e.usage.input_tokens, e.usage.output_tokens, e.estimated) for e in entries] == [(100, 20, False)] * 2
    assert budget.snapshot().held_llm_calls == 0
    fake.call("Outside the scope")
    assert fake.calls.count == 3 and budget.snapshot().llm_calls == 2


def test_a_bare_llm_call_that_raises_gives_its_hold_back_when_the_scope_ends():
    fake = llm(error=RuntimeError("provider down"))
    budget = Budget(Limits(max_total_tokens=10_000))
    with budget_scope(budget):
        with pytest.raises(RuntimeError, match="provider down"):
            fake.call("Summarize otters")
        assert budget.snapshot().held_tokens > 0  # no after-hook ran: the call is still held
    assert budget.snapshot().held_tokens == 0 and budget.snapshot().total_tokens == 0


def test_task_execute_sync_in_budget_scope_runs_the_task_start_checks():
    fake = llm()
    agent = Agent(role="Researcher", goal="Find", backstory="x", llm=fake)
    task = Task(name="research", description="Research otters", expected_output="facts", agent=agent)
    budget = Budget(Limits(max_total_tokens=10_000))
    budget.agent("Researcher", max_tokens=50)  # less than the task's first call
    with budget_scope(budget, on_exhausted="skip"):
        output = task.execute_sync()
    assert fake.calls.count == 0
    assert is_budget_skipped(output) and "skipped by budget" in output.raw
    assert [(e.agent, e.location) for e in budget.ledger.history(kind="skip")] == [("Researcher", "research")]
    assert agent.llm is fake  # the stub was put back


def test_task_execute_sync_in_budget_scope_charges_agent_less_calls_to_the_tasks_agent():
    search, responder = _searching_forever()

    fake = llm(responder=responder)
    agent = Agent(role="Researcher", goal="Find", backstory="x", llm=fake, tools=[search], max_iter=1)
    task = Task(name="research", description="Research otters", expected_output="facts", agent=agent)
    budget = Budget()
    with budget_scope(budget):
        asyncio.run(task.aexecute_sync())
        task.execute_async().result(timeout=30)
    assert any(r["agent"] is None for r in fake.calls.records), "CrewAI made no agent-less call"
    entries = budget.ledger.history(kind="llm")
    assert len(entries) == fake.calls.count >= 4
    assert {(e.agent, e.location) for e in entries} == {("Researcher", "research")}
    assert len({e.run_id for e in entries}) == 2  # each execution is a run of its own
    assert budget.snapshot().held_llm_calls == 0


# -- checkpoints ------------------------------------------------------------------------------------


class CheckpointableLLM(FakeCrewLLM):
    """The fake LLM as a checkpoint can hold it: CrewAI serializes an agent's LLM and rebuilds it by type."""

    llm_type: str = "budgetary-test-fake"
    calls: CallLog = Field(default_factory=CallLog, exclude=True)
    responder: Any = Field(default=None, exclude=True)


@pytest.fixture
def checkpointed_crew(tmp_path, monkeypatch):
    """A governed crew refused at its last task after checkpointing the first two, and that checkpoint."""
    from crewai.agents.agent_builder import base_agent

    # CrewAI rebuilds a checkpointed LLM from a fixed registry of its own provider classes.
    monkeypatch.setitem(base_agent._LLM_TYPE_REGISTRY, "budgetary-test-fake", f"{__name__}.CheckpointableLLM")
    # A checkpoint holds every entity of the process's runtime state: start with none of other tests'.
    crewai_event_bus.reset_runtime_state()
    fake = CheckpointableLLM(prompt_tokens=100, completion_tokens=20, max_tokens=20)
    crew = three_task_crew(fake, checkpoint=CheckpointConfig(location=str(tmp_path)))
    budget = Budget(Limits(max_llm_calls=2))
    govern_crew(crew, budget)
    with pytest.raises(CrewBudgetExceeded):
        crew.kickoff(inputs={"topic": "otters"})
    crewai_event_bus.flush()  # checkpoints are written by event handlers
    latest = max(tmp_path.rglob("*.json"), key=lambda path: path.stat().st_mtime_ns)
    try:
        yield crew, budget, CheckpointConfig(restore_from=str(latest), location=str(tmp_path))
    finally:
        crewai_event_bus.reset_runtime_state()  # restoring installs the checkpoint's state for the process


def test_a_kickoff_resumed_from_a_checkpoint_stays_under_the_crews_budget(checkpointed_crew):
    crew, budget, checkpoint = checkpointed_crew
    with pytest.raises(CrewBudgetExceeded):  # the resumed crew is CrewAI's new object: still refused
        crew.kickoff(from_checkpoint=checkpoint)
    budget.top_up(llm_calls=1)
    output = asyncio.run(crew.kickoff_async(from_checkpoint=checkpoint))
    assert output.raw == "canned answer"
    entries = budget.ledger.history(kind="llm")
    assert [(e.agent, e.location) for e in entries] == [("Researcher", "research"), ("Writer", "write"),
                                                        ("Critic", "review")]  # fmt: skip
    assert budget.snapshot().llm_calls == 3 and budget.snapshot().held_llm_calls == 0


def test_crew_from_checkpoint_keeps_the_budget_of_its_governed_original(checkpointed_crew):
    crew, budget, checkpoint = checkpointed_crew
    restored = Crew.from_checkpoint(checkpoint)
    assert restored is not crew and restored.id == crew.id
    with pytest.raises(CrewBudgetExceeded):
        restored.kickoff()
    other = Budget(Limits(max_llm_calls=5))
    govern_crew(restored, other)  # governed again: its own budget from now on
    restored.kickoff()
    assert budget.snapshot().llm_calls == 2 and other.snapshot().llm_calls == 1


def test_crew_from_checkpoint_after_a_resumed_kickoff_keeps_the_budget(checkpointed_crew):
    import gc

    crew, budget, checkpoint = checkpointed_crew
    try:  # resumes a new crew of crew's id, gone once the kickoff ends (no ExceptionInfo keeps it)
        crew.kickoff(from_checkpoint=checkpoint)
    except CrewBudgetExceeded:
        pass
    gc.collect()
    with pytest.raises(CrewBudgetExceeded):
        Crew.from_checkpoint(checkpoint).kickoff()
    with pytest.raises(CrewBudgetExceeded):
        Crew.fork(checkpoint).kickoff()
    assert budget.snapshot().llm_calls == 2 and budget.snapshot().held_llm_calls == 0


def test_agent_kickoff_in_budget_scope_charges_its_agent_less_calls_to_the_agent():
    search, responder = _searching_forever()
    fake = llm(responder=responder)
    agent = Agent(role="Researcher", goal="Find", backstory="x", llm=fake, tools=[search], max_iter=1)
    budget = Budget()
    with budget_scope(budget):
        agent.kickoff("Research otters")
    assert any(r["agent"] is None for r in fake.calls.records), "CrewAI made no agent-less call"
    entries = budget.ledger.history(kind="llm")
    assert len(entries) == fake.calls.count and {e.agent for e in entries} == {"Researcher"}
    assert budget.report()["Researcher"]["consumed"] == 120 * fake.calls.count


def test_a_task_a_flow_runs_itself_charges_its_agent_less_calls_to_its_agent_and_name():
    from crewai.flow.flow import Flow, start

    search, responder = _searching_forever()
    fake = llm(responder=responder)
    agent = Agent(role="Researcher", goal="Find", backstory="x", llm=fake, tools=[search], max_iter=1)
    task = Task(name="research", description="Research otters", expected_output="facts", agent=agent)

    class Research(Flow):  # type: ignore[type-arg]
        @start()
        def go(self) -> str:
            return task.execute_sync().raw

    budget = Budget()
    with budget_scope(budget):
        Research().kickoff()
    assert any(r["agent"] is None for r in fake.calls.records), "CrewAI made no agent-less call"
    entries = budget.ledger.history(kind="llm")
    assert len(entries) == fake.calls.count >= 2
    assert {(e.agent, e.location) for e in entries} == {("Researcher", "research")}


def test_the_task_start_check_is_not_charged_with_charge_failed_calls():
    # Under skip, each task's start reserves its first call to see if it fits, then gives it back:
    # that hold is no call, so charge_failed_calls (for calls that failed at the provider) must not charge it.
    fake = llm()
    crew = three_task_crew(fake)
    budget = Budget(Limits(max_total_tokens=10_000), charge_failed_calls=True)
    govern_crew(crew, budget, on_exhausted="skip")
    crew.kickoff(inputs={"topic": "otters"})
    entries = budget.ledger.history(kind="llm")
    assert len(entries) == fake.calls.count == 3 and not any(e.estimated for e in entries)
    assert budget.snapshot().total_tokens == 3 * 120


def test_every_entry_of_an_unnamed_task_carries_its_description_as_its_location():
    # CrewAI names an unnamed task's step by its description: its agent start did, and so must its calls.
    fake = llm()
    researcher = Agent(role="Researcher", goal="Find facts", backstory="Careful.", llm=fake)
    tasks = [
        Task(description="Research otters", expected_output="facts", agent=researcher),
        Task(description="Research beavers", expected_output="facts", agent=researcher),
    ]
    budget = Budget(Limits(max_llm_calls=1))
    crew = govern_crew(Crew(agents=[researcher], tasks=tasks), budget)
    with pytest.raises(CrewBudgetExceeded):
        crew.kickoff()
    assert [(e.kind, e.location) for e in budget.ledger] == [
        ("agent_start", "Research otters"),
        ("llm", "Research otters"),
        ("soft_limit", "Research otters"),
        ("agent_start", "Research beavers"),
        ("deny", "Research beavers"),
    ]


def test_delegated_work_on_an_unnamed_crew_task_carries_that_tasks_description():
    manager, worker_llm = delegating_manager(1), llm()
    researcher = Agent(role="Researcher", goal="Find facts", backstory="Careful.", llm=worker_llm)
    task = Task(description="Write a report on otters", expected_output="a report")
    crew = Crew(agents=[researcher], tasks=[task], process=Process.hierarchical, manager_llm=manager)
    budget = Budget()
    govern_crew(crew, budget)
    crew.kickoff()
    entries = budget.ledger.history(kind="llm")
    assert [e.agent for e in entries] == ["Crew Manager", "Researcher", "Crew Manager"]
    assert {e.location for e in entries} == {"Write a report on otters"}


def manager_delegating_to(*coworkers: str) -> Any:
    def script(messages, index, agent, task):
        if index < len(coworkers):
            payload = {"task": f"Part {index} of the report", "context": "report", "coworker": coworkers[index]}
            return f"Thought: delegate\nAction: Delegate work to coworker\nAction Input: {json.dumps(payload)}"
        return "Thought: done\nFinal Answer: the report"

    return llm(responder=script)


def hierarchical_pair(manager: Any) -> tuple[Crew, Any, Any]:
    researcher_llm, writer_llm = llm(), llm()
    researcher = Agent(role="Researcher", goal="Find facts", backstory="Careful.", llm=researcher_llm)
    writer = Agent(role="Writer", goal="Write", backstory="Terse.", llm=writer_llm)
    task = Task(name="report", description="Write a report on otters", expected_output="a report")
    crew = Crew(agents=[researcher, writer], tasks=[task], process=Process.hierarchical, manager_llm=manager)
    return crew, researcher_llm, writer_llm


def test_each_delegation_is_an_agent_start_of_the_coworker():
    crew, _, _ = hierarchical_pair(manager_delegating_to("Researcher", "Writer", "Researcher"))
    budget = Budget()
    govern_crew(crew, budget)
    crew.kickoff()
    starts = [(e.agent, e.location) for e in budget.ledger.history(kind="agent_start")]
    assert starts == [
        ("Crew Manager", "report"),
        ("Researcher", "report"),
        ("Writer", "report"),
        ("Researcher", "report"),
    ]
    assert budget.snapshot().agents_started == 4


def test_max_agents_refuses_a_delegation_and_deny_ends_the_kickoff():
    manager = manager_delegating_to("Researcher", "Writer")
    crew, researcher_llm, writer_llm = hierarchical_pair(manager)
    budget = Budget(Limits(max_agents=2))  # the manager's task start and one delegation
    govern_crew(crew, budget)
    with pytest.raises(CrewBudgetExceeded) as info:
        crew.kickoff()
    assert (info.value.resource, info.value.agent) == ("agents", "Writer")
    assert researcher_llm.calls.count == 1 and writer_llm.calls.count == 0
    assert manager.calls.count == 2  # the manager made no paid call after the refusal
    assert budget.snapshot().agents_started == 2


def test_max_agents_refuses_a_delegation_and_skip_hands_the_manager_a_placeholder():
    manager = manager_delegating_to("Researcher", "Writer")
    seen: list[str] = []
    inner = manager.responder
    manager.responder = lambda messages, *args: seen.append(json.dumps(messages)) or inner(messages, *args)
    crew, researcher_llm, writer_llm = hierarchical_pair(manager)
    budget = Budget(Limits(max_agents=2))
    govern_crew(crew, budget, on_exhausted="skip")
    assert crew.kickoff().raw == "the report"
    assert researcher_llm.calls.count == 1 and writer_llm.calls.count == 0 and manager.calls.count == 3
    assert "skipped by budget" in seen[-1]
    assert [(e.agent, e.location) for e in budget.ledger.history(kind="skip")] == [("Writer", "report")]
    assert [e.agent for e in budget.ledger.history(kind="agent_start")] == ["Crew Manager", "Researcher"]


def researcher_delegating_to_writer() -> tuple[Crew, Any]:
    def script(messages, index, agent, task):
        if agent.role == "Researcher" and not any(m.get("role") == "assistant" for m in messages):
            payload = {"task": "Write it up", "context": "facts", "coworker": "Writer"}
            return f"Thought: delegate\nAction: Delegate work to coworker\nAction Input: {json.dumps(payload)}"
        return "Thought: done\nFinal Answer: done"

    fake = llm(responder=script)
    researcher = Agent(role="Researcher", goal="Find", backstory="x", llm=fake, allow_delegation=True)
    writer = Agent(role="Writer", goal="Write", backstory="Terse.", llm=fake)
    task = Task(name="research", description="Research otters", expected_output="facts", agent=researcher)
    return Crew(agents=[researcher, writer], tasks=[task]), fake


def test_a_delegation_in_a_sequential_crew_is_an_agent_start():
    crew, fake = researcher_delegating_to_writer()
    budget = Budget()
    govern_crew(crew, budget)
    crew.kickoff()
    assert [r["agent"] for r in fake.calls.records] == ["Researcher", "Writer", "Researcher"]
    starts = [(e.agent, e.location) for e in budget.ledger.history(kind="agent_start")]
    assert starts == [("Researcher", "research"), ("Writer", "research")]

    crew, fake = researcher_delegating_to_writer()
    govern_crew(crew, Budget(Limits(max_agents=1)))
    with pytest.raises(CrewBudgetExceeded) as info:
        crew.kickoff()
    assert (info.value.resource, info.value.agent) == ("agents", "Writer")
    assert [r["agent"] for r in fake.calls.records] == ["Researcher"]


def test_every_task_start_is_an_agent_start_even_for_an_agent_that_ran_before():
    fake = llm()
    crew = researcher_twice(fake)
    tasks = crew.tasks
    budget = Budget(Limits(max_agents=2))
    govern_crew(crew, budget, on_exhausted="skip")
    crew.kickoff()
    assert [is_budget_skipped(t.output) for t in tasks] == [False, False, True]
    assert [(e.agent, e.location) for e in budget.ledger.history(kind="skip")] == [("Researcher", "research-more")]


@pytest.fixture
def hooks_put_back() -> Any:
    """Put CrewAI's global hook lists back as they were: the test clears them."""
    saved = {point: get_hooks(point) for point in InterceptionPoint}
    yield
    for point, hooks in saved.items():
        clear_hooks(point)
        for hook in hooks:
            register_hook(point, hook)


@pytest.mark.usefixtures("hooks_put_back")
@pytest.mark.parametrize("clear", [clear_all_global_hooks, clear_all_hooks])
def test_hooks_the_host_cleared_are_registered_again(clear):
    clear()  # before govern_crew: it registers them again
    fake = llm()
    crew = three_task_crew(fake)
    budget = Budget(Limits(max_llm_calls=1))
    govern_crew(crew, budget)
    with pytest.raises(CrewBudgetExceeded):
        crew.kickoff(inputs={"topic": "otters"})
    assert fake.calls.count == 1 == budget.snapshot().llm_calls

    clear()  # after it: the kickoff of a governed crew registers them again
    fake.calls.records.clear()
    with pytest.raises(CrewBudgetExceeded):
        crew.kickoff(inputs={"topic": "otters"})
    assert fake.calls.count == 0

    clear()
    budget = Budget(Limits(max_llm_calls=1))
    with budget_scope(budget), pytest.raises(CrewBudgetExceeded):
        three_task_crew(fake).kickoff(inputs={"topic": "otters"})
    assert fake.calls.count == 1 == budget.snapshot().llm_calls
    ours = [hook for point in InterceptionPoint for hook in get_hooks(point) if "budgetary" in hook.__module__]
    assert len(ours) == len(set(ours)) == 8  # each registered again once

    clear()  # then the agents run ungoverned: their executors copy LLM-call hook lists without ours
    crew = three_task_crew(fake)
    crew.kickoff(inputs={"topic": "warm-up"})
    fake.calls.records.clear()
    budget = Budget(Limits(max_llm_calls=1))
    govern_crew(crew, budget)
    with pytest.raises(CrewBudgetExceeded):
        crew.kickoff(inputs={"topic": "otters"})
    assert fake.calls.count == 1 == budget.snapshot().llm_calls
