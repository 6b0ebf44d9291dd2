"""SPEC §4 (scopes, agents, parents) and §6 (reallocation)."""

from __future__ import annotations

import random
import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetary import Budget, BudgetExceeded, ConfigurationError, Deny, Limits, UnknownAgent, Usage, UsageError
from budgetary.core.reallocator import DonorView, plan_transfers

MODEL = "gpt-4o-mini"


def _spend(budget: Budget, agent, tokens: int, *, max_out: int | None = None) -> None:
    out = tokens // 2
    with budget.llm_call(agent, model=MODEL, prompt_tokens=tokens - out, max_output_tokens=max_out or out) as c:
        c.settle(Usage(input_tokens=tokens - out, output_tokens=out))


# -- contracts ---------------------------------------------------------------------------------


def test_contract_is_readable_back_with_a_default_reserve_of_ten_percent():
    budget = Budget(Limits(max_total_tokens=100_000))
    c = budget.agent("researcher", priority=3, max_tokens=40_000, min_reserve=4_000, confidence_threshold=0.85)
    assert (c.priority, c.max_tokens, c.min_reserve, c.confidence_threshold) == (3, 40_000, 4_000, 0.85)
    assert budget.agent("writer", max_tokens=1_005).min_reserve == 100  # rounded down
    usd = budget.agent("critic", max_cost_usd="0.50")
    assert usd.unit == "usd" and usd.min_reserve == Decimal("0.05")
    assert budget.contract("researcher") is c


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"priority": 0}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({"max_tokens": 10, "max_cost_usd": 1}, "not both"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 100, "min_reserve": 101}, "min_reserve"),
        ({"max_tokens": 100, "min_reserve": -1}, "min_reserve"),
        ({"min_reserve": 5}, "min_reserve needs an allocation"),
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
        ({"confidence_threshold": float("nan")}, "confidence_threshold"),
    ],
)
def test_invalid_contracts_are_refused_at_registration(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        Budget().agent("a", **kwargs)
    assert isinstance(ConfigurationError("x"), ValueError)


def test_unknown_agent_is_a_key_error_naming_the_agent():
    budget = Budget(Limits(max_total_tokens=100), name="run")
    with pytest.raises(UnknownAgent) as info:
        budget.check("ghost")
    assert isinstance(info.value, KeyError)
    assert "ghost" in str(info.value) and "run" in str(info.value)
    for call in (
        lambda: budget.reserve("ghost", model=MODEL, prompt_tokens=1),
        lambda: budget.begin_agent("ghost"),
        lambda: budget.check_tool("ghost", "t"),
        lambda: budget.set_confidence("ghost", 0.5),
        lambda: budget.reallocate("ghost", 5),
        lambda: budget.record("ghost", Usage(input_tokens=1), model=MODEL),
    ):
        with pytest.raises(UnknownAgent):
            call()


def test_agent_none_is_the_run_itself():
    budget = Budget(Limits(max_agents=2))
    _spend(budget, None, 10)
    assert budget.begin_agent().allowed  # an unnamed agent start counts against max_agents
    assert budget.snapshot().agents_started == 1
    assert budget.report() == {}
    assert budget.ledger.history(kind="llm")[0].agent is None


def test_ensure_agent_registers_new_names_without_touching_existing_contracts():
    budget = Budget()
    budget.agent("planner", priority=5, max_tokens=1_000)
    assert budget.ensure_agent("planner").priority == 5
    assert budget.ensure_agent("node-7").max_tokens is None
    assert budget.has_agent("node-7")


def test_report_in_each_contract_unit():
    budget = Budget(Limits(max_total_tokens=10_000_000))
    budget.agent("tok", max_tokens=1_000)
    budget.agent("usd", max_cost_usd="1")
    budget.agent("free")
    _spend(budget, "tok", 300)
    budget.record("usd", Usage(input_tokens=1_000_000, output_tokens=0), model=MODEL)  # $0.15
    _spend(budget, "free", 40)
    report = budget.report()
    assert report["tok"] == {"allocated": 1_000, "consumed": 300, "remaining": 700}
    assert report["usd"] == {"allocated": Decimal(1), "consumed": Decimal("0.15"), "remaining": Decimal("0.85")}
    assert report["free"] == {"allocated": None, "consumed": 40, "remaining": None}


def test_agent_allocation_refuses_calls_that_would_pass_it():
    budget = Budget(Limits(max_total_tokens=10_000))
    budget.agent("a", max_tokens=100)
    _spend(budget, "a", 80)
    with pytest.raises(BudgetExceeded) as info:
        _spend(budget, "a", 30)
    assert info.value.resource == "allocation" and info.value.agent == "a"
    _spend(budget, "a", 20)


# -- parents -----------------------------------------------------------------------------------


def test_charging_a_run_charges_every_ancestor_and_refusals_name_the_level():
    day = Budget(Limits(max_total_tokens=1_000), name="day")
    tenant = Budget(Limits(max_total_tokens=500), name="tenant-a", parent=day)
    run1 = Budget(Limits(max_total_tokens=400), name="run-1", parent=tenant)
    run2 = Budget(Limits(max_total_tokens=400), name="run-2", parent=tenant)
    _spend(run1, None, 300)
    assert tenant.snapshot().total_tokens == 300 and day.snapshot().total_tokens == 300
    with pytest.raises(BudgetExceeded) as info:
        _spend(run2, None, 300)  # run-2 has room; the tenant does not
    assert info.value.budget == "tenant-a" and info.value.resource == "total_tokens"
    assert run2.snapshot().total_tokens == 0
    snap = run1.snapshot()
    assert snap.parent is not None and snap.parent.budget == "tenant-a" and snap.parent.parent.budget == "day"
    # The parent's ledger shows its children's entries; a child's does not show its sibling's.
    assert {e.budget for e in tenant.ledger.history(kind="llm")} == {"run-1"}
    assert run2.ledger.history(kind="llm") == []


def test_a_child_must_share_its_parents_store():
    parent = Budget(name="p")
    with pytest.raises(ConfigurationError, match="parent's store"):
        Budget(name="c", parent=parent, store="memory://")
    assert Budget(name="c", parent=parent).store is parent.store


def test_a_child_given_its_parents_store_url_reuses_the_parents_store(tmp_path):
    url = f"sqlite:///{tmp_path}/budget%20db.sqlite"  # the store's own URL spells the file name "budget db"
    day = Budget(Limits(max_total_tokens=1_000), name="day", store=url)
    run = Budget(Limits(max_total_tokens=400), name="run-1", parent=day, store=url)
    assert run.store is day.store
    again = Budget(name="run-2", parent=day, store=day.store.url)
    assert again.store is day.store
    _spend(run, None, 300)
    assert day.snapshot().total_tokens == 300
    other = f"sqlite:///{tmp_path}/other.db"
    with pytest.raises(ConfigurationError, match=re.escape(f"must live in its parent's store ({day.store.url})")):
        Budget(name="run-3", parent=day, store=other)
    day.store.close()


def test_names_are_data_not_keys():
    store_owner = Budget(Limits(max_total_tokens=100), name='a"],["b')
    sibling = Budget(Limits(max_total_tokens=100), name="a", store=store_owner.store)
    other = Budget(Limits(max_total_tokens=100), name="b", parent=sibling)
    _spend(store_owner, None, 60)
    assert sibling.snapshot().total_tokens == 0 and other.snapshot().total_tokens == 0


# -- names: None is the run itself, every agent a non-empty string (§4) ------------------------


@pytest.mark.parametrize("name", [None, ""])
def test_an_agent_is_registered_only_under_a_non_empty_string(name):
    budget = Budget(Limits(max_total_tokens=1_000))
    with pytest.raises(ConfigurationError, match=re.escape("agent name must be a non-empty string, got")):
        budget.agent(name, max_tokens=100)
    with pytest.raises(ConfigurationError, match=re.escape("agent name must be a non-empty string, got 5")):
        budget.agent(5)  # type: ignore[arg-type]  # not "or None": registering None is refused too
    assert budget.report() == {}
    assert not budget.store.has_agent(budget._key, "")
    assert budget.contract(None).max_tokens is None  # the run itself got no allocation
    _spend(budget, None, 200)  # and still draws on the run's limits only


def _a_call(method: str):
    """``method`` of a `Budget` called with the agent under test, and whatever else it needs."""
    import asyncio

    calls = {
        "check": lambda b, a: b.check(a),
        "acheck": lambda b, a: asyncio.run(b.acheck(a)),
        "check_tool": lambda b, a: b.check_tool(a, "search"),
        "acheck_tool": lambda b, a: asyncio.run(b.acheck_tool(a, "search")),
        "begin_agent": lambda b, a: b.begin_agent(a),
        "abegin_agent": lambda b, a: asyncio.run(b.abegin_agent(a)),
        "reserve": lambda b, a: b.reserve(a, model=MODEL, prompt_tokens=1, max_output_tokens=1),
        "areserve": lambda b, a: asyncio.run(b.areserve(a, model=MODEL, prompt_tokens=1, max_output_tokens=1)),
        "llm_call": lambda b, a: b.llm_call(a, model=MODEL, prompt_tokens=1, max_output_tokens=1).__enter__(),
        "record": lambda b, a: b.record(a, Usage(input_tokens=1), model=MODEL),
        "set_confidence": lambda b, a: b.set_confidence(a, 0.5),
        "reallocate": lambda b, a: b.reallocate(a, 5),
        "skip": lambda b, a: b.skip(a),
        "govern": lambda b, a: b.govern(a, model=MODEL),
        "contract": lambda b, a: b.contract(a),
        "has_agent": lambda b, a: b.has_agent(a),
        "ensure_agent": lambda b, a: b.ensure_agent(a),
        "aensure_agent": lambda b, a: asyncio.run(b.aensure_agent(a)),
    }
    return calls[method]


_AGENT_METHODS = [
    "check", "acheck", "check_tool", "acheck_tool", "begin_agent", "abegin_agent", "reserve", "areserve",
    "llm_call", "record", "set_confidence", "reallocate", "skip", "govern", "contract", "has_agent",
    "ensure_agent", "aensure_agent",
]  # fmt: skip


@pytest.mark.parametrize("method", _AGENT_METHODS)
def test_every_entry_point_refuses_an_agent_name_no_agent_can_have(method):
    budget = Budget(Limits(max_total_tokens=1_000, max_agents=5, max_tool_calls=5))
    call = _a_call(method)
    with pytest.raises(UsageError, match=re.escape("agent must be a non-empty string, or None for the run itself")):
        call(budget, "")
    with pytest.raises(TypeError, match=re.escape("agent must be a string, or None for the run itself, got int 5")):
        call(budget, 5)
    with pytest.raises(UsageError, match=re.escape("got list ['writer']")):  # also a UsageError; not "unhashable"
        call(budget, ["writer"])
    assert budget.ledger.history() == [] and budget.report() == {}
    snap = budget.snapshot()
    assert (snap.total_tokens, snap.held_tokens, snap.tool_calls, snap.agents_started) == (0, 0, 0, 0)


@pytest.mark.parametrize("method", _AGENT_METHODS)
def test_every_entry_point_still_takes_none_for_the_run_and_a_str_subclass_for_an_agent(method):
    from enum import StrEnum

    class Role(StrEnum):
        WRITER = "writer"

    budget = Budget(Limits(max_total_tokens=1_000, max_agents=5, max_tool_calls=5))
    budget.agent(Role.WRITER, max_tokens=500)
    budget.agent("editor", max_tokens=500, min_reserve=0)
    call = _a_call(method)
    for agent in (None, Role.WRITER):
        if method == "reallocate" and agent is None:
            continue  # the run has no allocation to top up
        result = call(budget, agent)
        assert not isinstance(result, Deny), (method, agent, result)
    assert budget.report()["writer"]["allocated"] >= 500


def test_a_tool_name_must_be_a_string():
    import asyncio

    budget = Budget(Limits(max_tool_calls=5))
    budget.agent("writer")
    with pytest.raises(TypeError, match=re.escape("tool must be a string (the tool's name), got int 5")):
        budget.check_tool("writer", 5)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=re.escape("tool must be a string (the tool's name), got NoneType None")):
        asyncio.run(budget.acheck_tool(None, None))  # type: ignore[arg-type]
    assert budget.snapshot().tool_calls == 0 and budget.ledger.history() == []
    assert budget.check_tool("writer", "search").allowed
    assert budget.ledger.history(kind="tool")[0].location == "search"


