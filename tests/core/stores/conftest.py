"""Store fixtures: one parametrized opener over memory, SQLite and Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from budgetary.core.stores import MemoryStore, Store

Opener = Callable[[], Store]

STORES = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis, id="redis")]
SHARED_STORES = ["sqlite", pytest.param("redis", marks=pytest.mark.redis, id="redis")]


def _opener(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Opener, list[Store]]:
    opened: list[Store] = []
    if kind == "memory":
        memory = MemoryStore()
        opened.append(memory)
        return (lambda: memory), opened
    if kind == "sqlite":
        from budgetary.core.stores.sqlite import SQLiteStore

        path = tmp_path / "budget.db"

        def open_sqlite() -> Store:
            opened.append(SQLiteStore(path))
            return opened[-1]

        return open_sqlite, opened
    from budgetary.core.stores.redis import RedisStore

    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("key_prefix")

    def open_redis() -> Store:
        opened.append(RedisStore(url, key_prefix=prefix))
        return opened[-1]

    return open_redis, opened


@pytest.fixture(params=STORES)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the parametrized store; every call opens a new handle on the same state (memory: the same object)."""
    opener, opened = _opener(request.param, request, tmp_path)
    yield opener
    for store in opened:
        store.close()


@pytest.fixture(params=SHARED_STORES)
def open_shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Like `open_store`, for the stores that outlive a process (SQLite, Redis)."""
    opener, opened = _opener(request.param, request, tmp_path)
    yield opener
    for store in opened:
        store.close()
