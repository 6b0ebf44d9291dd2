"""Agents registered by another worker (SPEC §4, §6, §11): two `Budget` objects, one shared store.

Worker A registers the agents; worker B builds the same budget on the same store and
never registers them. B must still know their contracts: price and enforce a USD
allocation, reallocate for them, and never cover a stored contract with a blank one.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest

from budgetary import Budget, BudgetExceeded, Limits, Price, UnknownAgent
from tests.core.stores.conftest import Opener

MODEL = "house-model"
# One dollar per million tokens either way: 100,000 tokens cost $0.10.
PRICES = {MODEL: Price(input_mtok="1", output_mtok="1")}
LIMITS = Limits(max_total_tokens=10**9)


def _workers(open_shared_store: Opener, *, donor: bool = False) -> tuple[Budget, Budget]:
    """Worker A registers ``writer`` (USD allocation) and maybe ``editor`` (a donor); worker B registers nothing."""
    name = f"shared-agents-{uuid.uuid4().hex[:8]}"
    a = Budget(LIMITS, name=name, store=open_shared_store(), prices=PRICES)
    a.agent("writer", priority=3, max_cost_usd="0.10")
    if donor:
        a.agent("editor", priority=1, max_cost_usd="0.50", min_reserve=0)
    b = Budget(LIMITS, name=name, store=open_shared_store(), prices=PRICES)
    return a, b


def test_another_workers_usd_allocation_is_priced_and_enforced(open_shared_store: Opener) -> None:
    a, b = _workers(open_shared_store)
    with pytest.raises(BudgetExceeded) as info:
        b.reserve("writer", model=MODEL, prompt_tokens=100_000, max_output_tokens=50_000)  # $0.15 > $0.10
    assert (info.value.resource, info.value.agent) == ("allocation", "writer")
    with b.llm_call("writer", model=MODEL, prompt_tokens=30_000, max_output_tokens=10_000) as call:
        call.settle({"input_tokens": 30_000, "output_tokens": 10_000})
    assert a.report()["writer"]["consumed"] == Decimal("0.04")


@pytest.mark.anyio
async def test_another_workers_usd_allocation_is_enforced_by_the_async_api(
    open_shared_store: Opener, anyio_backend: str
) -> None:
    _, b = _workers(open_shared_store)
    with pytest.raises(BudgetExceeded) as info:
        await b.areserve("writer", model=MODEL, prompt_tokens=100_000, max_output_tokens=50_000)
    assert info.value.resource == "allocation"
    with pytest.raises(UnknownAgent):
        await b.areserve("nobody", model=MODEL, prompt_tokens=10, max_output_tokens=10)


def test_another_workers_contract_is_readable_and_reallocation_works(open_shared_store: Opener) -> None:
    a, b = _workers(open_shared_store, donor=True)
    writer = b.contract("writer")
    assert (writer.unit, writer.max_cost_usd, writer.min_reserve, writer.priority) == (
        "usd",
        Decimal("0.10"),
        Decimal("0.01"),
        3,
    )
    assert b.reallocate("writer", "0.20") == Decimal("0.20")
    assert a.report()["writer"]["allocated"] == Decimal("0.30")
    assert a.report()["editor"]["allocated"] == Decimal("0.30")
    with pytest.raises(UnknownAgent):
        b.contract("nobody")


def test_ensure_agent_keeps_another_workers_contract(open_shared_store: Opener) -> None:
    a, b = _workers(open_shared_store)
    assert b.ensure_agent("writer").max_cost_usd == Decimal("0.10")
    assert b.contract("writer").unit == "usd"
    with pytest.raises(BudgetExceeded):
        b.reserve("writer", model=MODEL, prompt_tokens=100_000, max_output_tokens=50_000)
    assert a.report()["writer"]["allocated"] == Decimal("0.10")
    # A name nobody registered is still registered with no allocation, for every worker.
    assert b.ensure_agent("critic").unit is None
    assert a.has_agent("critic") and a.report()["critic"]["allocated"] is None


def test_a_stored_contract_is_read_once_and_a_local_one_never(
    open_shared_store: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, b = _workers(open_shared_store)
    b.agent("local", max_cost_usd="1")
    reads: list[Any] = []
    agents = b.store.agents
    monkeypatch.setattr(b.store, "agents", lambda *args: reads.append(args) or agents(*args))
    for _ in range(3):
        with b.llm_call("local", model=MODEL, prompt_tokens=10, max_output_tokens=10) as call:
            call.settle({"input_tokens": 10, "output_tokens": 10})
    assert reads == []
    for _ in range(3):
        with b.llm_call("writer", model=MODEL, prompt_tokens=10, max_output_tokens=10) as call:
            call.settle({"input_tokens": 10, "output_tokens": 10})
    assert len(reads) == 1