# -- reallocation rules (§6) -------------------------------------------------------------------


def test_reallocation_drains_lowest_priority_first_then_most_remaining():
    budget = Budget(Limits(max_total_tokens=10_000))
    budget.agent("lead", priority=5, max_tokens=100)
    budget.agent("low-small", priority=1, max_tokens=200, min_reserve=0)
    budget.agent("low-big", priority=1, max_tokens=300, min_reserve=0)
    budget.agent("mid", priority=3, max_tokens=1_000, min_reserve=0)
    moved = budget.reallocate("lead", 400)
    assert moved == 400
    transfers = [(e.donor, e.amount) for e in budget.ledger.history(kind="transfer")]
    assert transfers == [("low-big", 300), ("low-small", 100)]
    report = budget.report()
    assert report["lead"]["allocated"] == 500 and report["mid"]["allocated"] == 1_000


def test_reallocation_never_flows_from_a_more_important_agent():
    budget = Budget()
    budget.agent("vip", priority=9, max_tokens=1_000)
    budget.agent("intern", priority=1, max_tokens=10)
    assert budget.reallocate("intern", 5) == 0
    assert budget.report()["vip"]["allocated"] == 1_000


def test_donors_keep_their_min_reserve_and_partial_recovery_is_reported():
    budget = Budget()
    budget.agent("needy", priority=2, max_tokens=10)
    budget.agent("donor", priority=1, max_tokens=100, min_reserve=70)
    assert budget.reallocate("needy", 50) == 30
    assert budget.report()["donor"]["allocated"] == 70


