"""The Redis store over redis.asyncio: awaited on the event loop, same results as the sync API."""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

redis = pytest.importorskip("redis")
import redis.asyncio as aioredis  # noqa: E402
from redis import exceptions as redis_exceptions  # noqa: E402

from budgetary import Budget, BudgetExceeded, Limits, Price, StoreError  # noqa: E402
from budgetary.core.stores.base import is_async_store  # noqa: E402
from budgetary.core.stores.redis import RedisStore, _private_loop  # noqa: E402
from tests.conftest import FakeClock  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("ignore::budgetary.core.prices.UnpricedModelWarning")]

PRICES = {"m": Price(input_mtok="1", output_mtok="4")}
FAILURES = ["ConnectionError", "TimeoutError", "ResponseError", "NoScriptError", "BusyLoadingError", "ReadOnlyError",
            "OutOfMemoryError", "ClusterDownError"]  # fmt: skip


def _usage(inp: int, out: int) -> dict[str, int]:
    return {"input_tokens": inp, "output_tokens": out}


@pytest.fixture
async def async_client(redis_url: str) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def _budget(store: RedisStore, clock: FakeClock) -> Budget:
    budget = Budget(Limits(max_total_tokens=6_000, max_cost_usd="0.05", warn_at=(0.5,)), name="run", store=store,
                    clock=clock, run_id="r", prices=PRICES)  # fmt: skip
    budget.agent("lead", priority=3, max_tokens=2_000)
    budget.agent("helper", priority=1, max_tokens=3_000, min_reserve=500)
    budget.agent("critic", priority=2, max_tokens=600)
    return budget


def _sync_script(budget: Budget, clock: FakeClock) -> list[Any]:
    seen: list[Any] = []
    with budget.llm_call("lead", model="m", prompt_tokens=1_000, max_output_tokens=1_500) as call:  # reallocates
        seen.append(call.decision)
        seen.append(call.settle(_usage(1_000, 1_300)).to_dict())
    clock.advance(1)
    r = budget.reserve("critic", model="m", prompt_tokens=100, max_output_tokens=100)
    r.release("tool failed")
    r = budget.reserve("helper", model="m", prompt_tokens=200, max_output_tokens=100)
    seen.append(r.settle(_usage(200, 2_900)).to_dict())  # an overrun: soft limits fire
    seen.append(r.events)
    try:
        budget.reserve("helper", model="m", prompt_tokens=10, max_output_tokens=10)
    except BudgetExceeded as exc:
        seen.append((exc.resource, str(exc), exc.snapshot.total_tokens if exc.snapshot else None))
    with budget.llm_call("lead", model="m", prompt_tokens=10, max_output_tokens=10):
        pass  # never settled: charged its hold, flagged estimated
    try:
        with budget.llm_call("lead", model="m", prompt_tokens=10, max_output_tokens=10):
            raise RuntimeError("provider down")
    except RuntimeError:
        seen.append("released")
    return seen


async def _async_script(budget: Budget, clock: FakeClock) -> list[Any]:
    seen: list[Any] = []
    async with budget.llm_call("lead", model="m", prompt_tokens=1_000, max_output_tokens=1_500) as call:
        seen.append(call.decision)
        seen.append((await call.asettle(_usage(1_000, 1_300))).to_dict())
    clock.advance(1)
    r = await budget.areserve("critic", model="m", prompt_tokens=100, max_output_tokens=100)
    await r.arelease("tool failed")
    r = await budget.areserve("helper", model="m", prompt_tokens=200, max_output_tokens=100)
    seen.append((await r.asettle(_usage(200, 2_900))).to_dict())
    seen.append(r.events)
    try:
        await budget.areserve("helper", model="m", prompt_tokens=10, max_output_tokens=10)
    except BudgetExceeded as exc:
        seen.append((exc.resource, str(exc), exc.snapshot.total_tokens if exc.snapshot else None))
    async with budget.llm_call("lead", model="m", prompt_tokens=10, max_output_tokens=10):
        pass
    try:
        async with budget.llm_call("lead", model="m", prompt_tokens=10, max_output_tokens=10):
            raise RuntimeError("provider down")
    except RuntimeError:
        seen.append("released")
    return seen


