"""SPEC §7 (guard, decisions), §8 (gates), §9 (skip marker) and `Budget.govern`."""

from __future__ import annotations

import asyncio
import re

import pytest

from budgetary import (
    Allow,
    Budget,
    BudgetExceeded,
    BudgetGuard,
    ConfidenceGate,
    ConfigurationError,
    Deny,
    Limits,
    Skipped,
    SoftLimit,
    UnknownAgent,
    Usage,
    UsageError,
    is_budget_skipped,
)
from budgetary.core.skip import mark_skipped

MODEL = "gpt-4o-mini"


# -- decisions --------------------------------------------------------------------------------


def test_decisions_expose_allowed_resource_and_reason():
    assert Allow().allowed and Allow().resource is None and Allow().reason == ""
    soft = SoftLimit(resource="cost_usd", consumed=1, limit=2, message="half way")
    assert soft.allowed and soft.reason == "half way"
    deny = Deny(resource="agents", reason="too many")
    assert not deny.allowed and deny.resource == "agents"


# -- host guards ------------------------------------------------------------------------------


class CountingGuard(BudgetGuard):
    def __init__(self) -> None:
        self.seen: list[tuple[str | None, int]] = []
        self.usage: list[Usage] = []

    def check_before_llm(self, agent, estimated_prompt_tokens):
        self.seen.append((agent, estimated_prompt_tokens))
        return Allow()

    def record_after_llm(self, agent, usage):
        self.usage.append(usage)


class NoNights:
    """A guard with only one method: the others default to allow / no-op."""

    def check_before_tool(self, agent, tool_name):
        if tool_name == "shell":
            return Deny(resource="tool_policy", reason="no shell for agents")
        return Allow()


def test_host_guards_see_each_call_and_the_first_deny_wins():
    counting = CountingGuard()

    class Always:
        def check_before_llm(self, agent, estimated_prompt_tokens):
            return Deny(resource="first", reason="first says no")

    class Second:
        def check_before_llm(self, agent, estimated_prompt_tokens):
            return Deny(resource="second", reason="second says no")

    budget = Budget(Limits(max_llm_calls=10), guards=[counting, NoNights()])
    with budget.llm_call(model=MODEL, prompt_tokens=42, max_output_tokens=1) as c:
        c.settle(Usage(input_tokens=42, output_tokens=1))
    assert counting.seen == [(None, 42)]
    assert counting.usage[0].input_tokens == 42
    assert budget.check_tool(None, "web").allowed
    denied = budget.check_tool(None, "shell")
    assert denied.resource == "tool_policy" and budget.snapshot().tool_calls == 1

    strict = Budget(guards=[counting, Always(), Second()])
    with pytest.raises(BudgetExceeded) as info:
        strict.reserve(model=MODEL, prompt_tokens=1)
    assert info.value.resource == "first"
    assert strict.ledger.history(kind="deny")[0].reason == "first says no"
    assert not strict.check().allowed


def test_a_host_guards_soft_limit_is_the_reservations_decision_as_it_is_checks():
    soft = SoftLimit(resource="gpu_hours", consumed=8, limit=10, message="80% of the GPU quota")

    class Quota:
        def check_before_llm(self, agent, estimated_prompt_tokens):
            return soft

    budget = Budget(Limits(max_llm_calls=10), guards=[Quota()])
    assert budget.check() == soft
    reservation = budget.reserve(model=MODEL, prompt_tokens=1)
    assert reservation.decision == soft
    reservation.settle(Usage(input_tokens=1, output_tokens=1))
    assert asyncio.run(budget.areserve(model=MODEL, prompt_tokens=1)).decision == soft
    # The budget's own soft limit is reported over the host's, as check() does.
    warned = Budget(Limits(max_llm_calls=2, warn_at=(0.5,)), guards=[Quota()])
    warned.reserve(model=MODEL, prompt_tokens=1).settle(Usage(input_tokens=1, output_tokens=1))
    own = warned.reserve(model=MODEL, prompt_tokens=1).decision
    assert isinstance(own, SoftLimit) and own.resource == "llm_calls"


def test_a_guard_that_raises_fails_closed():
    class Broken:
        def check_before_llm(self, agent, estimated_prompt_tokens):
            raise RuntimeError("bug")

    budget = Budget(guards=[Broken()])
    with pytest.raises(BudgetExceeded, match="Broken failed"):
        budget.reserve(model=MODEL, prompt_tokens=1)
    assert budget.snapshot().held_tokens == 0


def test_a_guard_that_answers_no_decision_fails_closed():
    # A guard that returns False (or any non-decision) is broken like one that raises: it denies,
    # naming itself and what it returned, instead of crashing the call with an AttributeError.
    class Boolean:
        def check_before_llm(self, agent, estimated_prompt_tokens):
            return False

        def check_before_tool(self, agent, tool_name):
            return True

    budget = Budget(guards=[Boolean()])
    decision = budget.check()
    assert not decision.allowed and decision.resource == "Boolean"
    assert decision.reason == "guard Boolean returned False, not a Decision"
    with pytest.raises(BudgetExceeded, match="guard Boolean returned False, not a Decision"):
        budget.reserve(model=MODEL, prompt_tokens=1)
    assert not budget.check_tool(None, "search").allowed
    assert budget.snapshot().held_tokens == 0 and budget.snapshot().tool_calls == 0