def test_equal_priority_agents_can_donate_but_never_to_themselves():
    budget = Budget()
    budget.agent("a", priority=2, max_tokens=100, min_reserve=0)
    budget.agent("b", priority=2, max_tokens=100, min_reserve=0)
    assert budget.reallocate("a", 40) == 40
    assert [(e.agent, e.donor) for e in budget.ledger.history(kind="transfer")] == [("a", "b")]


def test_units_do_not_mix():
    budget = Budget()
    budget.agent("tokens", priority=5, max_tokens=10)
    budget.agent("dollars", priority=1, max_cost_usd=5)
    assert budget.reallocate("tokens", 5) == 0


def test_usd_reallocation_moves_dollars():
    budget = Budget()
    budget.agent("lead", priority=5, max_cost_usd="0.10")
    budget.agent("helper", priority=1, max_cost_usd="1.00", min_reserve=0)
    assert budget.reallocate("lead", "0.25") == Decimal("0.25")
    assert budget.report()["helper"]["allocated"] == Decimal("0.75")


def test_a_call_covered_by_reallocation_goes_through_and_is_recorded():
    budget = Budget(Limits(max_total_tokens=10_000))
    budget.agent("lead", priority=5, max_tokens=100)
    budget.agent("idle", priority=1, max_tokens=1_000)
    _spend(budget, "lead", 300)  # needs 200 more than its allocation: pulled from "idle"
    report = budget.report()
    assert report["lead"] == {"allocated": 300, "consumed": 300, "remaining": 0}
    assert report["idle"]["allocated"] == 800
    (transfer,) = budget.ledger.history(kind="transfer")
    assert (transfer.agent, transfer.donor, transfer.amount) == ("lead", "idle", 200)