def _observed(budget: Budget) -> dict[str, Any]:
    return {
        "snapshot": budget.snapshot(),
        "report": budget.report(),
        "ledger": [e.to_dict() for e in budget.ledger.history()],
    }


@pytest.mark.redis
async def test_an_asyncio_client_gives_the_results_of_the_sync_api(
    redis_url: str, key_prefix: str, async_client: Any, anyio_backend: str
) -> None:
    sync_clock, async_clock = FakeClock(), FakeClock()
    sync_store = RedisStore(redis_url, key_prefix=key_prefix + "sync:")
    expected = _sync_script(_budget(sync_store, sync_clock), sync_clock)
    store = RedisStore(async_client, key_prefix=key_prefix + "async:")
    assert store._client is None and is_async_store(store)
    got = await _async_script(_budget(store, async_clock), async_clock)  # setup calls wait for the first await
    assert got == expected
    reader = RedisStore(redis_url, key_prefix=key_prefix + "async:")  # the sync view of the same state
    assert _observed(_budget(reader, async_clock)) == _observed(_budget(sync_store, sync_clock))
    assert "soft_limit" in [e["kind"] for e in _observed(_budget(reader, async_clock))["ledger"]]
    sync_store.close()
    reader.close()


@pytest.mark.redis
async def test_a_url_store_opens_its_own_asyncio_client(redis_url: str, key_prefix: str, anyio_backend: str) -> None:
    async with RedisStore(redis_url, key_prefix=key_prefix) as store:
        budget = Budget(Limits(max_llm_calls=2), name="b", store=store)  # sync setup, sync client
        async with budget.llm_call(prompt_tokens=3, max_output_tokens=2) as call:
            await call.asettle(_usage(3, 1))
        assert len(store._loop_clients) == 1
        assert budget.snapshot().total_tokens == 4  # the sync API still works on the same store
    assert len(store._loop_clients) == 0


def _spy_threads(store: RedisStore) -> tuple[list[str], list[str]]:
    """Record the thread of every async and every sync call of the Lua program."""
    on_loop: list[str] = []
    sync: list[str] = []
    acall, call = store._acall, store._call

    async def spy_acall(keys: list[str], argv: list[Any]) -> str:
        on_loop.append(threading.current_thread().name)
        return await acall(keys, argv)

    def spy_call(keys: list[str], argv: list[Any]) -> str:
        sync.append(argv[0])
        return call(keys, argv)

    store._acall = spy_acall  # type: ignore[method-assign]
    store._call = spy_call  # type: ignore[method-assign]
    return on_loop, sync


@pytest.mark.redis
@pytest.mark.parametrize("kind", ["url", "client"])
async def test_calls_run_on_the_event_loop_not_in_a_thread(
    kind: str, redis_url: str, key_prefix: str, async_client: Any, anyio_backend: str
) -> None:
    store = RedisStore(redis_url if kind == "url" else async_client, key_prefix=key_prefix)
    budget = Budget(Limits(max_llm_calls=5), name="b", store=store)
    on_loop, sync = _spy_threads(store)
    r = await budget.areserve(prompt_tokens=1, max_output_tokens=1)
    await r.asettle(_usage(1, 1))
    await (await budget.areserve(prompt_tokens=1, max_output_tokens=1)).arelease()
    async with budget.llm_call(prompt_tokens=1, max_output_tokens=1) as call:
        await call.asettle(_usage(1, 1))
    loop_thread = threading.current_thread().name
    assert on_loop == [loop_thread] * 6
    assert sync == []
    await store.aclose()
    store.close()


@pytest.mark.redis
async def test_concurrent_tasks_never_pass_a_cap(
    redis_url: str, key_prefix: str, async_client: Any, anyio_backend: str
) -> None:
    store = RedisStore(async_client, key_prefix=key_prefix)
    budget = Budget(Limits(max_llm_calls=50, max_total_tokens=1_000), name="b", store=store)
    held: list[int] = []

    async def call(i: int) -> bool:
        try:
            async with budget.llm_call(prompt_tokens=5, max_output_tokens=5) as c:
                await asyncio.sleep(0)  # let the other tasks interleave while this one holds
                await c.asettle(_usage(5, i % 6))
        except BudgetExceeded:
            return False
        held.append(i)
        return True

    results = await asyncio.gather(*(call(i) for i in range(200)))
    reader = RedisStore(redis_url, key_prefix=key_prefix)
    snap = Budget(Limits(max_llm_calls=50, max_total_tokens=1_000), name="b", store=reader).snapshot()
    assert sum(results) == 50 == snap.llm_calls
    assert snap.total_tokens <= 1_000 and snap.held_tokens == 0
    reader.close()


