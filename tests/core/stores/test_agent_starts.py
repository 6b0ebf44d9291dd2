"""An agent start spends nothing, so it moves nothing: the same in every store (SPEC §6)."""

from __future__ import annotations

from budgetary import Budget, Limits, SoftLimit, Usage

from .conftest import Opener


def test_starting_an_agent_that_reallocation_could_cover_moves_no_budget(open_store: Opener) -> None:
    budget = Budget(store=open_store(), name="run")
    budget.agent("lead", priority=5, max_tokens=10)
    budget.agent("idle", priority=1, max_tokens=100)
    budget.record("lead", Usage(input_tokens=6, output_tokens=4), model="gpt-4o-mini")  # its allocation is used up
    assert budget.begin_agent("lead").allowed  # a donor could cover its next call...
    assert budget.ledger.history(kind="transfer") == []  # ...but the start itself takes nothing
    assert budget.report()["lead"]["allocated"] == 10 and budget.report()["idle"]["allocated"] == 100
    budget.agent("idle", priority=1, max_tokens=100, min_reserve=100)  # now nothing could cover it
    assert not budget.begin_agent("lead").allowed


def test_count_limits_fire_their_soft_limit_once_when_crossed(open_store: Opener) -> None:
    events: list[SoftLimit] = []
    budget = Budget(Limits(max_tool_calls=5, max_agents=5), store=open_store(), name="run", on_soft_limit=events.append)
    tools = [budget.check_tool(None, "search") for _ in range(6)]
    # Judged before each call is counted, like an LLM call: the last one allowed is in the warning band.
    assert [type(d).__name__ for d in tools] == ["Allow", "Allow", "Allow", "Allow", "SoftLimit", "Deny"]
    assert [(e.resource, e.consumed, e.limit) for e in events] == [("tool_calls", 4, 5)]  # at the 4th, once
    starts = [budget.begin_agent(None) for _ in range(6)]
    assert [type(d).__name__ for d in starts] == ["Allow", "Allow", "Allow", "Allow", "SoftLimit", "Deny"]
    assert [(e.resource, e.consumed) for e in events[1:]] == [("agents", 4)]
    assert [e.resource for e in budget.ledger.history(kind="soft_limit")] == ["tool_calls", "agents"]