def test_a_denied_call_moves_nothing():
    budget = Budget(Limits(max_total_tokens=10_000))
    budget.agent("lead", priority=5, max_tokens=100)
    budget.agent("idle", priority=1, max_tokens=200, min_reserve=50)
    before = budget.report()
    with pytest.raises(BudgetExceeded) as info:
        _spend(budget, "lead", 400)  # needs 300, only 150 could move
    assert info.value.resource == "allocation"
    assert budget.report() == before
    assert budget.ledger.history(kind="transfer") == []


def test_check_counts_what_reallocation_could_bring_and_changes_nothing():
    budget = Budget()
    budget.agent("lead", priority=5, max_tokens=10)
    budget.agent("idle", priority=1, max_tokens=100)
    _spend(budget, "lead", 10)
    before = budget.report()
    assert budget.check("lead").allowed
    assert budget.report() == before and budget.ledger.history(kind="transfer") == []
    budget.agent("idle", priority=1, max_tokens=100, min_reserve=100)
    assert not budget.check("lead").allowed


def test_overrun_after_the_fact_is_recorded_and_covered_all_or_nothing():
    budget = Budget(Limits(max_total_tokens=100_000))
    budget.agent("lead", priority=5, max_tokens=100)
    budget.agent("idle", priority=1, max_tokens=100, min_reserve=10)
    r = budget.reserve("lead", model=MODEL, prompt_tokens=50, max_output_tokens=50)
    entry = r.settle(Usage(input_tokens=50, output_tokens=120))  # the provider ignored max_tokens
    assert entry.usage is not None and entry.usage.total_tokens == 170
    assert budget.report()["lead"] == {"allocated": 170, "consumed": 170, "remaining": 0}
    r = budget.reserve("lead", model=MODEL, prompt_tokens=0, max_output_tokens=0)
    r.settle(Usage(input_tokens=0, output_tokens=100))  # 100 over; only 20 spare left: nothing moves
    report = budget.report()
    assert report["lead"] == {"allocated": 170, "consumed": 270, "remaining": -100}
    assert report["idle"]["allocated"] == 30
    with pytest.raises(BudgetExceeded, match="allocation"):
        _spend(budget, "lead", 2)