@pytest.mark.redis
async def test_a_url_store_queues_more_concurrent_calls_than_its_pool_holds(
    redis_url: str, key_prefix: str, anyio_backend: str
) -> None:
    # 200 calls in flight at once, twice redis-py's connection cap: the extra ones wait for a connection.
    async with RedisStore(redis_url, key_prefix=key_prefix) as store:
        budget = Budget(Limits(max_llm_calls=1_000), name="b", store=store)

        async def call() -> None:
            reservation = await budget.areserve(prompt_tokens=10, max_output_tokens=10)
            await reservation.asettle(_usage(10, 5))

        await asyncio.gather(*(call() for _ in range(200)))
        snap = await budget.asnapshot()
        assert (snap.llm_calls, snap.total_tokens, snap.held_llm_calls) == (200, 3_000, 0)


@pytest.mark.redis
async def test_sync_calls_on_an_asyncio_only_store_work_from_the_loop_and_from_threads(
    key_prefix: str, async_client: Any, anyio_backend: str
) -> None:
    budget = Budget(Limits(max_llm_calls=5), name="b", store=RedisStore(async_client, key_prefix=key_prefix))
    budget.agent("writer", max_tokens=100)  # setup waits for the first call, sync or async
    assert budget.snapshot().llm_calls == 0  # a sync call from the loop's own thread
    budget.reserve("writer", prompt_tokens=3, max_output_tokens=2).settle(_usage(3, 1))
    held = await budget.areserve("writer", prompt_tokens=1, max_output_tokens=1)
    snap = await asyncio.to_thread(budget.snapshot)  # and from another thread
    assert (snap.llm_calls, snap.total_tokens, snap.held_tokens) == (1, 4, 2)
    assert budget.report() == {"writer": {"allocated": 100, "consumed": 4, "remaining": 96}}
    await held.asettle(_usage(1, 1))
    assert [e.kind for e in budget.ledger.history()] == ["llm", "llm"]
    assert budget.snapshot() == await budget.asnapshot()


@pytest.mark.redis
async def test_sync_setup_then_async_calls_share_one_state(
    redis_url: str, key_prefix: str, async_client: Any, anyio_backend: str
) -> None:
    store = RedisStore(async_client, key_prefix=key_prefix)
    budget = Budget(Limits(max_total_tokens=100), name="b", store=store)
    assert budget.check().allowed  # the sync path makes the waiting setup calls
    assert not store._setup
    async with budget.llm_call(prompt_tokens=30, max_output_tokens=20) as call:
        await call.asettle(_usage(30, 10))
    reader = RedisStore(redis_url, key_prefix=key_prefix)
    assert Budget(Limits(max_total_tokens=100), name="b", store=reader).snapshot().total_tokens == 40
    reader.close()
    store.close()  # closes the store's copy of the client, not the caller's client
    assert await async_client.ping()


@pytest.mark.redis
async def test_the_lease_keeper_renews_from_its_thread(key_prefix: str, async_client: Any, anyio_backend: str) -> None:
    store = RedisStore(async_client, key_prefix=key_prefix)
    budget = Budget(Limits(), name="b", store=store)
    async with budget.llm_call(prompt_tokens=1, max_output_tokens=1) as call:
        assert await asyncio.to_thread(call.renew)  # what the keeper thread does
        await call.asettle(_usage(1, 1))


@pytest.mark.parametrize("name", FAILURES)
async def test_async_failures_raise_store_error(name: str, anyio_backend: str) -> None:
    client = aioredis.Redis(host="127.0.0.1", port=1)
    store = RedisStore(client, key_prefix="t:")
    budget = Budget(Limits(), name="b", store=store)  # setup waits for the first async call
    error = redis_exceptions.__dict__[name]("boom")

    async def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    store._ainvoke = fail  # type: ignore[method-assign]
    with pytest.raises(
        StoreError, match=re.escape(f"Redis store redis://127.0.0.1:1/0 failed (ensure_budget): {name}")
    ):
        await budget.areserve(prompt_tokens=1, max_output_tokens=1)
    assert store._setup  # kept for the next attempt
    await client.aclose()


