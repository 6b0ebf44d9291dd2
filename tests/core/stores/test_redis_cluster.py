"""The Redis store on a real Redis Cluster: each budget family's keys in one slot, parents in one call.

Needs a cluster node in BUDGETARY_REDIS_CLUSTER_URL (`.ci/run` starts a three-node cluster with
`.ci/test-servers` and sets it, with BUDGETARY_REQUIRE_REDIS_CLUSTER=1 so that these tests fail
there instead of skipping).
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

pytest.importorskip("redis")
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from budgetary import Budget, BudgetExceeded, Limits, UsageError
from budgetary.cli import main as cli_main
from budgetary.core.stores import store_from_url
from budgetary.core.stores.redis import RedisStore

pytestmark = [pytest.mark.redis, pytest.mark.filterwarnings("ignore::budgetary.core.prices.UnpricedModelWarning")]

CLUSTER_URL = os.environ.get("BUDGETARY_REDIS_CLUSTER_URL")
REQUIRE_CLUSTER = os.environ.get("BUDGETARY_REQUIRE_REDIS_CLUSTER") == "1"


@pytest.fixture
def cluster() -> Iterator[Any]:
    """A sync RedisCluster client; skips (fails under BUDGETARY_REQUIRE_REDIS_CLUSTER=1) without a cluster."""
    reason = None
    if not CLUSTER_URL:
        reason = "BUDGETARY_REDIS_CLUSTER_URL is not set (a Redis Cluster node URL; .ci/test-servers starts one)"
    else:
        try:
            client = RedisCluster.from_url(CLUSTER_URL, socket_connect_timeout=1)
            client.ping()
        except Exception as exc:
            reason = f"no Redis Cluster at {CLUSTER_URL} ({exc!r})"
    if reason is not None:
        if REQUIRE_CLUSTER:
            pytest.fail(f"BUDGETARY_REQUIRE_REDIS_CLUSTER=1 but {reason}")
        pytest.skip(reason)
    yield client
    client.close()


@pytest.fixture
def prefix(cluster: Any) -> Iterator[str]:
    """A fresh key prefix; its keys are deleted from every node afterwards."""
    value = f"budgetary-test:{uuid.uuid4().hex[:10]}:"
    yield value
    for key in cluster.scan_iter(match=value + "*"):
        cluster.delete(key)


def test_families_keep_to_one_slot_each_and_parents_are_charged_in_one_call(cluster: Any, prefix: str) -> None:
    store = RedisStore(cluster, key_prefix=prefix)
    names = ["day", "tenant-1", 'x"{y}\n', "{day}"]  # different slots, hostile names
    for name in names:
        day = Budget(Limits(max_llm_calls=100, window="1d"), name=name, store=store)
        tenant = Budget(Limits(max_total_tokens=1_000), name=name + "/tenant", parent=day)
        run = Budget(Limits(max_llm_calls=2), name=name + "/run", parent=tenant)
        run.agent("writer", max_tokens=500)
        with run.llm_call("writer", prompt_tokens=30, max_output_tokens=20) as call:
            call.settle({"input_tokens": 30, "output_tokens": 10})
        run.reserve("writer", prompt_tokens=5, max_output_tokens=5).release("tool failed")
        run.record("writer", {"input_tokens": 1, "output_tokens": 1})
        with pytest.raises(BudgetExceeded) as info:
            run.reserve("writer", prompt_tokens=1, max_output_tokens=1)
        assert info.value.resource == "llm_calls"
        assert [s.llm_calls for s in (run.snapshot(), tenant.snapshot(), day.snapshot())] == [2, 2, 2]
        assert tenant.snapshot().total_tokens == 42
        assert run.report() == {"writer": {"allocated": 500, "consumed": 42, "remaining": 458}}
        assert [e.kind for e in run.ledger.history()] == ["llm", "release", "llm", "soft_limit", "deny"]
    keys = [k.decode() for k in cluster.scan_iter(match=prefix + "*")]
    slots: dict[str, set[int]] = {}
    for key in keys:
        tag = key[len(prefix) :].split("}", 1)[0]
        slots.setdefault(tag, set()).add(cluster.keyslot(key))
    assert len(slots) == len(names)  # one family per root budget
    assert all(len(s) == 1 for s in slots.values())
    assert len({next(iter(s)) for s in slots.values()}) > 1  # and the families are spread over slots
    store.close()


@pytest.fixture
async def async_cluster(cluster: Any) -> AsyncIterator[Any]:
    assert CLUSTER_URL is not None
    client = AsyncRedisCluster.from_url(CLUSTER_URL)
    yield client
    await client.aclose()


@pytest.mark.anyio
async def test_an_asyncio_cluster_client_serves_the_async_api(
    async_cluster: Any, cluster: Any, prefix: str, anyio_backend: str
) -> None:
    store = RedisStore(async_cluster, key_prefix=prefix)
    tenant = Budget(Limits(max_total_tokens=100), name="tenant", store=store)
    run = Budget(Limits(), name="run", parent=tenant)
    async with run.llm_call(prompt_tokens=30, max_output_tokens=20) as call:
        await call.asettle({"input_tokens": 30, "output_tokens": 10})
    with pytest.raises(BudgetExceeded) as info:
        await run.areserve(prompt_tokens=50, max_output_tokens=20)
    assert (info.value.budget, info.value.resource) == ("tenant", "total_tokens")
    assert (await run.asnapshot()).total_tokens == 40
    with pytest.raises(UsageError, match=r"only a redis\.asyncio\.RedisCluster client"):
        run.snapshot()  # no pool to copy for sync calls: the message says what to use instead
    reader = RedisStore(cluster, key_prefix=prefix)  # the same state through the sync client
    assert Budget(Limits(max_total_tokens=100), name="tenant", store=reader).snapshot().total_tokens == 40


def test_a_cluster_client_is_named_by_the_node_it_was_given(cluster: Any) -> None:
    assert CLUSTER_URL is not None
    node = urlsplit(CLUSTER_URL)
    client = RedisCluster(host=node.hostname, port=node.port or 6379)
    store = RedisStore(client)
    assert store.url == f"redis-cluster://{node.hostname}:{node.port}"
    assert repr(store).startswith(f"RedisStore('redis-cluster://{node.hostname}:{node.port}'")
    client.close()


def _cluster_scheme_url() -> str:
    assert CLUSTER_URL is not None and CLUSTER_URL.startswith("redis://")
    return "redis-cluster://" + CLUSTER_URL[len("redis://") :]


def test_a_redis_cluster_url_serves_budgets_and_the_cli(cluster: Any, prefix: str) -> None:
    url = _cluster_scheme_url()
    opened = store_from_url(url)
    assert isinstance(opened, RedisStore)
    opened.close()
    with RedisStore(url, key_prefix=prefix) as store:
        tenant = Budget(Limits(max_total_tokens=100), name="tenant", store=store)
        run = Budget(Limits(max_llm_calls=5), name="run", parent=tenant)
        with run.llm_call(prompt_tokens=30, max_output_tokens=20) as call:
            call.settle({"input_tokens": 30, "output_tokens": 10})
        with pytest.raises(BudgetExceeded) as info:
            run.reserve(prompt_tokens=50, max_output_tokens=20)
        assert (info.value.budget, info.value.resource) == ("tenant", "total_tokens")
    out = io.StringIO()
    assert cli_main(["--store", url, "--key-prefix", prefix, "report", "tenant", "run"], out=out) == 0
    assert re.search(r"total tokens\s+40\s*/\s*100", out.getvalue()), out.getvalue()


@pytest.mark.anyio
async def test_a_redis_cluster_url_opens_an_asyncio_cluster_client_for_the_async_api(
    cluster: Any, prefix: str, anyio_backend: str
) -> None:
    async with RedisStore(_cluster_scheme_url(), key_prefix=prefix) as store:
        budget = Budget(Limits(max_llm_calls=2), name="day", store=store)
        async with budget.llm_call(prompt_tokens=3, max_output_tokens=2) as call:
            await call.asettle({"input_tokens": 3, "output_tokens": 1})
        assert [type(c).__name__ for c in store._loop_clients.values()] == ["RedisCluster"]
        assert (await budget.asnapshot()).llm_calls == 1 == budget.snapshot().llm_calls


@pytest.mark.anyio
async def test_a_redis_cluster_url_queues_more_concurrent_calls_than_a_node_holds(
    cluster: Any, prefix: str, anyio_backend: str
) -> None:
    # 200 calls start together on a new client: twice the connections per node, before it knows the slots.
    async with RedisStore(_cluster_scheme_url(), key_prefix=prefix) as store:
        budget = Budget(Limits(max_llm_calls=1_000), name="day", store=store)

        async def call() -> None:
            reservation = await budget.areserve(prompt_tokens=10, max_output_tokens=10)
            await reservation.asettle({"input_tokens": 10, "output_tokens": 5})

        await asyncio.gather(*(call() for _ in range(200)))
        snap = await budget.asnapshot()
        assert (snap.llm_calls, snap.total_tokens, snap.held_llm_calls) == (200, 3_000, 0)
