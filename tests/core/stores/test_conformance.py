"""SPEC §11: every store passes one conformance suite, driven through the public `Budget` API.

Each test runs against memory, SQLite and Redis (see `open_store` in conftest).
The scenario tests also replay the same script on a fresh `MemoryStore` and
require identical decisions, snapshots, reports and ledgers.
"""

from __future__ import annotations

import enum
import re
import threading
from decimal import Decimal
from typing import Any

import pytest

from budgetary import (
    Budget,
    BudgetExceeded,
    ConfigurationError,
    Deny,
    Limits,
    Price,
    SoftLimit,
    UnknownAgent,
    Usage,
    UsageError,
)
from budgetary.core.stores import MemoryStore, Store
from tests.conftest import FakeClock
from tests.core.stores.conftest import Opener

PRICES = {"m": Price(input_mtok="1", output_mtok="4")}
MODEL = "m"

# Most tests here settle usage without naming a model; prices are not what this suite is about.
pytestmark = pytest.mark.filterwarnings("ignore::budgetary.core.prices.UnpricedModelWarning")


def _usage(inp: int, out: int) -> dict[str, int]:
    return {"input_tokens": inp, "output_tokens": out}


def _ledger(budget: Budget) -> list[dict[str, Any]]:
    return [e.to_dict() for e in budget.ledger.history()]


# -- one long script, compared across stores ----------------------------------------------


def _family_script(store: Store, clock: FakeClock) -> dict[str, Any]:
    """Run under tenant under day, agents with contracts, every kind of operation; return what it observed."""
    events: list[SoftLimit] = []
    seen: dict[str, Any] = {"decisions": [], "snapshots": [], "errors": []}
    day = Budget(Limits(max_total_tokens=20_000, max_cost_usd="0.05", window="1d", warn_at=(0.5, 0.9)), name="day",
                 store=store, clock=clock, run_id="r", prices=PRICES)  # fmt: skip
    tenant = Budget(Limits(max_llm_calls=12, max_agents=3, max_tool_calls=2), name="tenant:{acme}", parent=day,
                    clock=clock, run_id="r")  # fmt: skip
    run = Budget(Limits(max_total_tokens=6_000, warn_at=(0.5,)), name='run "x"\n{y}', parent=tenant, clock=clock,
                 run_id="r", on_soft_limit=events.append)  # fmt: skip
    run.agent("lead", priority=3, max_tokens=2_000)
    run.agent("helper", priority=1, max_tokens=3_000, min_reserve=500)
    run.agent("critic", priority=2, max_tokens=600, confidence_threshold=0.8)
    run.agent("spare")
    decisions = seen["decisions"]
    decisions.append(run.begin_agent("lead"))
    decisions.append(run.check("lead"))
    # 1,000 + 1,500 held > lead's 2,000: 500 move from helper (lowest priority).
    with run.llm_call("lead", model=MODEL, prompt_tokens=1_000, max_output_tokens=1_500, location="plan") as call:
        seen["snapshots"].append(run.snapshot())
        call.settle(_usage(1_000, 1_300))
    decisions.append(run.check_tool("lead", "search"))
    decisions.append(run.check_tool("helper", "fetch"))
    decisions.append(run.check_tool("helper", "fetch"))  # tenant allows 2 tool calls
    clock.advance(1)
    reservation = run.reserve("critic", model=MODEL, prompt_tokens=100, max_output_tokens=100)
    reservation.release("tool failed")
    run.set_confidence("critic", 0.9)
    decisions.append(run.check("critic"))  # confident: denied
    try:
        run.reserve("critic", model=MODEL, prompt_tokens=10, max_output_tokens=10)
    except BudgetExceeded as exc:
        seen["errors"].append((exc.resource, exc.budget, str(exc)))
    # Overrun: helper reports more than it held; reallocation cannot come from higher priority agents.
    with run.llm_call("helper", model=MODEL, prompt_tokens=200, max_output_tokens=100) as call:
        call.settle(_usage(200, 2_900))
    seen["snapshots"].append(run.snapshot())
    seen["report_after_overrun"] = run.report()
    try:
        run.reserve("helper", model=MODEL, prompt_tokens=10, max_output_tokens=10)
    except BudgetExceeded as exc:
        seen["errors"].append((exc.resource, exc.budget, str(exc)))
    run.record("lead", _usage(50, 50), model=MODEL, location="after-the-fact")
    run.skip("critic", "optional review", location="review")
    moved = run.reallocate("lead", 10_000)
    seen["moved"] = moved
    decisions.append(run.begin_agent("helper"))
    decisions.append(run.begin_agent(None))
    decisions.append(run.begin_agent("spare"))
    decisions.append(run.begin_agent("spare"))  # the fourth start passes tenant's max_agents=3
    with run.llm_call(None, model=MODEL, prompt_tokens=100, max_output_tokens=100):
        pass  # forgot to settle: charged as an estimate
    try:
        run.reserve(None, model=MODEL, prompt_tokens=5_000, max_output_tokens=100)
    except BudgetExceeded as exc:
        seen["errors"].append((exc.resource, exc.budget, str(exc)))
    tenant.top_up(llm_calls=5)
    day.top_up(total_tokens=1_000, cost_usd="0.01")
    seen["snapshots"].append(run.snapshot())
    seen["report"] = run.report()
    seen["events"] = events
    seen["ledgers"] = [_ledger(b) for b in (run, tenant, day)]
    return seen


