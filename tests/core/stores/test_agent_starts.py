"""An agent start spends nothing, so it moves nothing: the same in every store (SPEC §6)."""

from __future__ import annotations

from budgetary import Budget, Usage

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
