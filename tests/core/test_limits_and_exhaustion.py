"""SPEC §2 (limits, exhaustion) and §3 (modes, reservations, leases) through the public Budget API."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pickle
import re
import threading
import time
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetary import (
    Budget,
    BudgetExceeded,
    ConfigurationError,
    Limits,
    SoftLimit,
    Usage,
    UsageError,
)

# -- Limits ---------------------------------------------------------------------------------


def test_limits_default_is_unbounded_and_none_means_no_limit():
    limits = Limits()
    assert limits.unbounded
    assert limits.max_total_tokens is None and limits.max_cost_usd is None
    assert not Limits(max_llm_calls=0).unbounded


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_total_tokens": -1}, "max_total_tokens"),
        ({"max_llm_calls": 1.5}, "max_llm_calls"),
        ({"max_agents": True}, "max_agents"),
        ({"max_cost_usd": "abc"}, "max_cost_usd"),
        ({"max_cost_usd": float("nan")}, "max_cost_usd"),
        ({"max_cost_usd": -2}, "max_cost_usd"),
    ],
)
def test_limits_reject_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ConfigurationError, match=field):
        Limits(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_llm_calls": 1.5}, "max_llm_calls must be a whole number of calls, got 1.5"),
        ({"max_tool_calls": "x"}, "max_tool_calls must be an integer count of calls, got 'x'"),
        ({"max_agents": True}, "max_agents must be an integer count of agents, got True"),
        ({"max_total_tokens": 2.5}, "max_total_tokens must be a whole number of tokens, got 2.5"),
    ],
)
def test_count_limit_errors_name_what_the_limit_counts(kwargs, message):
    with pytest.raises(ConfigurationError) as raised:
        Limits(**kwargs)
    assert str(raised.value) == message


def test_top_up_errors_name_what_the_resource_counts():
    budget = Budget(Limits(max_llm_calls=2, max_total_tokens=10))
    with pytest.raises(UsageError, match=r"^llm_calls must be an integer count of calls, got 'x'$"):
        budget.top_up(llm_calls="x")
    with pytest.raises(UsageError, match=r"^total_tokens must be an integer token count, got 'x'$"):
        budget.top_up(total_tokens="x")


@pytest.mark.parametrize("warn_at", [(0.0,), (1.0,), (1.5,), ("x",)])
def test_warn_at_must_be_fractions(warn_at):
    with pytest.raises(ConfigurationError, match="warn_at"):
        Limits(warn_at=warn_at)


def test_cost_limit_is_exact_decimal():
    assert Limits(max_cost_usd=0.1).max_cost_usd == Decimal("0.1")
    assert Limits(max_cost_usd="2.50").max_cost_usd == Decimal("2.50")


@pytest.mark.parametrize("window", ["1x", "", "0d", "d1", 5])
def test_bad_window_is_refused(window):
    with pytest.raises(ConfigurationError, match="window"):
        Limits(window=window)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guards": 5}, "guards must be an iterable of guards, got 5"),
        ({"guards": [object()]}, "guards[0] has none of check_before_llm, record_after_llm, check_before_tool"),
        ({"on_soft_limit": "log"}, "on_soft_limit must be callable, got 'log'"),
        ({"charge_failed_calls": "no"}, "charge_failed_calls must be True or False, got 'no'"),
        ({"allow_unpriced": 1}, "allow_unpriced must be True, False or None (inherit), got 1"),
        ({"clock": 12.0}, "clock must be callable, got 12.0"),
        ({"run_id": 7}, "run_id must be a string, got 7"),
    ],
)
def test_budget_arguments_are_checked_naming_the_argument_and_value(kwargs, message):
    # A truthy "no" would have charged every failed call; a float clock would have failed at the first call.
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Budget(**kwargs)


# -- exhaustion rules (§2) -------------------------------------------------------------------


def _call(budget: Budget, agent=None, *, inp=10, out=5, max_out=5, model="gpt-4o-mini"):
    with budget.llm_call(agent, model=model, prompt_tokens=inp, max_output_tokens=max_out) as call:
        call.settle(Usage(input_tokens=inp, output_tokens=out))


def test_max_llm_calls_allows_exactly_n_calls():
    budget = Budget(Limits(max_llm_calls=3))
    for _ in range(3):
        _call(budget)
    with pytest.raises(BudgetExceeded) as info:
        _call(budget)
    assert info.value.resource == "llm_calls"
    assert budget.snapshot().llm_calls == 3


def test_input_spend_never_trips_the_output_cap():
    budget = Budget(Limits(max_output_tokens=100))
    for _ in range(20):
        _call(budget, inp=1_000, out=1, max_out=1)
    snap = budget.snapshot()
    assert snap.input_tokens == 20_000
    assert snap.output_tokens == 20
    assert not snap.exhausted


def test_output_cap_refuses_a_call_whose_max_tokens_would_pass_it():
    budget = Budget(Limits(max_output_tokens=100))
    _call(budget, out=60, max_out=60)
    with pytest.raises(BudgetExceeded) as info:
        _call(budget, max_out=50)
    assert info.value.resource == "output_tokens"
    assert info.value.limit == 100
    assert info.value.spent == 60
    assert info.value.requested == 50
    _call(budget, out=40, max_out=40)  # exactly up to the cap is fine
    assert budget.snapshot().exhausted


def test_exhausted_when_spent_reaches_the_limit():
    budget = Budget(Limits(max_total_tokens=100))
    _call(budget, inp=50, out=50, max_out=50)
    snap = budget.snapshot()
    assert snap.exhausted and snap.exhausted_resources == ("total_tokens",)
    assert not budget.check().allowed
    assert budget.check().resource == "total_tokens"


def test_count_limits_do_not_make_the_budget_exhausted():
    budget = Budget(Limits(max_llm_calls=1, max_tool_calls=0))
    _call(budget)
    assert not budget.snapshot().exhausted
    assert not budget.check().allowed


def test_spend_exhaustion_stops_llm_calls_and_agent_starts_but_not_tools():
    budget = Budget(Limits(max_total_tokens=10, max_tool_calls=5))
    _call(budget, inp=8, out=2, max_out=2)
    assert budget.begin_agent().resource == "total_tokens"
    assert budget.check_tool(None, "search").allowed


def test_spend_limit_is_reported_before_the_agent_cap():
    budget = Budget(Limits(max_total_tokens=10, max_agents=1))
    assert budget.begin_agent().allowed
    _call(budget, inp=8, out=2, max_out=2)
    decision = budget.begin_agent()
    assert not decision.allowed
    assert decision.resource == "total_tokens"


def test_agent_cap_counts_only_agent_starts():
    budget = Budget(Limits(max_agents=2))
    assert budget.begin_agent().allowed
    assert budget.begin_agent().allowed
    denied = budget.begin_agent()
    assert denied.resource == "agents" and not denied.allowed
    _call(budget)  # LLM calls are not gated by the agent cap
    assert budget.snapshot().agents_started == 2


def test_agent_cap_is_exact_under_sixteen_threads():
    budget = Budget(Limits(max_agents=50))
    grants = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker():
        barrier.wait()
        for _ in range(10):
            ok = budget.begin_agent().allowed
            with lock:
                grants.append(ok)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(grants) == 50
    assert len(grants) == 160
    assert budget.snapshot().agents_started == 50
    assert len(budget.ledger.history(kind="agent_start")) == 50


def test_zero_budget_gives_a_clean_reported_refusal():
    budget = Budget(Limits(max_total_tokens=0), name="zero")
    with pytest.raises(BudgetExceeded) as info:
        _call(budget)
    assert info.value.budget == "zero"
    assert info.value.snapshot is not None and info.value.snapshot.total_tokens == 0
    assert [e.kind for e in budget.ledger.history()] == ["deny"]


def test_unbounded_budget_records_but_never_refuses():
    budget = Budget()
    for _ in range(100):
        _call(budget)
    snap = budget.snapshot()
    assert snap.llm_calls == 100 and snap.total_tokens == 1_500
    assert not snap.exhausted


# -- reserve mode (§3) -------------------------------------------------------------------------


def test_reserve_holds_prompt_plus_max_tokens_and_settle_replaces_the_hold():
    budget = Budget(Limits(max_total_tokens=1_000))
    reservation = budget.reserve(model="gpt-4o-mini", prompt_tokens=100, max_output_tokens=300)
    assert budget.snapshot().held_tokens == 400
    with pytest.raises(BudgetExceeded) as info:
        budget.reserve(model="gpt-4o-mini", prompt_tokens=300, max_output_tokens=301)
    assert info.value.resource == "total_tokens"
    reservation.settle(Usage(input_tokens=100, output_tokens=20))
    snap = budget.snapshot()
    assert snap.held_tokens == 0 and snap.total_tokens == 120


def test_default_output_reserve_is_used_when_the_call_sets_no_max_tokens():
    budget = Budget(Limits(max_total_tokens=10_000))
    budget.reserve(model="gpt-4o-mini", prompt_tokens=10)
    assert budget.snapshot().held_tokens == 10 + 1_024
    custom = Budget(Limits(max_total_tokens=10_000), default_output_reserve=200)
    custom.reserve(model="gpt-4o-mini", prompt_tokens=10)
    assert custom.snapshot().held_tokens == 210


def test_reserve_mode_never_passes_the_cap_under_200_concurrent_async_calls():
    budget = Budget(Limits(max_total_tokens=5_000))
    reached_provider = 0

    async def one_call():
        nonlocal reached_provider
        try:
            async with budget.llm_call(model="gpt-4o-mini", prompt_tokens=40, max_output_tokens=60) as call:
                reached_provider += 1
                await asyncio.sleep(0.001)
                call.settle(Usage(input_tokens=40, output_tokens=60))  # the provider honours max_tokens
        except BudgetExceeded:
            pass

    async def main():
        await asyncio.gather(*(one_call() for _ in range(200)))

    asyncio.run(main())
    snap = budget.snapshot()
    assert snap.total_tokens <= 5_000
    assert reached_provider == 50 == snap.llm_calls
    assert snap.held_tokens == 0


def test_gate_mode_overshoot_is_bounded_by_calls_in_flight():
    budget = Budget(Limits(max_total_tokens=100), mode="gate")
    in_flight = [budget.reserve(model="gpt-4o-mini", prompt_tokens=1, max_output_tokens=1) for _ in range(3)]
    for r in in_flight:
        r.settle(Usage(input_tokens=40, output_tokens=10), model="gpt-4o-mini")
    snap = budget.snapshot()
    assert snap.total_tokens == 150  # three calls were already running when the limit was crossed
    with pytest.raises(BudgetExceeded):
        budget.reserve(model="gpt-4o-mini", prompt_tokens=1)


def test_gate_mode_still_counts_calls_exactly():
    budget = Budget(Limits(max_llm_calls=2), mode="gate")
    budget.reserve(model="gpt-4o-mini")
    budget.reserve(model="gpt-4o-mini")
    with pytest.raises(BudgetExceeded, match="llm_calls"):
        budget.reserve(model="gpt-4o-mini")


def test_a_block_that_ends_without_settle_is_charged_its_hold_as_estimated():
    budget = Budget(Limits(max_total_tokens=1_000))
    with budget.llm_call(model="gpt-4o-mini", prompt_tokens=30, max_output_tokens=70):
        pass
    (entry,) = budget.ledger.history(kind="llm")
    assert entry.estimated
    assert entry.usage is not None and entry.usage.total_tokens == 100
    assert budget.snapshot().total_tokens == 100


def test_a_block_that_ends_by_an_exception_releases_its_hold():
    budget = Budget(Limits(max_total_tokens=1_000))
    with pytest.raises(ZeroDivisionError), budget.llm_call(model="gpt-4o-mini", prompt_tokens=30, max_output_tokens=70):
        1 / 0  # noqa: B018
    snap = budget.snapshot()
    assert snap.total_tokens == 0 and snap.held_tokens == 0 and snap.llm_calls == 0
    assert [e.kind for e in budget.ledger.history()] == ["release"]


def test_charge_failed_calls_charges_the_hold_instead():
    budget = Budget(Limits(max_total_tokens=1_000), charge_failed_calls=True)
    with pytest.raises(RuntimeError), budget.llm_call(model="gpt-4o-mini", prompt_tokens=30, max_output_tokens=70):
        raise RuntimeError("provider 500")
    assert budget.snapshot().total_tokens == 100
    assert budget.ledger.history(kind="llm")[0].estimated


def test_a_release_of_a_call_that_did_not_fail_gives_the_hold_back_even_with_charge_failed_calls():
    budget = Budget(Limits(max_total_tokens=1_000), charge_failed_calls=True)
    budget.reserve(model="gpt-4o-mini", prompt_tokens=30, max_output_tokens=70).release("cache hit", failed=False)
    asyncio.run(budget.reserve(model="gpt-4o-mini", prompt_tokens=30, max_output_tokens=70).arelease("x", failed=False))
    assert (budget.snapshot().total_tokens, budget.snapshot().held_tokens, budget.snapshot().llm_calls) == (0, 0, 0)


def test_live_calls_keep_their_holds_past_the_lease_and_an_abandoned_one_loses_it():
    # Real time: the keeper thread renews at a third of the TTL; an abandoned hold is not renewed.
    from budgetary.core._lease import keeper

    budget = Budget(Limits(max_total_tokens=10_000), lease_ttl=1.0)
    abandoned = budget.reserve(model="gpt-4o-mini", prompt_tokens=100, max_output_tokens=100)
    kept = budget.reserve(model="gpt-4o-mini", prompt_tokens=10, max_output_tokens=10).keep_alive()
    with budget.llm_call(model="gpt-4o-mini", prompt_tokens=1, max_output_tokens=1) as block:
        time.sleep(2.5)  # two and a half leases
        assert budget.snapshot().held_tokens == 20 + 2
        block.settle(Usage(input_tokens=1, output_tokens=1))
    assert [e.reason for e in budget.ledger.history(kind="release")] == ["lease expired"]
    assert not abandoned.renew()
    kept.settle(Usage(input_tokens=10, output_tokens=5))
    assert kept.hold_id not in keeper.live and block.hold_id not in keeper.live
    assert budget.snapshot().held_tokens == 0 and budget.snapshot().total_tokens == 17


def test_an_expired_lease_is_released_and_a_renewed_one_is_kept(clock):
    budget = Budget(Limits(max_total_tokens=1_000), lease_ttl=60, clock=clock)
    dead = budget.reserve(model="gpt-4o-mini", prompt_tokens=100, max_output_tokens=100)
    live = budget.reserve(model="gpt-4o-mini", prompt_tokens=100, max_output_tokens=100)
    clock.advance(40)
    assert live.renew()
    clock.advance(30)  # dead's lease ran out at 60 s; live's now runs to 100 s
    snap = budget.snapshot()
    assert snap.held_tokens == 200
    reasons = [e.reason for e in budget.ledger.history(kind="release")]
    assert reasons == ["lease expired"]
    assert not dead.renew()
    # A late settle of the dead call still records what the provider billed.
    dead.settle(Usage(input_tokens=100, output_tokens=5))
    assert budget.snapshot().total_tokens == 105


def test_settling_twice_is_an_error():
    budget = Budget()
    r = budget.reserve(model="gpt-4o-mini", prompt_tokens=1, max_output_tokens=1)
    r.settle(Usage(input_tokens=1, output_tokens=1))
    with pytest.raises(ValueError, match="already closed"):
        r.settle(Usage(input_tokens=1, output_tokens=1))


def test_lenient_settle_charges_the_estimate_for_garbage_usage():
    budget = Budget()
    r = budget.reserve(model="gpt-4o-mini", prompt_tokens=12, max_output_tokens=8)
    entry = r.settle({"prompt_tokens": float("nan"), "completion_tokens": 3}, lenient=True)
    assert entry.estimated and entry.usage is not None and entry.usage.total_tokens == 20


def test_strict_settle_rejects_garbage_naming_the_field():
    budget = Budget()
    r = budget.reserve(model="gpt-4o-mini", prompt_tokens=12, max_output_tokens=8)
    with pytest.raises(ValueError, match="prompt_tokens"):
        r.settle({"prompt_tokens": -5, "completion_tokens": 3})


def test_huge_reported_usage_saturates_and_exhausts():
    budget = Budget(Limits(max_total_tokens=1_000))
    budget.record(None, Usage(input_tokens=2**70, output_tokens=2**70), model="gpt-4o-mini")
    snap = budget.snapshot()
    assert snap.total_tokens == 2**63 - 1
    assert snap.exhausted


# -- top-up ------------------------------------------------------------------------------------


def test_top_up_raises_limits_by_the_given_amounts():
    budget = Budget(Limits(max_total_tokens=100, max_cost_usd=1, max_llm_calls=1))
    budget.top_up(total_tokens=10_000, cost_usd="0.5", llm_calls=5)
    limits = budget.snapshot().limits
    assert limits.max_total_tokens == 10_100
    assert limits.max_cost_usd == Decimal("1.5")
    assert limits.max_llm_calls == 6
    assert limits.max_input_tokens is None  # an unlimited dimension stays unlimited


def test_top_up_of_a_resource_the_budget_does_not_limit_says_it_changed_nothing(caplog):
    tenant = Budget(Limits(max_total_tokens=1_000), name="tenant")
    run = Budget(Limits(max_llm_calls=2), name="run", parent=tenant)  # the token cap is the tenant's
    with caplog.at_level("WARNING", logger="budgetary"):
        assert run.top_up(total_tokens=500, llm_calls=1)
        assert run.top_up(llm_calls=1)
    assert [r.getMessage() for r in caplog.records] == [
        "budget 'run' has no limit on total_tokens: top_up(total_tokens=...) changed nothing there "
        "(top up the budget that sets it)"
    ]
    assert run.snapshot().limits.max_total_tokens is None and run.snapshot().limits.max_llm_calls == 4
    assert tenant.snapshot().limits.max_total_tokens == 1_000


def test_top_up_rejects_unknown_resources():
    with pytest.raises(ConfigurationError, match=re.escape("cannot top up 'tokens'")):
        Budget().top_up(tokens=5)


# -- soft limits (§7) --------------------------------------------------------------------------


def test_soft_limit_decisions_and_one_event_per_threshold_crossing():
    events: list[SoftLimit] = []
    budget = Budget(Limits(max_total_tokens=1_000, warn_at=(0.5, 0.8)), on_soft_limit=events.append)
    budget.record(None, Usage(input_tokens=400, output_tokens=0), model="gpt-4o-mini")
    assert budget.check().allowed and not isinstance(budget.check(), SoftLimit)
    budget.record(None, Usage(input_tokens=150, output_tokens=0), model="gpt-4o-mini")  # 55 %
    decision = budget.check()
    assert isinstance(decision, SoftLimit) and decision.allowed
    assert decision.resource == "total_tokens" and decision.consumed == 550 and decision.limit == 1_000
    budget.record(None, Usage(input_tokens=10, output_tokens=0), model="gpt-4o-mini")  # still between 50 and 80 %
    budget.record(None, Usage(input_tokens=300, output_tokens=0), model="gpt-4o-mini")  # 86 %
    assert [(e.resource, e.threshold) for e in events] == [("total_tokens", 0.5), ("total_tokens", 0.8)]
    assert len(budget.ledger.history(kind="soft_limit")) == 2
    budget.record(None, Usage(input_tokens=200, output_tokens=0), model="gpt-4o-mini")  # past the limit: no longer soft
    assert not budget.check().allowed


def test_soft_limit_fires_again_after_a_top_up_and_a_new_crossing():
    events = []
    budget = Budget(Limits(max_llm_calls=10), on_soft_limit=events.append)
    for _ in range(8):
        _call(budget)
    assert len(events) == 1
    budget.top_up(llm_calls=90)
    for _ in range(72):
        _call(budget)
    assert len(events) == 2 and events[-1].limit == 100


# -- errors ------------------------------------------------------------------------------------


def test_budget_exceeded_carries_the_figures_and_pickles():
    budget = Budget(Limits(max_llm_calls=0), name="run")
    budget.agent("writer")
    with pytest.raises(BudgetExceeded) as info:
        _call(budget, "writer")
    exc = info.value
    assert isinstance(exc, RuntimeError)
    assert (exc.budget, exc.agent, exc.resource, exc.limit, exc.spent, exc.requested) == (
        "run", "writer", "llm_calls", 0, 0, 1,
    )  # fmt: skip
    assert "llm_calls" in str(exc) and "writer" in str(exc)
    clone = pickle.loads(pickle.dumps(exc))
    assert (clone.resource, clone.limit, clone.agent, str(clone)) == (exc.resource, exc.limit, exc.agent, str(exc))
    assert clone.snapshot == exc.snapshot


def test_constructor_validates_its_arguments():
    with pytest.raises(ConfigurationError, match="mode"):
        Budget(mode="soft")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="on_exhausted"):
        Budget(on_exhausted="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="lease_ttl"):
        Budget(lease_ttl=0)
    with pytest.raises(ConfigurationError, match="limits"):
        Budget({"max_total_tokens": 5})  # type: ignore[arg-type]


def test_a_live_llm_call_block_keeps_its_lease_while_a_forgotten_hold_expires():
    import time

    from budgetary.core.prices import PriceTable

    PriceTable().rates("gpt-4o-mini")  # load the price table first: its first load can hold the GIL for ~0.5 s
    budget = Budget(Limits(max_total_tokens=10_000), lease_ttl=0.3)
    forgotten = budget.reserve(model="gpt-4o-mini", prompt_tokens=100, max_output_tokens=100)
    with budget.llm_call(model="gpt-4o-mini", prompt_tokens=10, max_output_tokens=10) as live:
        time.sleep(1.0)  # a long call: three lease lifetimes
        snap = budget.snapshot()  # expires what is due
        assert snap.held_tokens == 20  # the live call still holds its budget; the forgotten hold is gone
        live.settle(Usage(input_tokens=10, output_tokens=10))
    assert not forgotten.renew()
    assert [e.reason for e in budget.ledger.history(kind="release")] == ["lease expired"]


# -- the engine's quick pass -----------------------------------------------------------------

_maybe = st.one_of(st.none(), st.integers(0, 300))


@settings(max_examples=300, deadline=None)
@given(
    tokens=_maybe,
    calls=st.one_of(st.none(), st.integers(0, 4)),
    tools=st.one_of(st.none(), st.integers(0, 3)),
    warn_at=st.sampled_from([(), (0.5,), (0.8, 0.9)]),
    spent=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 80)), max_size=4),
    held=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 80)), max_size=3),
    tool_calls=st.integers(0, 4),
    request=st.tuples(st.integers(0, 120), st.integers(0, 120)),
)
def test_the_quick_pass_decides_as_the_full_rules(tokens, calls, tools, warn_at, spent, held, tool_calls, request):
    # Every call's decision first takes a quick pass that allows a call far from every limit; a call
    # whose agent has a confidence threshold skips it. With a threshold no confidence reached, both
    # must decide alike, at any distance from the limits (exactly at them too).
    budget = Budget(Limits(max_total_tokens=tokens, max_llm_calls=calls, max_tool_calls=tools, warn_at=warn_at))
    for inp, out in spent:
        budget.record(None, Usage(input_tokens=inp, output_tokens=out), model="gpt-4o-mini")
    for inp, out in held:
        with contextlib.suppress(BudgetExceeded):
            budget.reserve(model="gpt-4o-mini", prompt_tokens=inp, max_output_tokens=out)
    for _ in range(tool_calls):
        budget.check_tool()
    engine = budget.store._engine
    levels = engine.levels_of(budget._chain, budget._clock())
    state = engine._agent(levels[0], None)
    prompt, out = request
    req = [prompt, out, prompt + out, 0, 1, 0, 0, 0]
    quick = engine._evaluate(levels, None, state, req, False)
    full = engine._evaluate(levels, None, dataclasses.replace(state, threshold=1.0), req, False)
    assert quick == full
