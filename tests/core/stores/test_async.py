"""Async use of the stores: results match the sync API; SQLite runs in a worker thread, memory inline.

Redis awaits its asyncio client on the loop instead: see test_redis_async.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from budgetary import Budget, BudgetExceeded, Limits
from budgetary.core.stores.sqlite import SQLiteStore
from tests.core.stores.conftest import Opener

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("ignore::budgetary.core.prices.UnpricedModelWarning")]


def _store_thread(budget: Budget) -> list[str]:
    """Wrap the budget's store so every reserve records the name of the thread that ran it."""
    store, seen = budget._store, []
    reserve = store.reserve

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(threading.current_thread().name)
        return reserve(*args, **kwargs)  # type: ignore[arg-type]

    store.reserve = spy  # type: ignore[method-assign,assignment]
    return seen


async def test_async_api_charges_like_the_sync_one(open_store: Opener, anyio_backend: str) -> None:
    budget = Budget(Limits(max_llm_calls=3, max_total_tokens=1_000), name="a", store=open_store())
    r = await budget.areserve(prompt_tokens=100, max_output_tokens=50)
    assert budget.snapshot().held_tokens == 150
    entry = await r.asettle({"input_tokens": 90, "output_tokens": 20})
    assert entry.usage is not None and entry.usage.total_tokens == 110
    released = await budget.areserve(prompt_tokens=10, max_output_tokens=10)
    await released.arelease("cancelled")
    async with budget.llm_call(prompt_tokens=5, max_output_tokens=5) as call:
        await call.asettle({"input_tokens": 5, "output_tokens": 1})
    snap = budget.snapshot()
    assert (snap.llm_calls, snap.total_tokens, snap.held_tokens) == (2, 116, 0)
    assert [e.kind for e in budget.ledger.history()] == ["llm", "release", "llm"]
    with pytest.raises(BudgetExceeded):
        await budget.areserve(prompt_tokens=2_000, max_output_tokens=1)


async def test_a_failed_async_block_releases_its_hold(open_store: Opener, anyio_backend: str) -> None:
    budget = Budget(Limits(max_llm_calls=1), name="a", store=open_store())
    with pytest.raises(RuntimeError):
        async with budget.llm_call(prompt_tokens=5, max_output_tokens=5):
            raise RuntimeError("provider down")
    (release,) = budget.ledger.history(kind="release")
    assert release.reason == "call failed: RuntimeError"
    assert budget.check().allowed


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "budget.db")
    yield store
    store.close()


async def test_sqlite_is_called_off_the_event_loop(sqlite_store: SQLiteStore, anyio_backend: str) -> None:
    budget = Budget(Limits(), name="a", store=sqlite_store)
    seen = _store_thread(budget)
    await budget.areserve(prompt_tokens=1, max_output_tokens=1)
    async with budget.llm_call(prompt_tokens=1, max_output_tokens=1) as call:
        await call.asettle({"input_tokens": 1, "output_tokens": 1})
    assert len(seen) == 2 and threading.main_thread().name not in seen


async def test_the_memory_store_stays_inline(anyio_backend: str) -> None:
    budget = Budget(Limits(), name="a")
    seen = _store_thread(budget)
    async with budget.llm_call(prompt_tokens=1, max_output_tokens=1) as call:
        await call.asettle({"input_tokens": 1, "output_tokens": 1})
    assert seen == [threading.current_thread().name]


async def test_a_slow_store_does_not_stall_other_tasks(sqlite_store: SQLiteStore, anyio_backend: str) -> None:
    budget = Budget(Limits(), name="a", store=sqlite_store)
    store, ticks = budget._store, []
    reserve = store.reserve

    def slow(*args: object, **kwargs: object) -> object:
        threading.Event().wait(0.3)  # a store that blocks, as a lock wait or a slow network would
        return reserve(*args, **kwargs)  # type: ignore[arg-type]

    store.reserve = slow  # type: ignore[method-assign,assignment]

    async def ticker() -> None:
        while True:
            ticks.append(anyio.current_time())
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0)
        await budget.areserve(prompt_tokens=1, max_output_tokens=1)
        during = len(ticks)
        tg.cancel_scope.cancel()
    assert during >= 5  # the ticker kept running while the store blocked for 0.3 s


async def test_async_snapshot_and_report_match_the_sync_ones(open_store: Opener, anyio_backend: str) -> None:
    budget = Budget(Limits(max_total_tokens=1_000), name="a", store=open_store())
    budget.agent("writer", max_tokens=400)
    budget.agent("helper")
    call = await budget.areserve("writer", prompt_tokens=100, max_output_tokens=50)
    await budget.areserve("helper", prompt_tokens=5, max_output_tokens=5)  # still held
    await call.asettle({"input_tokens": 90, "output_tokens": 20})
    snap = await budget.asnapshot()
    assert (snap.total_tokens, snap.held_tokens, snap.llm_calls) == (110, 10, 1)
    assert snap == budget.snapshot()
    report = await budget.areport()
    assert report == {
        "writer": {"allocated": 400, "consumed": 110, "remaining": 290},
        "helper": {"allocated": None, "consumed": 0, "remaining": None},
    }
    assert report == budget.report()


async def test_an_async_governed_function_calls_sqlite_off_the_event_loop(
    sqlite_store: SQLiteStore, anyio_backend: str
) -> None:
    from tests.fakes import record_store_threads

    budget = Budget(Limits(max_llm_calls=2), name="a", store=sqlite_store)
    budget.agent("summariser")
    seen = record_store_threads(budget, "reserve", "settle", "release", "set_confidence")

    @budget.govern("summariser", usage_fn=lambda r: {"input_tokens": 10, "output_tokens": len(r)},
                   confidence_fn=lambda r: 0.5)  # fmt: skip
    async def summarise(text: str) -> str:
        await anyio.sleep(0)
        return text[:3]

    @budget.govern("summariser")
    async def broken(text: str) -> str:
        raise ValueError(text)

    assert await summarise("otters") == "ott"
    with pytest.raises(ValueError):
        await broken("boom")
    loop_thread = threading.current_thread().name
    during = list(seen)
    assert len(during) == 5 and loop_thread not in during  # reserve, settle, confidence, reserve, release
    assert [e.kind for e in budget.ledger.history()] == ["llm", "release"]
    assert budget.snapshot().total_tokens == 13
