"""Stores: where budget state lives, chosen by URL.

``memory://`` (default) keeps state in this process. Further schemes register
here as their stores are built.
"""

from __future__ import annotations

from collections.abc import Callable

from budgetary.core.errors import ConfigurationError
from budgetary.core.stores.base import EngineStore, Store
from budgetary.core.stores.memory import MemoryStore

__all__ = ["EngineStore", "MemoryStore", "SCHEMES", "Store", "store_from_url"]


def _memory(url: str) -> Store:
    if url.rstrip("/") not in ("memory:", "memory:/"):
        raise ConfigurationError(f"the memory store takes no host or path: {url!r}; use 'memory://'")
    return MemoryStore()


SCHEMES: dict[str, Callable[[str], Store]] = {"memory": _memory}
"""URL scheme -> factory. A plain dict, so an extension can add its own scheme."""


def store_from_url(url: str) -> Store:
    """Open the store ``url`` names: ``memory://``, ``sqlite:///path.db``, ``redis://host:6379/0``."""
    scheme, sep, _ = url.partition("://") if isinstance(url, str) else ("", "", "")
    factory = SCHEMES.get(scheme) if sep else None
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(SCHEMES))
        raise ConfigurationError(f"unknown store URL {url!r}; known schemes: {known}")
    return factory(url)
