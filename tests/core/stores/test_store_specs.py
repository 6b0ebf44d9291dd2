"""What `Budget(store=...)` accepts: nothing, a URL, a store, or a redis-py client (sync or asyncio)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from budgetary import Budget, ConfigurationError, Limits
from budgetary.core.stores import MemoryStore

pytestmark = pytest.mark.filterwarnings("ignore::budgetary.core.prices.UnpricedModelWarning")


@pytest.fixture
def family(redis_url: str) -> Iterator[str]:
    """A fresh budget name; its keys (under the default prefix a bare client gets) are deleted afterwards."""
    import redis

    from budgetary.core.stores.redis import RedisStore

    name = f"spec-test-{uuid.uuid4().hex[:10]}"
    yield name
    store = RedisStore(redis_url)
    client = redis.Redis.from_url(redis_url)
    client.delete(*store._family_keys(f'["{name}"]'))
    client.close()
    store.close()


def test_no_store_is_a_private_memory_store_and_a_store_is_used_as_it_is() -> None:
    first, second = Budget(), Budget()
    assert isinstance(first.store, MemoryStore) and first.store is not second.store
    shared = MemoryStore()
    assert Budget(store=shared).store is shared


@pytest.mark.parametrize("bad", [42, object(), b"redis://localhost"])
def test_anything_else_is_refused_with_what_is_accepted(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"URL .* a store or a redis-py client"):
        Budget(store=bad)


@pytest.mark.redis
def test_a_sync_redis_client_is_wrapped_and_shares_state_with_a_url(redis_url: str, family: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    budget = Budget(Limits(max_llm_calls=2), name=family, store=client)
    budget.reserve(prompt_tokens=5, max_output_tokens=5).settle({"input_tokens": 5, "output_tokens": 3})
    other_host = Budget(Limits(max_llm_calls=2), name=family, store=redis_url)
    assert other_host.snapshot().llm_calls == 1 and other_host.snapshot().total_tokens == 8
    budget.store.close()
    assert client.ping()  # the caller's client stays open
    client.close()


@pytest.mark.redis
def test_an_asyncio_redis_client_serves_the_async_api(redis_url: str, family: str) -> None:
    import redis.asyncio as aioredis

    async def run() -> tuple[int, int]:
        client = aioredis.Redis.from_url(redis_url)
        budget = Budget(Limits(max_llm_calls=2), name=family, store=client)
        async with budget.llm_call(prompt_tokens=5, max_output_tokens=5) as call:
            await call.asettle({"input_tokens": 5, "output_tokens": 3})
        again = await budget.areserve(prompt_tokens=1, max_output_tokens=1)
        await again.asettle({"input_tokens": 1, "output_tokens": 1})
        await client.aclose()
        seen = Budget(Limits(max_llm_calls=2), name=family, store=redis_url).snapshot()
        return seen.llm_calls, seen.total_tokens

    assert asyncio.run(run()) == (2, 10)