async def test_an_unreachable_server_is_a_store_error(anyio_backend: str) -> None:
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    budget = Budget(Limits(), name="b", store=RedisStore(client, key_prefix=f"t{uuid.uuid4().hex[:6]}:"))
    with pytest.raises(StoreError, match="ConnectionError"):
        await budget.areserve(prompt_tokens=1, max_output_tokens=1)
    await client.aclose()


@pytest.mark.redis
@pytest.mark.parametrize("op", ["areserve", "asettle", "arelease"])
async def test_each_async_operation_maps_errors(
    op: str, key_prefix: str, async_client: Any, anyio_backend: str
) -> None:
    store = RedisStore(async_client, key_prefix=key_prefix)
    budget = Budget(Limits(), name="b", store=store)
    r = await budget.areserve(prompt_tokens=1, max_output_tokens=1)

    async def fail(*args: Any, **kwargs: Any) -> Any:
        raise redis_exceptions.ConnectionError("gone")

    store._ainvoke = fail  # type: ignore[method-assign]
    calls: dict[str, Callable[[], Any]] = {
        "areserve": lambda: budget.areserve(prompt_tokens=1, max_output_tokens=1),
        "asettle": lambda: r.asettle(_usage(1, 1)),
        "arelease": lambda: r.arelease(),
    }
    with pytest.raises(StoreError, match=re.escape(f"failed ({op[1:]}): ConnectionError: gone")):
        await calls[op]()


@pytest.mark.redis
async def test_a_call_cancelled_while_it_waits_for_its_reply_does_not_leave_the_reply_for_the_next(
    redis_url: str, key_prefix: str, anyio_backend: str
) -> None:
    async with RedisStore(redis_url, key_prefix=key_prefix) as store:
        budget = Budget(Limits(max_total_tokens=10**9), name="b", store=store)
        await budget.areserve(prompt_tokens=1, max_output_tokens=1)  # the asyncio client is open
        for steps in range(40):  # cancel at every point of the call: before the send, after it, ...
            task = asyncio.ensure_future(budget.areserve(prompt_tokens=1, max_output_tokens=1))
            for _ in range(steps % 8):
                await asyncio.sleep(0)
            if steps >= 8:
                await asyncio.sleep(0.00005 * (steps - 8))
            task.cancel()
            try:
                (await task).release("not needed")
            except asyncio.CancelledError:
                pass
        for _ in range(20):  # every later reply answers its own call
            reservation = await budget.areserve(prompt_tokens=3, max_output_tokens=2)
            await reservation.asettle(_usage(3, 1))
        snap = budget.snapshot()
        assert (snap.llm_calls, snap.total_tokens) == (20, 80)


@pytest.mark.redis
async def test_an_asyncio_only_store_reads_its_figures_with_the_async_api(
    redis_url: str, key_prefix: str, async_client: Any, anyio_backend: str
) -> None:
    store = RedisStore(async_client, key_prefix=key_prefix)
    budget = Budget(Limits(max_llm_calls=5), name="b", store=store)
    budget.agent("writer", max_tokens=100)
    async with budget.llm_call("writer", prompt_tokens=3, max_output_tokens=2) as call:
        await call.asettle(_usage(3, 1))
    snap = await budget.asnapshot()
    assert (snap.llm_calls, snap.total_tokens, snap.held_llm_calls) == (1, 4, 0)
    assert await budget.areport() == {"writer": {"allocated": 100, "consumed": 4, "remaining": 96}}
    reader = RedisStore(redis_url, key_prefix=key_prefix)  # the sync view of the same state
    assert Budget(Limits(max_llm_calls=5), name="b", store=reader).snapshot() == snap
    reader.close()


async def _collect_garbage() -> None:
    import gc

    gc.collect()