def test_family_script_matches_memory(open_store: Opener, clock: FakeClock) -> None:
    seen = _family_script(open_store(), clock)
    expected = _family_script(MemoryStore(), FakeClock())
    assert seen == expected
    # ...and the reference itself says what SPEC §4-§7 require.
    first = seen["snapshots"][0]
    assert (first.held_tokens, first.parent.held_tokens, first.parent.parent.held_tokens) == (2_500, 2_500, 2_500)
    assert seen["decisions"][4].resource == "tool_calls" and not seen["decisions"][4].allowed
    assert seen["decisions"][5].resource == "confidence"
    assert [e[0] for e in seen["errors"]] == ["confidence", "allocation", "total_tokens"]
    assert seen["report_after_overrun"]["helper"] == {"allocated": 2_500, "consumed": 3_100, "remaining": -600}
    assert seen["decisions"][-1].resource == "agents" and seen["decisions"][-1].budget == "tenant:{acme}"
    transfers = [e for e in seen["ledgers"][0] if e["kind"] == "transfer"]
    assert transfers[0]["donor"] == "helper" and transfers[0]["amount"] == "500"
    allocated = sum(r["allocated"] or 0 for r in seen["report"].values())
    assert allocated == 2_000 + 3_000 + 600  # reallocation conserves the total
    # Each fires when its threshold is crossed: the tool count at the second tool call, not at the next settle.
    assert [e.resource for e in seen["events"]] == ["allocation", "tool_calls", "total_tokens", "allocation", "agents"]
    final = seen["snapshots"][-1]
    assert final.parent.limits.max_llm_calls == 17 and final.parent.parent.limits.max_total_tokens == 21_000
    ledger_total = sum(e["usage"]["input_tokens"] + e["usage"]["output_tokens"] for e in seen["ledgers"][2]
                       if e["kind"] == "llm")  # fmt: skip
    assert ledger_total == final.parent.parent.total_tokens


# -- one behaviour per test ---------------------------------------------------------------


def test_reserve_holds_and_settle_replaces_the_hold(open_store: Opener) -> None:
    budget = Budget(Limits(max_total_tokens=1_000, max_llm_calls=5), name="b", store=open_store())
    r = budget.reserve(prompt_tokens=100, max_output_tokens=200)
    snap = budget.snapshot()
    assert (snap.held_tokens, snap.held_llm_calls, snap.total_tokens) == (300, 1, 0)
    r.settle(_usage(100, 150))
    snap = budget.snapshot()
    assert (snap.held_tokens, snap.held_llm_calls, snap.total_tokens, snap.llm_calls) == (0, 0, 250, 1)


def test_reserve_refuses_what_would_pass_a_limit(open_store: Opener) -> None:
    budget = Budget(Limits(max_total_tokens=1_000), name="b", store=open_store())
    held = budget.reserve(prompt_tokens=400, max_output_tokens=400)
    message = (
        "Would exceed the total_tokens limit of 1000 of budget 'b' (total_tokens=800 spent or held, 300 requested)"
    )
    with pytest.raises(BudgetExceeded, match=re.escape(message)):
        budget.reserve(prompt_tokens=100, max_output_tokens=200)
    held.release()
    budget.reserve(prompt_tokens=100, max_output_tokens=200)  # room again once released


def test_release_frees_the_hold_and_writes_a_release_entry(open_store: Opener) -> None:
    budget = Budget(Limits(max_total_tokens=1_000), name="b", store=open_store())
    budget.reserve(prompt_tokens=10, max_output_tokens=20).release("provider timeout")
    assert budget.snapshot().held_tokens == 0
    (entry,) = budget.ledger.history(kind="release")
    assert (entry.reason, entry.usage.total_tokens if entry.usage else None) == ("provider timeout", 30)


def test_record_charges_without_a_reservation(open_store: Opener) -> None:
    budget = Budget(Limits(max_cost_usd=1), name="b", store=open_store(), prices=PRICES)
    entry = budget.record(None, _usage(1_000_000, 0), model=MODEL)
    assert entry.cost_usd == Decimal(1)
    assert budget.snapshot().exhausted and budget.snapshot().cost_usd == Decimal(1)
    assert budget.ledger.history(kind="llm") == [entry]


