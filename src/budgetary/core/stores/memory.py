"""`MemoryStore`: the default store, in-process, thread- and asyncio-safe. Also the test fake."""

from __future__ import annotations

import threading
from types import TracebackType

from budgetary.core._engine import Engine, Meta, Outcome, Vector
from budgetary.core.ledger import LedgerEntry
from budgetary.core.stores.base import EngineStore
from budgetary.core.usage import Usage

__all__ = ["MemoryStore"]


class MemoryStore(EngineStore):
    """Budget state in this process's memory (``memory://``).

    One lock guards the whole store: an operation touches several budgets at
    once (a run and its parents) and takes microseconds, so a single lock is
    both simpler and faster than ordered per-key locks. Operations never block
    on I/O, so calling them from asyncio code is safe.

    Example:
        ```python
        store = MemoryStore()
        run = Budget(Limits(max_llm_calls=10), store=store)
        ```
    """

    url = "memory://"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engine = Engine()
        self._locked = _Locked(self._lock, self._engine)

    def _transaction(self) -> _Locked:
        return self._locked

    # The two operations every call makes, with the lock taken directly: the generic
    # `_transaction()` context manager costs about as much as the engine work it guards.
    def reserve(
        self, chain: tuple[str, ...], agent: str | None, req: Vector, *, gate: bool, hold_id: str, ttl: float,
        now: float, meta: Meta, quiet: bool = False,
    ) -> Outcome:  # fmt: skip
        with self._lock:
            return self._engine.reserve(chain, agent, req, gate=gate, hold_id=hold_id, ttl=ttl, now=now, meta=meta,
                                        quiet=quiet)  # fmt: skip

    def settle(
        self, chain: tuple[str, ...], agent: str | None, hold_id: str | None, actual: Vector, *, now: float,
        meta: Meta, estimated: bool = False, cost_known: bool = True, usage: Usage | None = None,
    ) -> Outcome:  # fmt: skip
        with self._lock:
            return self._engine.settle(chain, agent, hold_id, actual, now=now, meta=meta, estimated=estimated,
                                       cost_known=cost_known, usage=usage)  # fmt: skip

    def entries(self, scope: str) -> list[LedgerEntry]:
        with self._lock:
            return [e for e in self._engine.entries if scope in e.scopes]


class _Locked:
    """The critical section: a plain lock (a @contextmanager generator costs more than the work it guards)."""

    __slots__ = ("_engine", "_lock")

    def __init__(self, lock: threading.Lock, engine: Engine) -> None:
        self._lock = lock
        self._engine = engine

    def __enter__(self) -> Engine:
        self._lock.acquire()
        return self._engine

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release()