@pytest.mark.redis
def test_sync_calls_on_an_asyncio_only_store_work_in_a_forked_child(redis_url: str, key_prefix: str) -> None:
    import multiprocessing

    store = RedisStore(aioredis.Redis.from_url(redis_url), key_prefix=key_prefix)
    budget = Budget(Limits(max_llm_calls=100), name="b", store=store)
    budget.record(None, _usage(1, 1))  # the private loop and the client's copy exist in the parent
    ctx = multiprocessing.get_context("fork")
    done = ctx.Queue()

    def child() -> None:  # inherits the store, the loop object, but not the loop's thread
        for _ in range(10):
            budget.reserve(prompt_tokens=3, max_output_tokens=2).settle(_usage(3, 1))
        done.put(budget.snapshot().llm_calls)
        # Garbage collected on a running loop, a copy of the parent's client closes its connections:
        # their sockets leave the epoll set the child shares with the parent, whose calls then time out.
        _private_loop.run(_collect_garbage())

    proc = ctx.Process(target=child, daemon=True)
    proc.start()
    for _ in range(10):
        budget.reserve(prompt_tokens=3, max_output_tokens=2).settle(_usage(3, 1))
    assert done.get(timeout=30) >= 11
    proc.join(timeout=30)
    assert proc.exitcode == 0
    assert budget.snapshot().llm_calls == 21
    store.close()


@pytest.mark.redis
def test_async_calls_on_a_callers_asyncio_client_are_exact_in_forked_children_and_parent(
    redis_url: str, key_prefix: str
) -> None:
    """redis.asyncio's pools do not notice a fork: a child calling through the caller's client used
    the parent's connections, both processes read each other's replies (the parent's settle failed
    with a JSONDecodeError, or timed out once the child's collected client took the sockets out of
    the shared epoll set), and the grants were not exact. The child now uses a copy of the client."""
    import gc
    import multiprocessing

    store = RedisStore(aioredis.Redis.from_url(redis_url), key_prefix=key_prefix)
    budget = Budget(Limits(max_llm_calls=100), name="b", store=store)

    async def cycles(n: int) -> int:
        granted = 0
        for _ in range(n):
            try:
                reservation = await budget.areserve(prompt_tokens=3, max_output_tokens=2)
            except BudgetExceeded:
                continue
            await reservation.asettle(_usage(3, 1))
            granted += 1
        return granted

    loop = asyncio.new_event_loop()  # the parent's connections stay open on it across the fork
    parent = loop.run_until_complete(cycles(2))
    ctx = multiprocessing.get_context("fork")
    done = ctx.Queue()

    async def collected_cycles(n: int) -> int:
        granted = await cycles(1)  # the child now uses its copy of the client...
        gc.collect()  # ...and the parent's client, if nothing kept it, is collected on the running loop
        return granted + await cycles(n - 1)

    def child() -> None:
        try:
            done.put(asyncio.run(asyncio.wait_for(collected_cycles(60), timeout=30)))
        except BaseException as exc:
            done.put(repr(exc))

    procs = [ctx.Process(target=child, daemon=True) for _ in range(2)]
    for proc in procs:
        proc.start()
    parent += loop.run_until_complete(asyncio.wait_for(cycles(60), timeout=30))
    children = [done.get(timeout=30) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert parent + sum(children) == 100, children  # exactly the cap, however the calls interleaved
    snap = loop.run_until_complete(budget.asnapshot())
    assert (snap.llm_calls, snap.total_tokens, snap.held_llm_calls) == (100, 400, 0)
    loop.run_until_complete(store.aclose())
    loop.close()


@pytest.mark.redis
def test_event_loops_in_several_threads_share_a_url_store(redis_url: str, key_prefix: str) -> None:
    # Each loop gets its own asyncio client: a client's connections belong to one loop.
    store = RedisStore(redis_url, key_prefix=key_prefix)
    budget = Budget(Limits(max_llm_calls=1_000), name="b", store=store)
    failures: list[BaseException] = []

    async def cycles() -> None:
        for _ in range(50):
            reservation = await budget.areserve(prompt_tokens=3, max_output_tokens=2)
            await reservation.asettle(_usage(3, 1))
        await store.aclose()

    def run() -> None:
        try:
            asyncio.run(asyncio.wait_for(cycles(), timeout=30))
        except BaseException as exc:  # reported below: a thread's exception would be lost
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert failures == []
    snap = budget.snapshot()
    assert (snap.llm_calls, snap.total_tokens, snap.held_llm_calls) == (200, 800, 0)
    assert len(store._loop_clients) == 0  # each loop closed its own client
    store.close()