def test_begin_agent_takes_exactly_max_agents_slots(open_store: Opener) -> None:
    budget = Budget(Limits(max_agents=2), name="b", store=open_store())
    decisions = [budget.begin_agent() for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert budget.snapshot().agents_started == 2
    assert len(budget.ledger.history(kind="agent_start")) == 2 and len(budget.ledger.history(kind="deny")) == 1


def test_denied_call_leaves_allocations_as_they_were(open_store: Opener) -> None:
    budget = Budget(Limits(), name="b", store=open_store())
    budget.agent("needy", priority=2, max_tokens=100)
    budget.agent("donor", priority=1, max_tokens=100, min_reserve=50)
    with pytest.raises(BudgetExceeded) as info:
        budget.reserve("needy", prompt_tokens=100, max_output_tokens=51)  # needs 51, donor can spare 50
    assert info.value.resource == "allocation"
    assert {k: v["allocated"] for k, v in budget.report().items()} == {"needy": 100, "donor": 100}
    budget.reserve("needy", prompt_tokens=100, max_output_tokens=50)
    assert {k: v["allocated"] for k, v in budget.report().items()} == {"needy": 150, "donor": 50}
    assert budget.reallocate("needy", 10) == 0  # the donor is at its reserve


def test_usd_allocations_transfer_exactly(open_store: Opener) -> None:
    budget = Budget(Limits(), name="b", store=open_store(), prices=PRICES)
    budget.agent("a", priority=2, max_cost_usd="0.001")
    budget.agent("b", priority=1, max_cost_usd="0.003", min_reserve="0.001")
    assert budget.reallocate("a", "0.0015") == Decimal("0.0015")
    assert budget.report()["a"]["allocated"] == Decimal("0.0025")
    (transfer,) = budget.ledger.history(kind="transfer")
    assert transfer.amount == Decimal("0.0015") and transfer.reason == "reallocated 0.0015 USD from 'b'"


def test_check_changes_nothing(open_store: Opener) -> None:
    budget = Budget(Limits(max_llm_calls=1), name="b", store=open_store())
    budget.agent("a", max_tokens=10)
    before = (budget.snapshot(), budget.report(), len(budget.ledger))
    assert budget.check("a").allowed
    assert (budget.snapshot(), budget.report(), len(budget.ledger)) == before


def test_unknown_agent_raises(open_store: Opener) -> None:
    budget = Budget(Limits(max_llm_calls=1), name="b", store=open_store())
    with pytest.raises(UnknownAgent):
        budget.reserve("ghost", prompt_tokens=1, max_output_tokens=1)
    assert budget.snapshot().held_llm_calls == 0


def test_soft_limit_fires_once_per_threshold(open_store: Opener) -> None:
    events: list[SoftLimit] = []
    budget = Budget(Limits(max_total_tokens=100, warn_at=(0.5, 0.8)), name="b", store=open_store(),
                    on_soft_limit=events.append)  # fmt: skip
    for _ in range(4):
        budget.record(None, _usage(10, 10))
    assert [(e.threshold, e.consumed) for e in events] == [(0.5, 60), (0.8, 80)]
    assert isinstance(budget.check(), SoftLimit)
    assert len(budget.ledger.history(kind="soft_limit")) == 2


def test_an_allocation_warning_fires_again_after_reallocation_raises_the_allocation(open_store: Opener) -> None:
    events: list[SoftLimit] = []
    budget = Budget(Limits(warn_at=(0.8,)), name="b", store=open_store(), on_soft_limit=events.append)
    budget.agent("lead", priority=2, max_tokens=100)
    budget.agent("idle", priority=1, max_tokens=1_000, min_reserve=0)
    budget.record("lead", _usage(40, 40))
    assert [(e.resource, e.consumed, e.limit) for e in events] == [("allocation", 80, 100)]
    assert budget.reallocate("lead", 100) == 100  # 80 of 200: back under the threshold
    budget.record("lead", _usage(40, 40))
    assert [(e.resource, e.consumed, e.limit) for e in events] == [("allocation", 80, 100), ("allocation", 160, 200)]
    budget.record("lead", _usage(5, 5))  # still over 80% of 200: no new event
    assert len(events) == 2


# 0.55 * 100 is 55.00000000000001 in floating point (and 0.55 * $0.1 in nano-dollars likewise),
# yet spending exactly 55% reaches the 55% threshold: every store must fire on it.
EXACT_THRESHOLD_CASES = [
    pytest.param(Limits(max_total_tokens=100, warn_at=(0.55,)), {}, 55, "total_tokens", id="tokens"),
    pytest.param(Limits(max_cost_usd="0.1", warn_at=(0.55,)), {}, 55_000, "cost_usd", id="usd"),
    pytest.param(Limits(warn_at=(0.55,)), {"max_tokens": 100}, 55, "allocation", id="token-allocation"),
    pytest.param(Limits(warn_at=(0.55,)), {"max_cost_usd": "0.1"}, 55_000, "allocation", id="usd-allocation"),
]


@pytest.mark.parametrize(("limits", "contract", "tokens", "resource"), EXACT_THRESHOLD_CASES)
@pytest.mark.parametrize("short", [1, 0], ids=["one-short", "exact"])
def test_a_soft_limit_fires_when_spend_reaches_its_threshold_exactly(
    open_store: Opener, limits: Limits, contract: dict[str, Any], tokens: int, resource: str, short: int
) -> None:
    events: list[SoftLimit] = []
    budget = Budget(limits, name="b", store=open_store(), prices=PRICES, on_soft_limit=events.append)
    agent = "a" if contract else None
    if contract:
        budget.agent(agent, **contract)
    budget.reserve(agent, model=MODEL, prompt_tokens=tokens, max_output_tokens=1).settle(_usage(tokens - short, 0))
    assert [(e.resource, e.threshold) for e in events] == ([] if short else [(resource, 0.55)])
    assert len(budget.ledger.history(kind="soft_limit")) == len(events)
    assert isinstance(budget.check(agent), SoftLimit) is (short == 0)


def test_a_warning_at_its_exact_threshold_stays_fired_when_the_limit_grows_to_that_threshold(
    open_store: Opener,
) -> None:
    events: list[SoftLimit] = []
    budget = Budget(Limits(max_total_tokens=99, warn_at=(0.55,)), name="b", store=open_store(),
                    on_soft_limit=events.append)  # fmt: skip
    budget.agent("lead", priority=2, max_tokens=99)
    budget.agent("idle", priority=1, max_tokens=1_000, min_reserve=0)
    budget.record("lead", _usage(55, 0))
    assert [(e.resource, e.consumed, e.limit) for e in events] == [("total_tokens", 55, 99), ("allocation", 55, 99)]
    budget.top_up(total_tokens=1)  # 55 of 100: still at the 55% threshold
    assert budget.reallocate("lead", 1) == 1  # 55 of 100 again
    budget.record("lead", _usage(1, 0))
    assert len(events) == 2 and len(budget.ledger.history(kind="soft_limit")) == 2


def test_snapshot_reports_limits_with_top_ups(open_store: Opener) -> None:
    budget = Budget(Limits(max_total_tokens=100, max_cost_usd="0.5"), name="b", store=open_store())
    budget.top_up(total_tokens=50, cost_usd="0.25")
    snap = budget.snapshot()
    assert (snap.limits.max_total_tokens, snap.limits.max_cost_usd) == (150, Decimal("0.75"))


def test_ledger_exports_and_filters(open_store: Opener) -> None:
    budget = Budget(Limits(max_tool_calls=1, warn_at=()), name="b", store=open_store(), run_id="r1")
    budget.agent("a")
    budget.check_tool("a", "search")
    budget.check_tool("a", "search")
    budget.record("a", _usage(3, 4), run_id="r2")
    assert [e.kind for e in budget.ledger.history(agent="a")] == ["tool", "deny", "llm"]
    assert [e.kind for e in budget.ledger.history(run_id="r2")] == ["llm"]
    assert budget.ledger.to_jsonl().count("\n") == 3


def test_ledger_costs_add_up_to_the_counters_when_a_provider_reports_sub_nano_digits(open_store: Opener) -> None:
    # SPEC §5: the entries' totals equal the counters; §10: stores count whole nano-dollars, rounded up.
    budget = Budget(Limits(max_cost_usd=10), name="b", store=open_store(), prices=PRICES)
    reported = [Decimal("0.00123456789123"), Decimal("1E-12"), Decimal("0.3333333333333333")]
    for cost in reported:
        budget.record(None, Usage(input_tokens=1, output_tokens=1, cost_usd=cost), model=MODEL)
    with budget.llm_call(model=MODEL, prompt_tokens=1, max_output_tokens=1) as call:
        call.settle({"prompt_tokens": 1, "completion_tokens": 1, "cost": 1.5e-10})  # OpenRouter's shape
    entries = budget.ledger.history(kind="llm")
    assert sum(e.cost_usd for e in entries) == budget.snapshot().cost_usd == Decimal("0.334567904")
    assert all(e.cost_usd == e.usage.cost_usd for e in entries)
    assert all(e.cost_usd >= c for e, c in zip(entries[:3], reported, strict=True))  # rounded up, never under


def test_windows_reset_counters_at_utc_boundaries(open_store: Opener, clock: FakeClock) -> None:
    clock.now = 1_800_003_600.0 - 10  # 10 s before an hour boundary
    budget = Budget(Limits(max_llm_calls=2, window="1h"), name="b", store=open_store(), clock=clock)
    assert budget.snapshot().window_resets_at == 1_800_003_600.0
    budget.record(None, _usage(1, 1))
    budget.record(None, _usage(1, 1))
    assert not budget.check().allowed
    clock.advance(10)
    snap = budget.snapshot()
    assert (snap.llm_calls, snap.window_resets_at) == (0, 1_800_007_200.0)
    assert budget.check().allowed


def test_child_budgets_keep_their_parents_clock_so_a_windowed_cap_holds(open_store: Opener, clock: FakeClock) -> None:
    """Runs built by name under a tenant's hourly budget, given no clock of their own, keep the
    tenant's: with the wall clock, their calls rolled the tenant's window to another hour, and
    the tenant's own calls rolled it back, granting more than the cap in one hour."""
    clock.now = 1_800_003_600.0 + 10
    day = Budget(Limits(max_llm_calls=3, window="1h"), name="tenant", store=open_store(), clock=clock)
    granted = 0
    for i in range(8):
        budget = Budget(Limits(), name=f"run-{i}", parent=day) if i % 2 else day
        try:
            budget.reserve(prompt_tokens=1, max_output_tokens=1).settle(_usage(1, 1))
            granted += 1
        except BudgetExceeded:
            pass
    assert granted == 3
    assert {e.time for e in day.ledger} == {clock.now}
    assert day.snapshot().window_resets_at == 1_800_007_200.0
    clock.advance(3600)
    assert Budget(Limits(), name="run-9", parent=day).check().allowed


def test_window_resets_at_is_a_float_in_every_store_even_with_a_clock_that_gives_ints(open_store: Opener) -> None:
    budget = Budget(Limits(window="1h"), name="b", store=open_store(), clock=lambda: 1_800_000_000)
    resets = budget.snapshot().window_resets_at
    assert type(resets) is float and resets == 1_800_000_000 - 1_800_000_000 % 3600 + 3600


def test_a_budget_built_again_with_another_window_keeps_its_spend_and_aligns_to_the_new_one(
    open_store: Opener, clock: FakeClock
) -> None:
    day = 86_400.0
    clock.now = 1_800_000_000.0 // day * day + 8 * 3600 + 60  # 08:01 UTC
    store = open_store()
    Budget(Limits(max_llm_calls=5), name="b", store=store, clock=clock).record(None, _usage(1, 1))
    hourly = Budget(Limits(max_llm_calls=5, window="1h"), name="b", store=store, clock=clock)
    assert hourly.snapshot().llm_calls == 1  # adding a window does not wipe what was spent
    assert hourly.snapshot().window_resets_at == clock.now - 60 + 3600  # 09:00
    daily = Budget(Limits(max_llm_calls=5, window="1d"), name="b", store=store, clock=clock)
    assert daily.snapshot().window_resets_at == clock.now - 8 * 3600 - 60 + day  # midnight UTC, not 08:00
    assert daily.snapshot().llm_calls == 1


def test_memory_refuses_names_with_a_lone_surrogate_like_the_shared_stores() -> None:
    with pytest.raises(ConfigurationError, match=r"budget name '\\udcff': it contains a lone surrogate"):
        Budget(Limits(), name="\udcff")
    with pytest.raises(ConfigurationError, match="lone surrogate"):
        Budget(Limits()).agent("a\udcff")


def test_window_keeps_holds_across_the_boundary(open_store: Opener, clock: FakeClock) -> None:
    clock.now = 86_400.0 * 20_000 - 1
    budget = Budget(Limits(max_total_tokens=100, window="1d"), name="b", store=open_store(), clock=clock)
    r = budget.reserve(prompt_tokens=10, max_output_tokens=10)
    clock.advance(2)
    assert budget.snapshot().held_tokens == 20
    r.settle(_usage(5, 5))
    assert budget.snapshot().total_tokens == 10


def test_expired_lease_is_released(open_store: Opener, clock: FakeClock) -> None:
    budget = Budget(Limits(max_llm_calls=1), name="b", store=open_store(), clock=clock, lease_ttl=10)
    budget.reserve(prompt_tokens=1, max_output_tokens=1)
    assert not budget.check().allowed
    clock.advance(10)
    assert budget.snapshot().held_llm_calls == 0
    assert budget.check().allowed
    (entry,) = budget.ledger.history(kind="release")
    assert entry.reason == "lease expired"


def test_renewed_lease_survives_and_expired_one_cannot_renew(open_store: Opener, clock: FakeClock) -> None:
    budget = Budget(Limits(max_llm_calls=5), name="b", store=open_store(), clock=clock, lease_ttl=10)
    r = budget.reserve(prompt_tokens=1, max_output_tokens=1)
    clock.advance(8)
    assert r.renew()
    clock.advance(8)
    assert budget.snapshot().held_llm_calls == 1
    clock.advance(3)
    assert budget.snapshot().held_llm_calls == 0
    assert not r.renew()
    r.settle(_usage(1, 1))  # a late settle still charges what was used
    assert budget.snapshot().llm_calls == 1


def test_leases_fall_due_one_by_one_after_an_earlier_hold_settled(open_store: Opener, clock: FakeClock) -> None:
    # A store may track only a lower bound of the next expiry (Redis does): a settled hold's
    # expiry must neither hide the later leases nor release them early.
    budget = Budget(Limits(max_llm_calls=5), name="b", store=open_store(), clock=clock, lease_ttl=10)
    first = budget.reserve(prompt_tokens=1, max_output_tokens=1)  # due at +10
    clock.advance(2)
    budget.reserve(prompt_tokens=2, max_output_tokens=1)  # due at +12
    clock.advance(2)
    budget.reserve(prompt_tokens=3, max_output_tokens=1)  # due at +14
    first.settle(_usage(1, 1))
    clock.advance(7)
    assert budget.snapshot().held_llm_calls == 2
    clock.advance(2)
    assert budget.snapshot().held_llm_calls == 1
    clock.advance(2)
    assert budget.snapshot().held_llm_calls == 0
    assert [e.usage.input_tokens for e in budget.ledger.history(kind="release") if e.usage] == [2, 3]


def test_leases_due_together_are_released_oldest_first(open_store: Opener, clock: FakeClock) -> None:
    budget = Budget(Limits(max_llm_calls=5), name="b", store=open_store(), clock=clock, lease_ttl=10)
    budget.reserve(prompt_tokens=1, max_output_tokens=1)
    clock.advance(1)
    budget.reserve(prompt_tokens=2, max_output_tokens=1)
    clock.advance(30)
    assert budget.check().allowed
    assert budget.snapshot().held_llm_calls == 0
    assert [e.usage.input_tokens for e in budget.ledger.history(kind="release") if e.usage] == [1, 2]


def test_leases_due_together_are_released_in_the_order_they_ran_out(open_store: Opener, clock: FakeClock) -> None:
    # A renewed lease runs out later than the ones taken after it: its release entry comes last,
    # in every store (the ledger's order must not depend on where the holds were kept).
    budget = Budget(Limits(max_llm_calls=5), name="b", store=open_store(), clock=clock, lease_ttl=10)
    first = budget.reserve(prompt_tokens=1, max_output_tokens=1)
    clock.advance(1)
    budget.reserve(prompt_tokens=2, max_output_tokens=1)  # due at +11
    clock.advance(1)
    budget.reserve(prompt_tokens=3, max_output_tokens=1)  # due at +12
    clock.advance(1)
    assert first.renew()  # due at +13
    clock.advance(30)
    assert budget.snapshot().held_llm_calls == 0
    assert [e.usage.input_tokens for e in budget.ledger.history(kind="release") if e.usage] == [2, 3, 1]


def test_a_settle_that_fires_soft_limits_frees_its_hold_at_every_level(open_store: Opener) -> None:
    tenant = Budget(Limits(max_total_tokens=1_000, warn_at=(0.2,)), name="t", store=open_store())
    run = Budget(Limits(max_total_tokens=400, warn_at=(0.5,)), name="r", parent=tenant)
    run.agent("w", max_tokens=300)
    reservation = run.reserve("w", prompt_tokens=100, max_output_tokens=100)
    assert (run.snapshot().held_tokens, tenant.snapshot().held_tokens) == (200, 200)
    entry = reservation.settle(_usage(150, 100))
    assert entry.usage is not None and entry.usage.total_tokens == 250
    assert (run.snapshot().held_tokens, tenant.snapshot().held_tokens) == (0, 0)
    assert (run.snapshot().total_tokens, tenant.snapshot().total_tokens) == (250, 250)
    assert len(run.ledger.history(kind="soft_limit")) == 3  # the run, the tenant and the agent's allocation
    run.reserve("w", prompt_tokens=10, max_output_tokens=10).settle(_usage(10, 10))  # nothing new fires
    assert len(run.ledger.history(kind="soft_limit")) == 3
    assert run.snapshot().total_tokens == 270


def test_parent_levels_are_charged_and_named_in_refusals(open_store: Opener) -> None:
    day = Budget(Limits(max_total_tokens=1_000), name="day", store=open_store())
    tenant = Budget(Limits(max_total_tokens=10_000), name="tenant", parent=day)
    run = Budget(Limits(), name="run", parent=tenant)
    run.record(None, _usage(400, 400))
    assert (run.snapshot().total_tokens, tenant.snapshot().total_tokens, day.snapshot().total_tokens) == (800,) * 3
    with pytest.raises(BudgetExceeded) as info:
        run.reserve(prompt_tokens=100, max_output_tokens=200)
    assert (info.value.budget, info.value.resource) == ("day", "total_tokens")
    sibling = Budget(Limits(), name="run", parent=Budget(Limits(), name="other", parent=day))
    assert sibling.snapshot().total_tokens == 0 and sibling.snapshot().parent.parent.total_tokens == 800


HOSTILE = ['a"b', "a'b", "{a}", "a}{", "a:b", "a\nb", '["a"]', "a\\", "a|b", "ünï", "", " ", "n", "a:"]


@pytest.mark.parametrize("name", [n for n in HOSTILE if n])
def test_hostile_budget_names_reach_only_their_own_keys(open_store: Opener, name: str) -> None:
    store = open_store()
    plain = Budget(Limits(max_total_tokens=100), name="a", store=store)
    hostile = Budget(Limits(max_total_tokens=100), name=name, store=store)
    child = Budget(Limits(max_total_tokens=100), name="b", parent=plain)
    hostile.record(None, _usage(30, 30))
    assert (plain.snapshot().total_tokens, child.snapshot().total_tokens) == (0, 0)
    assert hostile.snapshot().total_tokens == 60
    assert [e.budget for e in hostile.ledger.history()] == [name]
    assert plain.ledger.history() == []


def test_a_child_built_again_under_its_name_shares_it_or_is_refused_while_it_lives(open_store: Opener) -> None:
    import gc

    day = Budget(Limits(max_total_tokens=10_000, max_cost_usd=5), name="day", store=open_store())
    first = Budget(Limits(max_total_tokens=100, max_cost_usd=2), name="run", parent=day)
    message = "budget 'run' under 'day' already exists in this process with other limits"
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Budget(Limits(max_total_tokens=5_000, max_cost_usd=2), name="run", parent=day)
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Budget(Limits(max_total_tokens=100, max_cost_usd=2, warn_at=(0.5,)), name="run", parent=day)
    assert first.snapshot().limits.max_total_tokens == 100  # not re-capped by the refused build
    with pytest.raises(BudgetExceeded):
        first.reserve(prompt_tokens=60, max_output_tokens=60)
    # The same limits (however spelled) are the same budget: counters are shared.
    twin = Budget(Limits(max_total_tokens=100, max_cost_usd="2.00"), name="run", parent=day)
    twin.record(None, _usage(30, 30))
    assert first.snapshot().total_tokens == 60
    # Another name, or the same name under another parent, is another budget.
    assert Budget(Limits(max_total_tokens=5_000), name="run-2", parent=day).snapshot().total_tokens == 0
    other = Budget(Limits(), name="other", parent=day)
    assert Budget(Limits(max_total_tokens=5_000), name="run", parent=other).snapshot().total_tokens == 0
    # Once no object of it lives (a restarted worker), the last build sets its limits, as for a root.
    del first
    gc.collect()
    with pytest.raises(ConfigurationError, match=re.escape(message)):  # the twin still lives
        Budget(Limits(max_total_tokens=5_000), name="run", parent=day)
    del twin
    gc.collect()
    again = Budget(Limits(max_total_tokens=5_000), name="run", parent=day)
    assert (again.snapshot().limits.max_total_tokens, again.snapshot().total_tokens) == (5_000, 60)


def test_an_agent_registered_again_has_one_allocation_everywhere(open_store: Opener) -> None:
    budget = Budget(Limits(max_total_tokens=10_000), name="b", store=open_store())
    budget.agent("writer", priority=2, max_tokens=1_000)
    budget.agent("editor", priority=1, max_tokens=1_000, min_reserve=0)
    refused = "agent 'writer' is already registered with max_tokens=1000: an allocation changes only by transfers"
    with pytest.raises(ConfigurationError, match=re.escape(refused + " (budget.reallocate), so it cannot be "
                                                           "registered again with max_tokens=5000")):  # fmt: skip
        budget.agent("writer", max_tokens=5_000)
    with pytest.raises(ConfigurationError, match=re.escape("registered again with max_cost_usd=1")):
        budget.agent("writer", max_cost_usd="1")
    assert budget.contract("writer").max_tokens == budget.report()["writer"]["allocated"] == 1_000
    # The same allocation again updates the rest of the contract.
    c = budget.agent("writer", priority=3, max_tokens=1_000, confidence_threshold=0.9)
    assert (c.priority, c.confidence_threshold) == (3, 0.9) and budget.contract("writer") is c
    # After a transfer, registering it again keeps the allocation transfers made, and every reading agrees.
    assert budget.reallocate("writer", 500) == 500
    c = budget.agent("writer", priority=3, max_tokens=1_000)
    assert c.max_tokens == budget.contract("writer").max_tokens == budget.report()["writer"]["allocated"] == 1_500
    # Another object of the budget (a worker, a restart) gets the allocation the store enforces, not the one it asked.
    other = Budget(Limits(max_total_tokens=10_000), name="b", store=open_store())
    c = other.agent("writer", priority=3, max_tokens=9_999)
    assert c.max_tokens == other.contract("writer").max_tokens == other.report()["writer"]["allocated"] == 1_500
    with pytest.raises(BudgetExceeded) as info:
        other.reserve("writer", prompt_tokens=1_100, max_output_tokens=1_000)  # 2,100 > 1,500 + the editor's 500
    assert info.value.resource == "allocation"


def test_hostile_agent_names_are_data(open_store: Opener) -> None:
    budget = Budget(Limits(), name="b", store=open_store())
    names = [n for n in HOSTILE if n]  # "" is no agent's name, like None (the run itself): both are refused
    for i, name in enumerate(names):
        budget.agent(name, priority=1 + i % 3, max_tokens=100 + i)
    for name in names:
        budget.record(name, _usage(1, 2))
    report = budget.report()
    assert set(report) == set(names)
    assert all(report[n]["consumed"] == 3 for n in names)
    assert budget.reallocate("a|b", 50) == 50
    assert sum(v["allocated"] for v in budget.report().values()) == sum(100 + i for i in range(len(names)))


def test_an_agent_name_that_is_no_string_is_refused_before_reaching_any_store(open_store: Opener) -> None:
    budget = Budget(Limits(max_total_tokens=100), name="b", store=open_store())
    message = re.escape("agent must be a string, or None for the run itself, got int 7")
    for call in (
        lambda: budget.check(7),  # type: ignore[arg-type]
        lambda: budget.reserve(7, prompt_tokens=1, max_output_tokens=1),  # type: ignore[arg-type]
        lambda: budget.begin_agent(7),  # type: ignore[arg-type]
        lambda: budget.check_tool(7, "t"),  # type: ignore[arg-type]
        lambda: budget.has_agent(7),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match=message):  # not the store's own error (Redis: "can only concatenate")
            call()
    assert budget.ledger.history() == []


def test_shared_stores_refuse_names_with_a_lone_surrogate(open_shared_store: Opener) -> None:
    # SQLite and Redis keep names as UTF-8, which a lone surrogate (undecodable bytes read with
    # surrogateescape) does not have; they refuse such a name when the budget or agent is made.
    store = open_shared_store()
    with pytest.raises(ConfigurationError, match=r"budget name '\\udcff': it contains a lone surrogate"):
        Budget(Limits(), name="\udcff", store=store)
    budget = Budget(Limits(), name="b", store=store)
    with pytest.raises(ConfigurationError, match=r"agent name 'a\\udcff': it contains a lone surrogate"):
        budget.agent("a\udcff")
    with pytest.raises(ConfigurationError, match="lone surrogate"):
        budget.ensure_agent("\udcff")
    # Other text is refused when it is used, and the operation changes nothing.
    with pytest.raises(UsageError, match="lone surrogate"):
        budget.record(None, _usage(1, 1), model="m\udcff")
    with pytest.raises(UsageError, match="lone surrogate"):
        budget.check_tool(None, "\udcff")
    with pytest.raises(UsageError, match="lone surrogate"):
        store.figures(('["\udcff"]',), 0.0)  # a read, as `budgetary report` makes it
    assert budget.snapshot().llm_calls == 0 and budget.ledger.history() == []
    assert budget.report() == {}


def test_concurrent_threads_never_overshoot(open_store: Opener) -> None:
    store = open_store()
    budget = Budget(Limits(max_llm_calls=25, max_total_tokens=10_000), name="b", store=store)
    granted: list[int] = []

    def worker() -> None:
        for _ in range(10):
            try:
                budget.reserve(prompt_tokens=10, max_output_tokens=10).settle(_usage(10, 10))
                granted.append(1)
            except BudgetExceeded:
                pass

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 25 and budget.snapshot().llm_calls == 25


def test_state_persists_across_reopen(open_shared_store: Opener) -> None:
    first = Budget(Limits(max_total_tokens=1_000), name="b", store=open_shared_store())
    first.agent("a", max_tokens=500)
    first.record("a", _usage(100, 100))
    first.top_up(total_tokens=10)
    first.store.close()
    again = Budget(Limits(max_total_tokens=1_000), name="b", store=open_shared_store())
    assert again.snapshot().total_tokens == 200
    assert again.snapshot().limits.max_total_tokens == 1_010
    assert again.report() == {"a": {"allocated": 500, "consumed": 200, "remaining": 300}}
    assert [e.kind for e in again.ledger.history()] == ["llm"]
    assert again.has_agent("a")


def test_refusal_text_is_the_same_in_every_store(open_store: Opener) -> None:
    budget = Budget(Limits(max_cost_usd="0.000001"), name="b", store=open_store(), prices=PRICES)
    budget.agent("x", max_tokens=10)
    budget.record("x", _usage(1, 0), model=MODEL)
    with pytest.raises(BudgetExceeded) as info:
        budget.reserve("x", model=MODEL, prompt_tokens=1, max_output_tokens=1)
    decision = Deny(resource="cost_usd", reason=str(info.value))
    assert decision.reason == (
        "Exhausted the cost_usd limit of 0.000001 of budget 'b' (cost_usd=0.000001) for agent 'x'"
    )


# -- once markers: what a resumed run replays is applied the first time only ------------------------


def test_a_top_up_with_once_is_applied_once_across_budget_objects(open_store: Opener) -> None:
    first = Budget(Limits(max_total_tokens=100), name="b", store=open_store())
    other = Budget(Limits(max_total_tokens=100), name="b", store=open_store())  # another worker's object
    assert first.top_up(once="resume:task-1:0", total_tokens=50) is True
    assert other.top_up(once="resume:task-1:0", total_tokens=50) is False
    assert other.top_up(once="resume:task-1:1", total_tokens=7) is True
    assert first.top_up(total_tokens=1) is True  # without once: every time
    assert first.top_up(total_tokens=1) is True
    assert other.snapshot().limits.max_total_tokens == 100 + 50 + 7 + 2


def test_once_markers_belong_to_one_budget(open_store: Opener) -> None:
    store = open_store()
    run = Budget(Limits(max_total_tokens=100), name="run", store=store)
    sibling = Budget(Limits(max_total_tokens=100), name="sibling", store=store)
    child = Budget(Limits(max_total_tokens=100), name="child", parent=run, store=store)
    assert [b.top_up(once="same", total_tokens=1) for b in (run, sibling, child)] == [True, True, True]
    assert [b.mark("same") for b in (run, sibling, child)] == [False, False, False]
    assert [b.snapshot().limits.max_total_tokens for b in (run, sibling, child)] == [101, 101, 101]


def test_a_marked_start_takes_no_second_agent_slot(open_store: Opener) -> None:
    budget = Budget(Limits(max_agents=2), name="b", store=open_store())
    assert budget.begin_agent(once="start:task-1").allowed  # not marked: takes a slot like any start
    assert budget.mark("start:task-1") is True  # the task paused after it started
    assert budget.mark("start:task-1") is False
    again = Budget(Limits(max_agents=2), name="b", store=open_store())  # the worker that resumes it
    assert again.begin_agent(once="start:task-1").allowed
    assert again.begin_agent(once="start:task-1").allowed
    assert again.snapshot().agents_started == 1
    assert [e.kind for e in again.ledger.history()] == ["agent_start"]
    assert again.begin_agent(once="start:task-2").allowed  # another task: the second slot
    assert not again.begin_agent(once="start:task-3").allowed


def test_marked_reads_a_marker_without_marking_it(open_store: Opener) -> None:
    clock = FakeClock()
    budget = Budget(Limits(max_total_tokens=100), name="b", store=open_store(), clock=clock)
    other = Budget(Limits(max_total_tokens=100), name="b", store=open_store(), clock=clock)  # another worker's
    child = Budget(Limits(max_total_tokens=100), name="child", parent=budget, store=budget.store, clock=clock)
    assert not budget.marked("ask:1") and not budget.marked("ask:1")  # reading leaves it unmarked
    assert budget.mark("ask:1") and other.marked("ask:1") and not child.marked("ask:1")
    assert other.top_up(once="ask:2", total_tokens=1) and budget.marked("ask:2")
    assert not budget.marked("ask:3") and budget.mark("ask:3")
    clock.advance(30 * 86400 + 1)
    assert not budget.marked("ask:1")  # forgotten with the marks
    with pytest.raises(ConfigurationError):
        budget.marked("")


def test_once_markers_are_forgotten_after_thirty_days(open_store: Opener) -> None:
    clock = FakeClock()
    budget = Budget(Limits(max_total_tokens=100), name="b", store=open_store(), clock=clock)
    assert budget.top_up(once="old", total_tokens=1)
    clock.advance(30 * 86400 - 1)
    assert not budget.top_up(once="old", total_tokens=1)
    assert budget.mark("new")  # marking prunes what is older than 30 days
    clock.advance(2)
    assert budget.top_up(once="old", total_tokens=1)  # forgotten: applied again
    assert not budget.mark("new")
    assert budget.snapshot().limits.max_total_tokens == 102


def test_once_must_name_something(open_store: Opener) -> None:
    budget = Budget(Limits(max_total_tokens=100), name="b", store=open_store())
    for bad in ("", 5, b"x"):
        with pytest.raises(ConfigurationError, match="once must be a non-empty str"):
            budget.top_up(once=bad, total_tokens=1)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="once must be a non-empty str"):
            budget.begin_agent(once=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        budget.mark(None)  # type: ignore[arg-type]
    assert budget.snapshot().limits.max_total_tokens == 100 and budget.snapshot().agents_started == 0


def test_contract_shows_the_allocation_transfers_left(open_store: Opener) -> None:
    # SPEC §5: allocations change only by transfers, and contract() reads back the one in force,
    # as report() does, after an explicit reallocation and after an overrun that reallocation covered.
    budget = Budget(Limits(max_total_tokens=10_000), name="b", store=open_store())
    writer = budget.agent("writer", priority=2, max_tokens=1_000)
    budget.agent("editor", priority=1, max_tokens=1_000, min_reserve=0)
    assert budget.reallocate("writer", 300) == 300
    assert budget.contract("writer").max_tokens == budget.report()["writer"]["allocated"] == 1_300
    assert budget.contract("editor").max_tokens == budget.report()["editor"]["allocated"] == 700
    budget.record("writer", _usage(1_400, 100))  # 200 over: the editor covers it
    assert budget.contract("writer").max_tokens == budget.report()["writer"]["allocated"] == 1_500
    assert budget.contract("editor").max_tokens == budget.report()["editor"]["allocated"] == 500
    assert writer.max_tokens == 1_000  # a contract is a value: the one agent() returned is unchanged
    assert budget.contract("writer") is budget.contract("writer")  # read again, nothing changed


class _Name(str, enum.Enum):
    DAY = "day"
    RUN = "run"
    RESUME = "resume-1"


def test_str_subclass_budget_names_and_once_markers_work_in_every_store(open_store: Opener) -> None:
    # Names may be str subclasses (StrEnum members), as agent names may; Redis packed them as bytes
    # and raised TypeError for a budget name and for a once marker.
    day = Budget(Limits(max_total_tokens=1_000, max_agents=1), name=_Name.DAY, store=open_store())
    run = Budget(Limits(max_total_tokens=500), name=_Name.RUN, parent=day)
    assert type(run.name) is str and run.snapshot().budget == "run" and run.snapshot().parent.budget == "day"
    assert run.top_up(once=_Name.RESUME, total_tokens=10) is True
    assert run.top_up(once="resume-1", total_tokens=10) is False  # one marker, however it is spelled
    assert run.mark(_Name.RUN) is True and run.mark("run") is False
    assert run.begin_agent(once=_Name.RUN).allowed and run.snapshot().agents_started == 0
    assert run.snapshot().limits.max_total_tokens == 510
