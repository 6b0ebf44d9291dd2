"""Shared budgets across processes (SPEC §3 leases, §11): exact grants, SIGKILLed workers, thread races.

The multi-process and fault tests use the real clock and real child processes
(started with ``spawn``: forking a threaded pytest process is unsafe).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgetary import Budget, BudgetExceeded, Limits
from budgetary.core.stores import Store
from tests.core.stores.conftest import Opener

pytestmark = pytest.mark.filterwarnings("ignore::budgetary.core.prices.UnpricedModelWarning")

PROCESSES = 8
CYCLES = 200
CAP = 500


def _open(spec: tuple[str, str, str]) -> Store:
    kind, where, prefix = spec
    if kind == "sqlite":
        from budgetary.core.stores.sqlite import SQLiteStore

        return SQLiteStore(where)
    from budgetary.core.stores.redis import RedisStore

    return RedisStore(where, key_prefix=prefix)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis, id="redis")])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """How a child process opens the store under test: (kind, path or URL, key prefix)."""
    if request.param == "sqlite":
        yield ("sqlite", str(tmp_path / "shared.db"), "")
    else:
        yield ("redis", request.getfixturevalue("redis_url"), request.getfixturevalue("key_prefix"))


def _cycles(spec: tuple[str, str, str], name: str, barrier: Any, results: Any) -> None:
    """A worker: wait for the others, then try CYCLES reserve/settle cycles."""
    import warnings

    warnings.simplefilter("ignore")
    store = _open(spec)
    budget = Budget(Limits(max_llm_calls=CAP), name=name, store=store)
    granted = tokens = 0
    barrier.wait()
    for i in range(CYCLES):
        try:
            reservation = budget.reserve(prompt_tokens=10, max_output_tokens=10)
        except BudgetExceeded:
            continue
        used = {"input_tokens": 3 + i % 5, "output_tokens": 1 + os.getpid() % 7}
        reservation.settle(used)
        granted += 1
        tokens += used["input_tokens"] + used["output_tokens"]
    store.close()
    results.put((granted, tokens))


@pytest.mark.slow
def test_processes_are_granted_exactly_the_cap(spec: tuple[str, str, str]) -> None:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    name = f"shared-{uuid.uuid4().hex[:6]}"
    workers = [ctx.Process(target=_cycles, args=(spec, name, barrier, results)) for _ in range(PROCESSES)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=10)
    assert all(w.exitcode == 0 for w in workers)
    assert sum(g for g, _ in outcomes) == CAP
    with _open(spec) as store:
        snap = Budget(Limits(max_llm_calls=CAP), name=name, store=store).snapshot()
        assert (snap.llm_calls, snap.held_llm_calls) == (CAP, 0)
        assert snap.total_tokens == sum(t for _, t in outcomes)


def _hold_and_hang(spec: tuple[str, str, str], name: str, ttl: float, ready: Any) -> None:
    import warnings

    warnings.simplefilter("ignore")
    budget = Budget(Limits(max_llm_calls=1), name=name, store=_open(spec), lease_ttl=ttl)
    budget.reserve(prompt_tokens=100, max_output_tokens=100)
    ready.put(time.time())
    time.sleep(600)


@pytest.mark.slow
def test_sigkilled_worker_frees_its_hold_within_the_ttl(spec: tuple[str, str, str]) -> None:
    ttl = 2.0
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    name = f"fault-{uuid.uuid4().hex[:6]}"
    child = ctx.Process(target=_hold_and_hang, args=(spec, name, ttl, ready))
    child.start()
    reserved_at = ready.get(timeout=60)
    os.kill(child.pid or 0, signal.SIGKILL)
    child.join(timeout=10)
    assert child.exitcode == -signal.SIGKILL
    with _open(spec) as store:
        budget = Budget(Limits(max_llm_calls=1), name=name, store=store)
        if time.time() < reserved_at + ttl - 0.3:  # the lease is still live: the dead worker's hold counts
            assert budget.snapshot().held_tokens == 200
            assert not budget.check().allowed
        time.sleep(max(0.0, reserved_at + ttl - time.time()) + 0.05)
        snap = budget.snapshot()
        assert (snap.held_tokens, snap.held_llm_calls, snap.llm_calls, snap.total_tokens) == (0, 0, 0, 0)
        (release,) = budget.ledger.history(kind="release")
        assert release.reason == "lease expired" and release.usage is not None and release.usage.total_tokens == 200
        budget.reserve(prompt_tokens=10, max_output_tokens=10).settle({"input_tokens": 4, "output_tokens": 6})
        snap = budget.snapshot()
        assert (snap.llm_calls, snap.total_tokens, snap.held_tokens) == (1, 10, 0)


# -- Hypothesis: concurrent reserves never overshoot ---------------------------------------


def _race(budget: Budget, plans: list[list[tuple[int, int | None]]]) -> tuple[int, int, int]:
    """Threads reserve per their plan (size, settled usage or None to keep holding); return what they got."""
    lock = threading.Lock()
    totals = [0, 0, 0]  # granted calls, settled tokens, still-held tokens

    def worker(plan: list[tuple[int, int | None]]) -> None:
        for size, used in plan:
            try:
                r = budget.reserve(prompt_tokens=size, max_output_tokens=0)
            except BudgetExceeded:
                continue
            if used is not None:
                r.settle({"input_tokens": min(used, size), "output_tokens": 0})
            with lock:
                totals[0] += 1
                totals[1 if used is not None else 2] += min(used, size) if used is not None else size

    threads = [threading.Thread(target=worker, args=(plan,)) for plan in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return totals[0], totals[1], totals[2]


_plans = st.lists(
    st.lists(st.tuples(st.integers(1, 40), st.one_of(st.none(), st.integers(0, 40))), min_size=1, max_size=8),
    min_size=2,
    max_size=5,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cap=st.integers(1, 120), calls=st.integers(1, 12), plans=_plans)
def test_concurrent_reserves_never_overshoot(
    open_store: Opener, cap: int, calls: int, plans: list[list[tuple[int, int | None]]]
) -> None:
    budget = Budget(Limits(max_total_tokens=cap, max_llm_calls=calls), name=uuid.uuid4().hex, store=open_store())
    granted, settled, held = _race(budget, plans)
    snap = budget.snapshot()
    assert granted <= calls
    assert snap.total_tokens + snap.held_tokens <= cap
    assert snap.llm_calls + snap.held_llm_calls <= calls
    assert (snap.total_tokens, snap.held_tokens, snap.llm_calls + snap.held_llm_calls) == (settled, held, granted)