def test_a_guard_that_fails_to_record_does_not_throw_away_a_paid_result(caplog):
    seen = []

    class Broken:
        def record_after_llm(self, agent, usage):
            raise RuntimeError("bug")

    class Counting:
        def record_after_llm(self, agent, usage):
            seen.append(usage.total_tokens)

    budget = Budget(guards=[Broken(), Counting()])
    with budget.llm_call(model=MODEL, prompt_tokens=10, max_output_tokens=10) as call:
        entry = call.settle(Usage(input_tokens=10, output_tokens=4))
    assert entry.usage.total_tokens == 14 == budget.snapshot().total_tokens
    assert seen == [14]  # the next guard still hears of it
    assert "failed to record usage" in caplog.text


def test_protocol_defaults_allow_and_do_nothing():
    guard = BudgetGuard.__new__(type("Plain", (BudgetGuard,), {}))
    assert guard.check_before_llm("a", 5).allowed
    assert guard.check_before_tool("a", "t").allowed
    assert guard.record_after_llm("a", Usage()) is None


# -- check_tool ---------------------------------------------------------------------------------


def test_check_tool_counts_only_allowed_tool_calls():
    budget = Budget(Limits(max_tool_calls=2, max_llm_calls=0))
    assert budget.check_tool(None, "a").allowed
    assert budget.check_tool(None, "b").allowed
    third = budget.check_tool(None, "c")
    assert third.resource == "tool_calls"
    assert budget.snapshot().tool_calls == 2
    assert [e.location for e in budget.ledger.history(kind="tool")] == ["a", "b"]


# -- confidence gate (§8) ---------------------------------------------------------------------


def test_confidence_gate_rules():
    assert ConfidenceGate(None).allows(0.99)
    gate = ConfidenceGate(0.8)
    assert gate.allows(None)  # fail open before any report
    assert gate.allows(0.79)
    assert not gate.allows(0.8)


def test_a_confident_agent_is_stopped_and_others_are_not():
    budget = Budget()
    budget.agent("critic", confidence_threshold=0.85)
    budget.agent("writer")
    assert budget.check("critic").allowed
    budget.set_confidence("critic", 0.9)
    decision = budget.check("critic")
    assert decision.resource == "confidence" and not decision.allowed
    with pytest.raises(BudgetExceeded, match="confidence"):
        budget.reserve("critic", model=MODEL, prompt_tokens=1)
    assert budget.check("writer").allowed
    budget.set_confidence("critic", 0.2)
    assert budget.check("critic").allowed
    with pytest.raises(ValueError, match="confidence"):
        budget.set_confidence("critic", 1.2)


# -- skip marker (§9) ---------------------------------------------------------------------------


def test_skip_marker_is_structural():
    marker = Skipped(agent="critic", reason="out of tokens")
    assert is_budget_skipped(marker) and not marker
    assert not is_budget_skipped("[skipped by budget]")  # never by string matching
    assert is_budget_skipped(mark_skipped({"answer": ""}, marker))

    class Output:
        pass

    assert is_budget_skipped(mark_skipped(Output(), marker))
    assert not is_budget_skipped(Output())


def test_budget_skip_records_an_entry_and_returns_the_marker():
    budget = Budget()
    budget.agent("critic")
    marker = budget.skip("critic", "no tokens left", resource="total_tokens", location="review")
    assert marker == Skipped(agent="critic", reason="no tokens left", resource="total_tokens", location="review")
    assert budget.ledger.history(kind="skip")[0].reason == "no tokens left"


def test_skip_and_exceeded_refuse_what_they_cannot_record():
    # SPEC §4: the core API raises UnknownAgent for a name never registered (skip wrote a ledger
    # entry for it); exceeded() of a decision that allowed is a caller mistake, not an AttributeError.
    budget = Budget(name="run")
    with pytest.raises(UnknownAgent):
        budget.skip("ghost", "no tokens left")
    assert budget.ledger.history() == []
    with pytest.raises(UsageError, match=re.escape("exceeded() needs a Deny, got Allow()")):
        budget.exceeded(Allow())


# -- govern ------------------------------------------------------------------------------------


def test_govern_charges_usage_fn_and_reports_confidence():
    budget = Budget(Limits(max_llm_calls=5))
    budget.agent("critic", confidence_threshold=0.8)

    @budget.govern("critic", model=MODEL, usage_fn=lambda r: r["usage"], confidence_fn=lambda r: r["confidence"])
    def review(text: str) -> dict:
        return {"usage": {"prompt_tokens": 30, "completion_tokens": 7}, "confidence": 0.9}

    assert review.__name__ == "review"
    review("draft")
    (entry,) = budget.ledger.history(kind="llm")
    assert entry.usage.input_tokens == 30 and not entry.estimated and entry.location.endswith("review")
    with pytest.raises(BudgetExceeded) as info:
        review("again")  # confident now: the gate stops it
    assert info.value.resource == "confidence"


