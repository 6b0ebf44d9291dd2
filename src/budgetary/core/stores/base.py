"""The store seam: where budget state lives and how operations on it stay atomic.

The budget (rules, estimation, prices) talks to a `Store`; a store keeps
limits, counters, holds and the ledger, and runs each operation as one atomic
step. The surface is wider than a key-value "try_reserve(key, amount, limit)"
because one LLM call checks several counters at once (every level of the
parent chain, the agent's allocation, a reallocation) and all of them must
change together or not at all.

`EngineStore` implements the whole surface with the shared `Engine` inside a
critical section that subclasses provide (`_transaction`): a lock for memory,
one ``BEGIN IMMEDIATE`` transaction for SQLite. A store that cannot run Python
inside its critical section (Redis runs Lua) implements the Protocol directly
and must pass the same conformance suite.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

from budgetary.core._engine import AgentState, Engine, Meta, Outcome, Vector
from budgetary.core.contract import AgentContract
from budgetary.core.errors import ConfigurationError, UsageError
from budgetary.core.guard import Decision
from budgetary.core.ledger import LedgerEntry
from budgetary.core.limits import Limits
from budgetary.core.usage import Usage

__all__ = ["AsyncStore", "EngineStore", "LevelFigures", "Store", "is_async_store", "off_loop"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LevelFigures:
    """Raw figures of one budget level, in store units."""

    key: str
    name: str
    limits: list[int | None]
    spent: Vector
    held: Vector
    window_start: float
    window: int | None


@runtime_checkable
class Store(Protocol):
    """Where budget state lives. Every method is one atomic step."""

    url: str

    def ensure_budget(self, key: str, name: str, limits: Limits, now: float) -> None:
        """Create the budget ``key`` or update its limits, keeping counters and top-ups."""

    def ensure_agent(self, key: str, contract: AgentContract, *, replace: bool) -> AgentContract | None:
        """Register an agent's contract (``replace=False`` keeps an existing one)."""

    def has_agent(self, key: str, agent: str | None) -> bool:
        """Whether ``agent`` is registered in budget ``key``."""

    def check(self, chain: tuple[str, ...], agent: str | None, now: float) -> Decision:
        """Could an LLM call start now? Changes nothing."""

    def reserve(
        self,
        chain: tuple[str, ...],
        agent: str | None,
        req: Vector,
        *,
        gate: bool,
        hold_id: str,
        ttl: float,
        now: float,
        meta: Meta,
        quiet: bool = False,
    ) -> Outcome:
        """Atomically check and hold ``req`` for one call."""

    def settle(
        self,
        chain: tuple[str, ...],
        agent: str | None,
        hold_id: str | None,
        actual: Vector,
        *,
        now: float,
        meta: Meta,
        estimated: bool = False,
        cost_known: bool = True,
        usage: Usage | None = None,
    ) -> Outcome:
        """Replace a hold (if still there) by what the call consumed."""

    def release(self, hold_id: str, *, now: float, reason: str) -> bool:
        """Drop a hold without charging it."""

    def renew(self, hold_id: str, ttl: float, now: float) -> bool:
        """Extend a live hold's lease."""

    def held_amounts(self, hold_id: str) -> Vector | None:
        """What a live hold holds, or ``None``."""

    def begin_agent(
        self, chain: tuple[str, ...], agent: str | None, *, now: float, meta: Meta, once: str | None = None
    ) -> Outcome:
        """Take one ``max_agents`` slot if allowed: the decision, and the soft-limit events the start fired.

        With ``once``: a start whose marker was marked (by any worker, see `top_up`) is allowed without a slot.
        """

    def count_tool(self, chain: tuple[str, ...], agent: str | None, tool: str, *, now: float, meta: Meta) -> Outcome:
        """Check and count one tool call: the decision, and the soft-limit events the call fired."""

    def reallocate(
        self, chain: tuple[str, ...], agent: str | None, shortfall: int, *, now: float, meta: Meta
    ) -> int: ...
    def set_confidence(self, chain: tuple[str, ...], agent: str | None, value: float, now: float) -> None:
        """Record ``agent``'s last reported confidence."""

    def top_up(self, key: str, amounts: Vector, now: float, once: str | None = None) -> bool:
        """Raise budget ``key``'s limits by ``amounts``; with ``once``, only the first time (any worker). Applied?"""

    def seen(self, key: str, marker: str, now: float) -> bool:
        """Whether ``marker`` was marked on budget ``key`` (`top_up`'s ``once``) and is still kept. Changes nothing."""

    def record_entry(
        self,
        chain: tuple[str, ...],
        agent: str | None,
        kind: str,
        *,
        now: float,
        meta: Meta,
        decision: Decision | None = None,
        reason: str | None = None,
    ) -> None:
        """Write a ledger entry that changes no counter (skip, external deny)."""

    def figures(self, chain: tuple[str, ...], now: float) -> list[LevelFigures]:
        """Raw figures of every level of ``chain``."""

    def agents(self, key: str, now: float) -> dict[str | None, AgentState]:
        """Copies of budget ``key``'s agent states."""

    def entries(self, scope: str) -> list[LedgerEntry]:
        """Ledger entries whose scopes include ``scope``, in order."""

    def close(self) -> None:
        """Release connections and other resources."""

    def __enter__(self) -> Store: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class AsyncStore(Protocol):
    """Async twins of the `Store` operations one LLM call makes, awaited on the running event loop.

    A store that has them (`RedisStore`, over ``redis.asyncio``) serves `Budget.areserve`,
    `Reservation.asettle`/``arelease`` and ``async with budget.llm_call(...)`` without a worker
    thread; each takes the arguments of its sync operation and returns the same value.
    """

    async def areserve(
        self, chain: tuple[str, ...], agent: str | None, req: Vector, *, gate: bool, hold_id: str, ttl: float,
        now: float, meta: Meta, quiet: bool = False,
    ) -> Outcome:  # fmt: skip
        """`Store.reserve`, awaited."""

    async def asettle(
        self, chain: tuple[str, ...], agent: str | None, hold_id: str | None, actual: Vector, *, now: float,
        meta: Meta, estimated: bool = False, cost_known: bool = True, usage: Usage | None = None,
    ) -> Outcome:  # fmt: skip
        """`Store.settle`, awaited."""

    async def arelease(self, hold_id: str, *, now: float, reason: str) -> bool:
        """`Store.release`, awaited."""

    async def arecord_entry(
        self, chain: tuple[str, ...], agent: str | None, kind: str, *, now: float, meta: Meta,
        decision: Decision | None = None, reason: str | None = None,
    ) -> None:  # fmt: skip
        """`Store.record_entry`, awaited."""

    async def afigures(self, chain: tuple[str, ...], now: float) -> list[LevelFigures]:
        """`Store.figures`, awaited."""

    async def aagents(self, key: str, now: float) -> dict[str | None, AgentState]:
        """`Store.agents`, awaited."""

    async def acheck(self, chain: tuple[str, ...], agent: str | None, now: float) -> Decision:
        """`Store.check`, awaited."""

    async def abegin_agent(
        self, chain: tuple[str, ...], agent: str | None, *, now: float, meta: Meta, once: str | None = None
    ) -> Outcome:
        """`Store.begin_agent`, awaited."""

    async def acount_tool(
        self, chain: tuple[str, ...], agent: str | None, tool: str, *, now: float, meta: Meta
    ) -> Outcome:
        """`Store.count_tool`, awaited."""


REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://", "redis-cluster://", "rediss-cluster://")
"""The URLs `RedisStore` opens: one server (TCP, TLS, Unix socket), or a Cluster through one of its nodes.

Here, not in the Redis module, so that code without redis-py installed can tell them apart.
"""


def checked_ledger_max_len(value: Any, store: str) -> int:
    """A store's ``ledger_max_len`` argument, checked: an int >= 0 (0 keeps every entry)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{store} ledger_max_len must be an int >= 0, got {value!r}")
    return value


def checked_seconds(value: Any, what: str, *, zero: bool = False, none: bool = False) -> Any:
    """A store's timeout argument ``what`` (``"SQLiteStore timeout"``), checked: a finite number of seconds.

    It must be > 0, or >= 0 with ``zero``; ``None`` passes with ``none``. Checked here, as the
    socket or SQLite layer would raise a bare ``ValueError``/``TypeError`` at the first operation.
    """
    if value is None and none:
        return value
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (value >= 0 if zero else value > 0)  # also refuses NaN
        or value == float("inf")
    ):
        bound = (">= 0" if zero else "> 0") + (" or None" if none else "")
        raise ConfigurationError(f"{what} must be a number of seconds {bound}, got {value!r}")
    return value


def checked_name(name: str | None, what: str, store: str) -> None:
    """Refuse a budget or agent name ``store`` cannot keep: one with a lone surrogate has no UTF-8 form."""
    if name is None:
        return
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigurationError(
            f"{store} cannot keep the {what} name {name!r}: it contains a lone surrogate "
            f"({name[exc.start : exc.end]!r}), which is not valid Unicode and has no UTF-8 form"
        ) from None


def unencodable(store: str, exc: UnicodeEncodeError) -> UsageError:
    """The error for a value ``store`` could not encode (a lone surrogate has no UTF-8 form; see `checked_name`)."""
    return UsageError(
        f"{store} cannot keep a value containing {exc.object[exc.start : exc.end]!r} ({exc.encoding}: {exc.reason}); "
        "a lone surrogate is not valid Unicode (check budget, agent, model and tool names, run_id, location, reason)"
    )


def is_async_store(store: object) -> bool:
    """Whether ``store`` has the `AsyncStore` twins (a class attribute check: cheaper than a Protocol isinstance)."""
    return hasattr(type(store), "areserve")


class EngineStore(ABC):
    """A store that runs the shared `Engine` inside a critical section."""

    url: str = ""

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Engine]:
        """Enter the critical section and yield the engine holding the current state."""

    def ensure_budget(self, key: str, name: str, limits: Limits, now: float) -> None:
        from budgetary.core._engine import Level

        checked_name(name, "budget", f"store {self.url}")
        with self._transaction() as engine:
            level = engine.levels.get(key)
            if level is None:
                window = limits.window_seconds
                start = (now // window) * window if window else 0.0
                engine.levels[key] = Level(key, name, limits.as_vector(), limits.warn_at, window, window_start=start)
            else:
                # Another worker (or a restart) constructed the same budget: keep counters,
                # transfers and top-ups; take the limits as constructed now.
                level.base = limits.as_vector()
                level.warn_at = limits.warn_at
                window = limits.window_seconds
                if window != level.window:  # boundaries are UTC multiples of the new window; spend so far stays
                    level.window, level.window_start = window, (now // window) * window if window else 0.0
                level.refresh()
            engine.forget_chains()

    def ensure_agent(self, key: str, contract: AgentContract, *, replace: bool) -> AgentContract | None:
        """Register ``contract``; with ``replace=False`` an existing agent is kept as it is."""
        from budgetary.core._units import COST, TOTAL

        checked_name(contract.name, "agent", f"store {self.url}")
        allocation, reserve = contract.store_units()
        unit = None if contract.unit is None else TOTAL if contract.unit == "tokens" else COST
        with self._transaction() as engine:
            level = engine.levels[key]
            state = level.agents.get(contract.name)
            if state is None:
                level.agents[contract.name] = AgentState(
                    contract.priority, unit, allocation or 0, reserve, contract.confidence_threshold
                )
                return None
            if replace:
                if state.unit != unit:
                    state.unit, state.allocated = unit, allocation or 0
                state.priority = contract.priority
                state.min_reserve = reserve
                state.threshold = contract.confidence_threshold
            return None

    def has_agent(self, key: str, agent: str | None) -> bool:
        with self._transaction() as engine:
            return agent is None or agent in engine.levels[key].agents

    def check(self, chain: tuple[str, ...], agent: str | None, now: float) -> Decision:
        with self._transaction() as engine:
            return engine.check(chain, agent, now)

    def reserve(
        self, chain: tuple[str, ...], agent: str | None, req: Vector, *, gate: bool, hold_id: str, ttl: float,
        now: float, meta: Meta, quiet: bool = False,
    ) -> Outcome:  # fmt: skip
        with self._transaction() as engine:
            return engine.reserve(chain, agent, req, gate=gate, hold_id=hold_id, ttl=ttl, now=now, meta=meta,
                                  quiet=quiet)  # fmt: skip

    def settle(
        self, chain: tuple[str, ...], agent: str | None, hold_id: str | None, actual: Vector, *, now: float,
        meta: Meta, estimated: bool = False, cost_known: bool = True, usage: Usage | None = None,
    ) -> Outcome:  # fmt: skip
        with self._transaction() as engine:
            return engine.settle(chain, agent, hold_id, actual, now=now, meta=meta, estimated=estimated,
                                 cost_known=cost_known, usage=usage)  # fmt: skip

    def release(self, hold_id: str, *, now: float, reason: str) -> bool:
        with self._transaction() as engine:
            return engine.release(hold_id, now=now, reason=reason)

    def renew(self, hold_id: str, ttl: float, now: float) -> bool:
        with self._transaction() as engine:
            return engine.renew(hold_id, ttl, now)

    def held_amounts(self, hold_id: str) -> Vector | None:
        with self._transaction() as engine:
            return engine.held_amounts(hold_id)

    def begin_agent(
        self, chain: tuple[str, ...], agent: str | None, *, now: float, meta: Meta, once: str | None = None
    ) -> Outcome:
        with self._transaction() as engine:
            return engine.begin_agent(chain, agent, now=now, meta=meta, once=once)

    def count_tool(self, chain: tuple[str, ...], agent: str | None, tool: str, *, now: float, meta: Meta) -> Outcome:
        with self._transaction() as engine:
            return engine.count_tool(chain, agent, tool, now=now, meta=meta)

    def reallocate(self, chain: tuple[str, ...], agent: str | None, shortfall: int, *, now: float, meta: Meta) -> int:
        with self._transaction() as engine:
            return engine.reallocate(chain, agent, shortfall, now=now, meta=meta)

    def set_confidence(self, chain: tuple[str, ...], agent: str | None, value: float, now: float) -> None:
        with self._transaction() as engine:
            engine.set_confidence(chain, agent, value, now)

    def top_up(self, key: str, amounts: Vector, now: float, once: str | None = None) -> bool:
        with self._transaction() as engine:
            return engine.top_up(key, amounts, now, once)

    def seen(self, key: str, marker: str, now: float) -> bool:
        with self._transaction() as engine:
            return engine.seen(key, marker, now)

    def record_entry(
        self, chain: tuple[str, ...], agent: str | None, kind: str, *, now: float, meta: Meta,
        decision: Decision | None = None, reason: str | None = None,
    ) -> None:  # fmt: skip
        with self._transaction() as engine:
            engine.note(chain, agent, kind, now=now, meta=meta, decision=decision, reason=reason)

    def figures(self, chain: tuple[str, ...], now: float) -> list[LevelFigures]:
        with self._transaction() as engine:
            return [
                LevelFigures(lv.key, lv.name, lv.limits, list(lv.spent), list(lv.held), lv.window_start, lv.window)
                for lv in engine.levels_of(chain, now)
            ]

    def agents(self, key: str, now: float) -> dict[str | None, AgentState]:
        with self._transaction() as engine:
            level = engine.levels_of((key,), now)[0]
            return {
                name: AgentState(
                    s.priority,
                    s.unit,
                    s.allocated,
                    s.min_reserve,
                    s.threshold,
                    s.confidence,
                    list(s.spent),
                    list(s.held),
                )
                for name, s in level.agents.items()
            }

    def close(self) -> None:  # noqa: B027 - a no-op default; stores with connections override it
        """Release resources; the memory store has none."""

    def __enter__(self) -> EngineStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @abstractmethod
    def entries(self, scope: str) -> list[LedgerEntry]:
        """Ledger entries whose scopes include ``scope``, in order."""


async def off_loop(store: Store, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)``, which calls ``store``, without blocking the event loop.

    For stores without async twins (`AsyncStore`). A memory store operation takes
    microseconds and never waits on I/O, so it runs inline; any other store's (a
    SQLite transaction that may wait for a lock) runs in a worker thread.
    """
    from budgetary.core.stores.memory import MemoryStore

    if isinstance(store, MemoryStore):
        return fn(*args)
    return await asyncio.to_thread(fn, *args)
