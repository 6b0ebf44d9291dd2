"""Stores: where budget state lives, chosen by URL.

``memory://`` (default) keeps state in this process; ``sqlite:///path.db``
shares it between the processes of one host; ``redis://`` and ``rediss://``
(``redis-cluster://`` for a Redis Cluster) between hosts. The SQLite and Redis
modules are imported only when their scheme is used, so ``import budgetary``
never imports redis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from budgetary.core.errors import ConfigurationError
from budgetary.core.stores.base import EngineStore, Store
from budgetary.core.stores.memory import MemoryStore

__all__ = ["EngineStore", "MemoryStore", "SCHEMES", "Store", "open_store", "store_from_url"]


def _memory(url: str) -> Store:
    if url.rstrip("/") not in ("memory:", "memory:/"):
        raise ConfigurationError(f"the memory store takes no host or path: {url!r}; use 'memory://'")
    return MemoryStore()


def _sqlite(url: str) -> Store:
    from budgetary.core.stores.sqlite import SQLiteStore, sqlite_path

    return SQLiteStore(sqlite_path(url))


def _redis(url: str) -> Store:
    from budgetary.core.stores.redis import RedisStore

    return RedisStore(url)


SCHEMES: dict[str, Callable[[str], Store]] = {
    "memory": _memory, "sqlite": _sqlite, "redis": _redis, "rediss": _redis, "unix": _redis,
    "redis-cluster": _redis, "rediss-cluster": _redis,
}  # fmt: skip
"""URL scheme -> factory. A plain dict, so an extension can add its own scheme."""


def store_from_url(url: str) -> Store:
    """Open the store ``url`` names: ``memory://``, ``sqlite:///path.db``, ``redis://host:6379/0``."""
    scheme, sep, _ = url.partition("://") if isinstance(url, str) else ("", "", "")
    factory = SCHEMES.get(scheme) if sep else None
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(SCHEMES))
        raise ConfigurationError(f"unknown store URL {url!r}; known schemes: {known}")
    return factory(url)


def open_store(spec: str | Store | Any | None) -> Store:
    """The store ``spec`` names: ``None`` (a new memory store), a URL, a store, or a redis-py client.

    A ``redis.Redis``, ``redis.RedisCluster`` or ``redis.asyncio`` client is wrapped in a
    `RedisStore` (which does not close it).
    """
    if spec is None:
        return MemoryStore()
    if isinstance(spec, str):
        return store_from_url(spec)
    if type(spec).__module__.partition(".")[0] == "redis":
        from budgetary.core.stores.redis import RedisStore

        return RedisStore(cast(Any, spec))
    if not callable(getattr(spec, "ensure_budget", None)):
        raise ConfigurationError(
            f"store must be a URL (memory://, sqlite:///path.db, redis://host:6379/0), a store or a redis-py "
            f"client, got {type(spec).__name__}"
        )
    return spec