def test_govern_without_usage_fn_estimates_with_tiktoken_and_flags_it():
    budget = Budget()
    budget.agent("summariser")

    @budget.govern("summariser", model=MODEL)
    def summarise(text: str) -> str:
        return "short"

    summarise("a b c d e f g")
    (entry,) = budget.ledger.history(kind="llm")
    assert entry.estimated and entry.usage.input_tokens > 0 and entry.usage.output_tokens > 0


def test_govern_holds_no_output_reserve():
    budget = Budget(Limits(max_total_tokens=50))
    seen = []

    @budget.govern(model=MODEL)
    def f(x: str) -> str:
        seen.append(budget.snapshot().held_tokens)
        return x

    f("hi")
    assert seen[0] < 50  # only the prompt estimate is held, not the default 1,024-token reserve


def test_govern_skip_policy_returns_the_marker_and_does_not_run():
    budget = Budget(Limits(max_llm_calls=0))
    ran = []

    @budget.govern(model=MODEL, on_exhausted="skip")
    def finaliser(x: str) -> str:
        ran.append(x)
        return x

    result = finaliser("x")
    assert is_budget_skipped(result) and ran == []
    assert result.resource == "llm_calls"


def test_govern_releases_on_error_and_handles_async():
    budget = Budget(Limits(max_total_tokens=10_000))

    @budget.govern(model=MODEL)
    def boom(x: str) -> str:
        raise KeyError(x)

    with pytest.raises(KeyError):
        boom("x")
    assert budget.snapshot().held_tokens == 0 and budget.snapshot().llm_calls == 0

    @budget.govern(model=MODEL, usage_fn=lambda r: Usage(input_tokens=3, output_tokens=4))
    async def agent_step(x: str) -> str:
        await asyncio.sleep(0)
        return x

    assert asyncio.run(agent_step("y")) == "y"
    assert budget.snapshot().total_tokens == 7


def test_govern_charges_an_estimate_when_usage_fn_reads_no_usage_and_returns_the_result():
    # SPEC §1: garbage usage must not crash the run nor count as zero; §6: a paid result is never thrown away.
    budget = Budget(Limits(max_total_tokens=10_000))

    @budget.govern(model=MODEL, usage_fn=lambda r: r.get("usage"))
    def step(text: str) -> dict:
        return {"text": "an answer of several words"}  # this response came back without usage

    @budget.govern(model=MODEL, usage_fn=lambda r: {"input_tokens": -1, "output_tokens": 2})
    async def astep(text: str) -> str:
        return "another answer"

    assert step("a question of several words") == {"text": "an answer of several words"}
    assert asyncio.run(astep("a question")) == "another answer"
    entries = budget.ledger.history(kind="llm")
    assert len(entries) == 2 and all(e.estimated and e.usage.input_tokens > 0 for e in entries)
    snap = budget.snapshot()
    assert snap.held_tokens == 0 and snap.llm_calls == 2


def test_govern_callbacks_that_raise_leave_no_hold_behind():
    # The function ran and was paid for: a usage_fn that raises (the result lacks the field it reads)
    # is an unreadable report, charged as an estimate; a confidence_fn that raises does so after the
    # call was charged. Either way the hold is gone, not kept until its lease runs out.
    budget = Budget(Limits(max_llm_calls=4))
    budget.agent("critic", confidence_threshold=0.8)

    @budget.govern(model=MODEL, usage_fn=lambda r: r.usage)
    def step(text: str) -> str:
        return "an answer without a usage attribute"

    @budget.govern("critic", model=MODEL, confidence_fn=lambda r: r["confidence"])
    def review(text: str) -> str:
        return "no confidence in a string"

    @budget.govern(model=MODEL, usage_fn=lambda r: r.usage)
    async def astep(text: str) -> str:
        return "another answer"

    assert step("a question") == "an answer without a usage attribute"
    assert asyncio.run(astep("a question")) == "another answer"
    with pytest.raises(TypeError):
        review("a draft")
    snap = budget.snapshot()
    assert snap.held_llm_calls == 0 and snap.held_tokens == 0 and snap.llm_calls == 3
    assert [e.estimated for e in budget.ledger.history(kind="llm")] == [True, True, True]


def test_govern_fails_at_decoration_time():
    budget = Budget(Limits(max_cost_usd=1))
    with pytest.raises(UnknownAgent):
        budget.govern("ghost", model=MODEL)
    with pytest.raises(ConfigurationError, match="model"):
        budget.govern()  # a USD cap with neither model nor usage_fn cannot be enforced
    budget.govern(model=MODEL)
    budget.govern(usage_fn=lambda r: r)
