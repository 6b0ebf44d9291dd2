"""`MemoryStore`: the default store, in-process, thread- and asyncio-safe. Also the test fake."""

from __future__ import annotations

import threading
from types import TracebackType

from budgetary.core._engine import Engine
from budgetary.core.ledger import LedgerEntry
from budgetary.core.stores.base import EngineStore, checked_ledger_max_len

__all__ = ["MemoryStore"]


class MemoryStore(EngineStore):
    """Budget state in this process's memory (``memory://``).

    One lock guards the whole store: an operation touches several budgets at
    once (a run and its parents) and takes microseconds, so a single lock is
    both simpler and faster than ordered per-key locks. Operations never block
    on I/O, so calling them from asyncio code is safe.

    The ledger keeps every entry (about 2 KB each) unless ``ledger_max_len`` bounds it to the
    newest entries; counters, snapshots and reports stay exact either way. Bound it in a
    long-lived process that keeps one budget for many calls (a server's daily budget).

    Example:
        ```python
        store = MemoryStore()
        run = Budget(Limits(max_llm_calls=10), store=store)
        daily = Budget(Limits(max_cost_usd=50, window="1d"), store=MemoryStore(ledger_max_len=100_000))
        ```
    """

    url = "memory://"

    def __init__(self, *, ledger_max_len: int = 0) -> None:
        self.ledger_max_len = checked_ledger_max_len(ledger_max_len, "MemoryStore")
        self._lock = threading.RLock()
        self._engine = Engine(guard=self._lock, ledger_max_len=self.ledger_max_len)
        self._locked = _Locked(self._lock, self._engine)
        # The two operations every LLM call makes go straight to the engine, which takes the
        # lock itself: a wrapper here would cost as much as the engine work it guards.
        self.reserve = self._engine.reserve  # type: ignore[method-assign]
        self.settle = self._engine.settle  # type: ignore[method-assign]

    def _transaction(self) -> _Locked:
        return self._locked

    def entries(self, scope: str) -> list[LedgerEntry]:
        with self._lock:
            return [e for e in self._engine.entries if scope in e.scopes]


class _Locked:
    """The critical section: a plain lock (a @contextmanager generator costs more than the work it guards)."""

    __slots__ = ("_engine", "_lock")

    def __init__(self, lock: threading.RLock, engine: Engine) -> None:
        self._lock = lock
        self._engine = engine

    def __enter__(self) -> Engine:
        self._lock.acquire()
        return self._engine

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release()