def test_planner_takes_only_what_is_missing():
    plan = plan_transfers([DonorView("a", 1, 100, 0), DonorView("b", 1, 50, 0)], needy="x", priority=2, shortfall=120)
    assert plan == [("a", 100), ("b", 20)]
    assert plan_transfers([DonorView("a", 1, 100, 0)], needy="x", priority=2, shortfall=0) == []


# -- properties --------------------------------------------------------------------------------


agents_strategy = st.lists(
    st.tuples(st.integers(1, 4), st.integers(0, 500), st.integers(0, 100)), min_size=2, max_size=6
)
operations = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 400), st.booleans()), max_size=25)


@settings(max_examples=60, deadline=None)
@given(agents=agents_strategy, ops=operations)
def test_allocations_are_conserved_and_consumption_only_grows(agents, ops):
    budget = Budget(Limits(max_total_tokens=10**9))
    names = []
    for i, (priority, allocation, reserve_pct) in enumerate(agents):
        name = f"agent-{i}"
        budget.agent(name, priority=priority, max_tokens=allocation, min_reserve=allocation * reserve_pct // 100)
        names.append(name)
    total_allocated = sum(a for _, a, _ in agents)
    consumed = {n: 0 for n in names}
    for index, amount, via_realloc in ops:
        name = names[index % len(names)]
        if via_realloc:
            budget.reallocate(name, amount)
        else:
            try:
                _spend(budget, name, amount)
            except BudgetExceeded:
                pass
        report = budget.report()
        assert sum(r["allocated"] for r in report.values()) == total_allocated
        for n in names:
            assert report[n]["consumed"] >= consumed[n]
            consumed[n] = report[n]["consumed"]
    moved_in = sum(e.amount for e in budget.ledger.history(kind="transfer"))
    assert moved_in >= 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_priority_is_respected_by_every_transfer(seed):
    rng = random.Random(seed)
    budget = Budget()
    priorities = {f"a{i}": rng.randint(1, 4) for i in range(5)}
    for name, priority in priorities.items():
        budget.agent(name, priority=priority, max_tokens=rng.randint(0, 300))
    for _ in range(10):
        budget.reallocate(rng.choice(list(priorities)), rng.randint(1, 200))
    for entry in budget.ledger.history(kind="transfer"):
        assert priorities[entry.donor] <= priorities[entry.agent]
        assert entry.donor != entry.agent


def test_ensure_agent_registers_new_names_once_and_never_the_run_itself() -> None:
    import asyncio

    budget = Budget(Limits(max_total_tokens=1_000))
    registered: list[str | None] = []
    store_ensure = budget._store.ensure_agent

    def spy(key: str, contract: Any, **kwargs: Any) -> Any:
        registered.append(contract.name)
        return store_ensure(key, contract, **kwargs)

    budget._store.ensure_agent = spy  # type: ignore[method-assign]
    assert budget.ensure_agent(None).name is None  # the budget itself: nothing to register
    assert asyncio.run(budget.aensure_agent(None)).name is None
    budget.ensure_agent("writer")
    asyncio.run(budget.aensure_agent("writer"))
    asyncio.run(budget.aensure_agent("critic"))
    assert registered == ["writer", "critic"]
    assert set(budget.report()) == {"writer", "critic"}
