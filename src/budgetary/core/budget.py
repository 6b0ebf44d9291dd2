"""`Budget`: limits, agents and a ledger, enforced before every call."""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import logging
import os
import threading
import time
import uuid
import weakref
from asyncio import _get_running_loop, current_task
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from decimal import Decimal
from types import TracebackType
from typing import Any, Literal, TypeVar, cast

from budgetary.core._engine import UNPRICED, AgentState, Meta, Outcome, Vector, user_value, zeros
from budgetary.core._lease import keeper
from budgetary.core._units import COST, DIMENSIONS, IN, LLM, MAX_INT, OUT, TOTAL, nanos_to_usd, usd_to_nanos
from budgetary.core.contract import AgentContract
from budgetary.core.errors import BudgetExceeded, ConfigurationError, UnknownAgent, UsageError, _UsageTypeError
from budgetary.core.estimator import count_tokens, estimate_text_tokens, upper_bound
from budgetary.core.gate import check_fraction
from budgetary.core.guard import ALLOW, Decision, Deny, SoftLimit, combine_guards
from budgetary.core.ledger import Ledger, LedgerEntry
from budgetary.core.limits import Limits, count_unit
from budgetary.core.prices import Price, PriceTable
from budgetary.core.skip import Skipped
from budgetary.core.snapshot import Snapshot
from budgetary.core.stores import MemoryStore, Store, open_store
from budgetary.core.stores.base import AsyncStore, is_async_store, off_loop
from budgetary.core.usage import Usage, coerce_cost, coerce_count

__all__ = ["Budget", "POLICIES", "Policy", "Reservation"]

logger = logging.getLogger("budgetary")

Policy = Literal["deny", "skip", "interrupt", "end"]
POLICIES: tuple[str, ...] = ("deny", "skip", "interrupt", "end")
"""What an adapter does when the budget refuses: raise, skip the work, pause the run, end the run."""

# One close per reservation: its owner and the lease keeper's thread may race to close it (`Reservation._claim`).
_closing = threading.Lock()
# A refusal on one of these may disappear when the cheap upper bound is replaced by an exact count.
_INPUT_SENSITIVE = frozenset({"input_tokens", "total_tokens", "cost_usd", "allocation"})

# Hold ids are a per-budget random prefix and a counter. A forked child inherits both, so parent
# and child would make the same ids against a shared store (a hold written twice, held counters
# that never come back down): each budget gets a new prefix in the child.
_live_budgets: weakref.WeakSet[Budget] = weakref.WeakSet()


def _new_hold_prefixes_after_fork() -> None:
    for budget in list(_live_budgets):
        budget._hold_prefix = uuid.uuid4().hex[:12] + ":"


os.register_at_fork(after_in_child=_new_hold_prefixes_after_fork)

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

_RUN_CONTRACT = AgentContract(name=None)
"""The contract of the agent ``None``, the budget itself (contracts are frozen: one serves every budget)."""


def _refuse_agent(agent: Any) -> None:
    """Raise for an ``agent`` argument no agent can have; return for a str subclass (a `StrEnum` role).

    The run itself is ``None`` and every agent a non-empty string (SPEC §4). Callers test
    ``agent is not None and (type(agent) is not str or not agent)`` inline first, so a valid
    name costs no function call on the per-call paths.
    """
    if isinstance(agent, str):
        if agent:
            return
        raise UsageError("agent must be a non-empty string, or None for the run itself, got ''")
    raise _UsageTypeError(f"agent must be a string, or None for the run itself, got {type(agent).__name__} {agent!r}")


def _refuse_tool(tool: Any) -> None:
    """Raise for a ``tool`` argument that is not a string; return for a str subclass (tested inline first)."""
    if not isinstance(tool, str):
        raise _UsageTypeError(f"tool must be a string (the tool's name), got {type(tool).__name__} {tool!r}")


class Reservation:
    """Budget held for one LLM call until it is settled, released or charged as estimated.

    Example:
        ```python
        r = budget.reserve("writer", model="gpt-4o", messages=msgs, max_output_tokens=500)
        try:
            reply = client.chat(...)
        except Exception:
            r.release()
            raise
        r.settle(reply.usage)  # OpenAI, Anthropic, Gemini, LangChain... shapes
        ```
    """

    __slots__ = (
        "_budget", "_done", "_rates", "_renewed_at", "_req", "_task", "agent", "decision", "events", "hold_id",
        "meta", "model", "provider",
    )  # fmt: skip

    def __init__(
        self, budget: Budget, hold_id: str, agent: str | None, model: str | None, provider: str | None,
        req: Vector, meta: Meta, decision: Decision, rates: Any = None, renewed_at: float = 0.0,
    ) -> None:  # fmt: skip
        self._budget = budget
        self.hold_id = hold_id
        self.agent = agent
        self.model = model
        self.provider = provider
        self._req = req
        self._rates: Any = rates  # the model's rates, when reserve already looked them up
        self.meta = meta
        self.decision = decision
        """`Allow` or `SoftLimit` (the call proceeds either way)."""
        self.events: tuple[SoftLimit, ...] = ()
        """Soft-limit crossings the settle caused (each fires once per threshold and scope)."""
        self._done = False
        self._renewed_at = renewed_at  # when the hold was taken (reserve has just read the clock)
        self._task: Any = None  # the asyncio task that `keep_alive` was called from, if any

    @property
    def done(self) -> bool:
        """True once settled, released or charged."""
        return self._done

    @property
    def estimate(self) -> Usage:
        """What was estimated before the call (prompt tokens and the output reserve)."""
        return Usage(input_tokens=self._req[IN], output_tokens=self._req[OUT])

    def settle(self, usage: Any, *, model: str | None = None, lenient: bool = False) -> LedgerEntry:
        """Replace the hold by what the provider reported (any supported shape).

        With ``lenient=True`` (what adapters use) an unreadable report never
        raises: the estimate is charged instead and flagged ``estimated``.
        """
        parsed = usage if type(usage) is Usage else self._parse(usage, lenient)
        if parsed is None:
            return self.charge_estimate()
        return self._settle(parsed, model or self.model, estimated=False)

    async def asettle(self, usage: Any, *, model: str | None = None, lenient: bool = False) -> LedgerEntry:
        """`settle` for async code: never blocks the event loop (see `Budget.areserve`)."""
        store = self._budget._store
        if not is_async_store(store):
            return await off_loop(store, functools.partial(self.settle, usage, model=model, lenient=lenient))
        parsed = usage if type(usage) is Usage else self._parse(usage, lenient)
        if parsed is None:
            return await self.acharge_estimate()
        return await self._asettle(parsed, model or self.model, estimated=False)

    def _parse(self, usage: Any, lenient: bool) -> Usage | None:
        """The provider's report as a `Usage`; None (lenient) means "charge the estimate"."""
        try:
            return Usage.from_provider(usage)
        except UsageError:
            if not lenient:
                raise
            logger.warning("unreadable usage %r for agent %r; charging the estimate", usage, self.agent)
            return None

    def charge_estimate(self) -> LedgerEntry:
        """Charge the pre-call estimate, flagged ``estimated`` (the call's real usage is unknown)."""
        return self._settle(self.estimate, self.model, estimated=True, actual_cost=self._req[COST])

    def _charge_if_open(self) -> LedgerEntry | None:
        """`charge_estimate` for a call abandoned in flight; None if someone closed it first.

        A cancelled task's hold has two closers: the lease keeper (which sees the task end) and the
        parent run's error handling. Whichever comes second does nothing.
        """
        if not self._claim():
            return None
        return self._settle(self.estimate, self.model, estimated=True, actual_cost=self._req[COST], claimed=True)

    async def _acharge_if_open(self) -> LedgerEntry | None:
        budget = self._budget
        if not is_async_store(budget._store):
            return await off_loop(budget._store, self._charge_if_open)
        if not self._claim():
            return None
        return await self._asettle(self.estimate, self.model, estimated=True, actual_cost=self._req[COST], claimed=True)

    async def acharge_estimate(self) -> LedgerEntry:
        """`charge_estimate` for async code: never blocks the event loop (see `Budget.areserve`)."""
        if not is_async_store(self._budget._store):
            return await off_loop(self._budget._store, self.charge_estimate)
        return await self._asettle(self.estimate, self.model, estimated=True, actual_cost=self._req[COST])

    def _settle(
        self, usage: Usage, model: str | None, *, estimated: bool, actual_cost: int | None = None, claimed: bool = False
    ) -> LedgerEntry:
        """Charge ``usage``; ``claimed``: the caller closed the reservation already (`_claim`)."""
        budget = self._budget
        if usage.cost_usd is not None:
            usage = _as_charged(usage)
        actual, meta, cost_known = self._settle_request(usage, model, actual_cost, claimed)
        outcome = budget._store.settle(
            budget._chain, self.agent, self.hold_id or None, actual, now=budget._clock(), meta=meta,
            estimated=estimated, cost_known=cost_known, usage=usage,
        )  # fmt: skip
        if outcome.events or budget._guards is not None:
            return self._settled(outcome, usage)
        return outcome.entry  # type: ignore[return-value]  # a settle always writes its entry

    async def _asettle(
        self, usage: Usage, model: str | None, *, estimated: bool, actual_cost: int | None = None, claimed: bool = False
    ) -> LedgerEntry:
        """`_settle` with the store's async twin."""
        budget = self._budget
        if usage.cost_usd is not None:
            usage = _as_charged(usage)
        actual, meta, cost_known = self._settle_request(usage, model, actual_cost, claimed)
        outcome = await cast(AsyncStore, budget._store).asettle(
            budget._chain, self.agent, self.hold_id or None, actual, now=budget._clock(), meta=meta,
            estimated=estimated, cost_known=cost_known, usage=usage,
        )  # fmt: skip
        return self._settled(outcome, usage)

    def _settle_request(
        self, usage: Usage, model: str | None, actual_cost: int | None, claimed: bool
    ) -> tuple[Vector, Meta, bool]:
        """Close the reservation and say what the store charges: (counters, meta, whether the cost is known)."""
        if not claimed and not self._claim():
            raise UsageError(f"reservation {self.hold_id} for agent {self.agent!r} was already closed")
        budget = self._budget
        unpriced = usage.cost_usd is None
        if actual_cost:
            nanos: int | None = actual_cost
        elif unpriced and self._rates is not None and model == self.model:
            nanos = self._rates.cost_nanos(usage)  # priced at reserve time: no second lookup
        else:
            nanos = budget._prices.cost_nanos(usage, model, self.provider)
        # The store prices ``usage`` from ``actual``'s nano-dollars when it has no cost of its own.
        actual = (
            [usage.input_tokens, usage.output_tokens, usage.total_tokens, 0, 1, 0, 0, 1]
            if nanos is None
            else [usage.input_tokens, usage.output_tokens, usage.total_tokens, nanos, 1, 0, 0, 0]
        )
        meta = self.meta if model == self.meta.model else Meta(self.meta.run_id, model, self.meta.location)
        return actual, meta, nanos is not None

    def _settled(self, outcome: Outcome, usage: Usage) -> LedgerEntry:
        """The ledger entry of a settle, after telling soft-limit listeners and host guards."""
        budget = self._budget
        entry = outcome.entry
        assert entry is not None
        if outcome.events:
            self.events = tuple(outcome.events)
        if outcome.events or budget._guards is not None:
            budget._after(outcome, self.agent, entry.usage or usage)
        return entry

    def release(self, reason: str = "call failed", *, failed: bool = True) -> None:
        """Give the hold back without charging (the call failed before the provider billed it).

        ``failed=False``: the call did not fail, it never reached the provider (an LLM-cache hit, a
        refusal elsewhere) or another hold charges it; ``charge_failed_calls`` does not apply.
        """
        if self._done:
            return
        budget = self._budget
        if failed and budget.charge_failed_calls:
            self._charge_if_open()
            return
        if self._claim():
            budget._store.release(self.hold_id, now=budget._clock(), reason=reason)

    async def arelease(self, reason: str = "call failed", *, failed: bool = True) -> None:
        """`release` for async code: never blocks the event loop (see `Budget.areserve`)."""
        budget = self._budget
        if not is_async_store(budget._store):
            await off_loop(budget._store, functools.partial(self.release, reason, failed=failed))
            return
        if self._done:
            return
        if failed and budget.charge_failed_calls:
            await self._acharge_if_open()
            return
        if self._claim():
            await cast(AsyncStore, budget._store).arelease(self.hold_id, now=budget._clock(), reason=reason)

    def _claim(self) -> bool:
        """Close the reservation (settled or released: no more renewals); False if it was closed already."""
        with _closing:
            if self._done:
                return False
            self._done = True
        keeper.live.pop(self.hold_id, None)
        return True

    def keep_alive(self) -> Reservation:
        """Renew the hold in the background until this reservation is settled or released.

        For owners that cannot renew it while the call runs (``llm_call`` blocks and the
        framework adapters use it): a call that outlasts ``lease_ttl`` keeps its hold, and only
        a dead worker's holds expire. Called from a coroutine, renewal stops when its task ends,
        and the hold is charged as its estimate at once if the task was cancelled before settling
        it (a LangGraph branch cancelled because a sibling failed gets no end or error event, and
        its provider call may already be billed).
        Returns the reservation.
        """
        if not self._done:
            task = self._task = current_task() if _get_running_loop() is not None else None
            keeper.live[self.hold_id] = self
            if task is not None:
                keeper.watch(task)
            if self._budget.lease_ttl < keeper.ttl_floor:
                keeper.poke()
        return self

    def renew(self) -> bool:
        """Extend the hold's lease (long calls); False if it had already expired."""
        budget = self._budget
        self._renewed_at = now = budget._clock()
        return budget._store.renew(self.hold_id, budget.lease_ttl, now)

    @property
    def ttl(self) -> float:
        """The lease's time to live, in seconds."""
        return self._budget.lease_ttl

    def lease_age(self) -> float:
        """Seconds since the hold was taken or last renewed."""
        return self._budget._clock() - self._renewed_at


class _LLMCall:
    """``with``/``async with`` block around one reservation."""

    __slots__ = ("_args", "_budget", "_reservation")

    def __init__(self, budget: Budget, args: tuple[Any, ...]) -> None:
        self._budget = budget
        self._args = args
        self._reservation: Reservation | None = None

    def __enter__(self) -> Reservation:
        # The call is live while the block runs: the keeper renews its lease.
        self._reservation = reservation = self._budget._reserve(*self._args).keep_alive()
        return reservation

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        r = self._reservation
        if r is None or r._done:
            return  # settled in the block (or never reserved); settling took it off the keeper
        if exc_type is None:
            r._charge_if_open()  # the caller forgot to settle: charge what was held
        else:
            r.release(f"call failed: {exc_type.__name__}")

    async def __aenter__(self) -> Reservation:
        budget = self._budget
        if not is_async_store(budget._store):
            return await off_loop(budget._store, self.__enter__)
        self._reservation = reservation = (await budget._areserve(*self._args)).keep_alive()
        return reservation

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        budget = self._budget
        if not is_async_store(budget._store):
            await off_loop(budget._store, self.__exit__, exc_type, exc, tb)
            return
        r = self._reservation
        if r is None or r._done:
            return
        if exc_type is None:
            await r._acharge_if_open()
        else:
            await r.arelease(f"call failed: {exc_type.__name__}")


class Budget:
    """A budget: limits on a run (or a tenant, a day), agents with contracts, and a ledger.

    Example:
        ```python
        budget = Budget(Limits(max_total_tokens=100_000, max_cost_usd=2), name="run")
        budget.agent("researcher", priority=3, max_tokens=40_000)
        with budget.llm_call("researcher", model="gpt-4o", messages=msgs, max_output_tokens=500) as call:
            reply = client.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=500)
            call.settle(reply.usage)
        print(budget.report())
        ```

    Args:
        limits: The caps; ``None`` means unbounded.
        name: The budget's name (shown in refusals and the ledger).
        mode: ``"reserve"`` (hold an estimate before each call; never exceeded when the provider
            honours ``max_tokens``) or ``"gate"`` (allow while nothing is exhausted).
        parent: A parent budget (tenant, day) charged with everything this one spends. Children of one
            parent with one name are one budget (they share counters, holds and agents): while one
            lives in this process, building another with other `Limits` raises `ConfigurationError`
            rather than silently changing the first's limits.
        guards: Host guards (see `BudgetGuard`); every one must allow.
        store: A store, its URL, or a redis-py client (sync, cluster or asyncio); default: the
            parent's store, else a new ``memory://``. A child shares its parent's store: it may be
            given that store or its URL (not ``memory://``, which opens a new store), nothing else.
        on_exhausted: What adapters do on a refusal: ``deny``, ``skip``, ``interrupt`` or ``end``.
        on_soft_limit: Called once per ``warn_at`` crossing per scope with the `SoftLimit`.
        default_output_reserve: Output tokens held for a call that sets no ``max_tokens``.
        lease_ttl: Seconds a hold lives unless renewed; a dead worker's holds free themselves.
        charge_failed_calls: Charge a failed call's hold instead of releasing it.
        allow_unpriced: Under a USD cap, allow models with no known price (their cost is unknown).
            Default (``None``): the parent's setting, else ``False``; ``True`` or ``False`` overrides it.
        prices: Per-model price overrides (`Price` or a mapping of its fields).
        clock: Seconds since the epoch; inject one in tests. Default: the parent's clock, else
            `time.time` (one family keeps one time: its window and lease arithmetic mixes them).
        run_id: Tag for ledger entries; default a new random id.
    """

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        name: str = "budget",
        mode: Literal["reserve", "gate"] = "reserve",
        parent: Budget | None = None,
        guards: Iterable[Any] | None = None,
        store: str | Store | Any | None = None,
        on_exhausted: Policy = "deny",
        on_soft_limit: Callable[[SoftLimit], Any] | None = None,
        default_output_reserve: int = 1024,
        lease_ttl: float = 60.0,
        charge_failed_calls: bool = False,
        allow_unpriced: bool | None = None,
        prices: Mapping[str, Price | Mapping[str, Any]] | None = None,
        clock: Callable[[], float] | None = None,
        run_id: str | None = None,
    ) -> None:
        if limits is None:
            limits = Limits()
        if not isinstance(limits, Limits):
            raise ConfigurationError(f"limits must be a Limits, got {type(limits).__name__}")
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"name must be a non-empty string, got {name!r}")
        if type(name) is not str:  # a str subclass (a StrEnum member): every store keeps the plain string
            name = str.__str__(name)
        if mode not in ("reserve", "gate"):
            raise ConfigurationError(f"mode must be 'reserve' or 'gate', got {mode!r}")
        if on_exhausted not in POLICIES:
            raise ConfigurationError(f"on_exhausted must be one of {POLICIES}, got {on_exhausted!r}")
        if parent is not None and not isinstance(parent, Budget):
            raise ConfigurationError(f"parent must be a Budget, got {type(parent).__name__}")
        if isinstance(lease_ttl, bool) or not isinstance(lease_ttl, (int, float)) or not lease_ttl > 0:
            raise ConfigurationError(f"lease_ttl must be a positive number of seconds, got {lease_ttl!r}")
        if not isinstance(charge_failed_calls, bool):  # a truthy "no" must not turn the option on
            raise ConfigurationError(f"charge_failed_calls must be True or False, got {charge_failed_calls!r}")
        if allow_unpriced is None:
            # A child runs under its parent's USD caps: it keeps the parent's opt-in (or opt-out) unless given its own.
            allow_unpriced = parent.allow_unpriced if parent is not None else False
        elif not isinstance(allow_unpriced, bool):
            raise ConfigurationError(f"allow_unpriced must be True, False or None (inherit), got {allow_unpriced!r}")
        if clock is None:
            clock = parent._clock if parent is not None else time.time
        hooks: dict[str, object] = {"on_soft_limit": on_soft_limit, "clock": clock}
        for hook, value in hooks.items():
            if value is not None and not callable(value):
                raise ConfigurationError(f"{hook} must be callable, got {value!r}")
        if run_id is not None and not isinstance(run_id, str):
            raise ConfigurationError(f"run_id must be a string, got {run_id!r}")
        guards = _checked_guards(guards)
        self.name = name
        self.mode = mode
        self.parent = parent
        self.on_exhausted: Policy = on_exhausted
        self.default_output_reserve = _config_count(default_output_reserve, "default_output_reserve")
        self.lease_ttl = float(lease_ttl)
        self.charge_failed_calls = charge_failed_calls
        self.allow_unpriced: bool = allow_unpriced
        self.run_id = run_id or uuid.uuid4().hex
        self._limits = limits
        self._clock: Callable[[], float] = clock
        self._gate = mode == "gate"
        # One table prices a charge for every level: a child's overrides add to its parent's and win.
        self._prices: PriceTable = PriceTable(prices) if parent is None else parent._prices.extended(prices)
        self._guards = combine_guards(guards) if guards else None
        self._listeners: list[Callable[[SoftLimit], Any]] = [on_soft_limit] if on_soft_limit else []
        self._contracts: dict[str | None, AgentContract] = {}
        self._allocations: dict[str, tuple[str | None, int | Decimal | None]] = {}
        """What `agent` registered each name with here: (unit, amount)."""
        self._hold_prefix = uuid.uuid4().hex[:12] + ":"
        self._hold_seq = itertools.count(1)
        _live_budgets.add(self)
        self._metas: dict[tuple[str, str | None, str | None], Meta] = {}

        if parent is None:
            self._path: tuple[str, ...] = (name,)
            self._store = open_store(store)
            # The URL the store was opened from: a child given it again shares the store, even where the
            # store's own `url` spells it differently (a Redis password masked, a SQLite file name unescaped).
            self._store_from: str | None = store if isinstance(store, str) else None
        else:
            self._path = (*parent._path, name)
            self._store_from = parent._store_from
            if store is not None and store is not parent._store and not _names_store(store, parent):
                raise ConfigurationError(
                    f"budget {name!r} must live in its parent's store ({parent._store.url}) so that one "
                    "atomic step can check every level"
                )
            self._store = parent._store
        # Names are data: JSON-encoding the path keeps any character in a name from reaching another key.
        self._key = json.dumps(self._path, ensure_ascii=False)
        self._chain: tuple[str, ...] = (self._key, *(parent._chain if parent else ()))
        self._cost_capped: bool = limits.max_cost_usd is not None or (parent is not None and parent._cost_capped)
        if parent is not None:
            _claim_child(self, limits)
        self._store.ensure_budget(self._key, name, limits, clock())

    # -- configuration -----------------------------------------------------------------

    @property
    def store(self) -> Store:
        """Where this budget's state lives."""
        return self._store

    @property
    def limits(self) -> Limits:
        """The limits in force, including top-ups."""
        return self.snapshot().limits

    @property
    def ledger(self) -> Ledger:
        """This budget's entries and its child budgets'."""
        return Ledger(self._store, self._key, self.name)

    def agent(
        self,
        name: str | None,
        *,
        priority: int = 1,
        max_tokens: int | None = None,
        max_cost_usd: Decimal | int | float | str | None = None,
        min_reserve: int | Decimal | float | str | None = None,
        confidence_threshold: float | None = None,
    ) -> AgentContract:
        """Register an agent with its contract (see `AgentContract`) and return the contract.

        An allocation changes only by transfers (SPEC §5). Registering a name that is already
        registered updates its priority, ``min_reserve`` and ``confidence_threshold`` and keeps the
        allocation the store holds (transfers included); the returned contract, `contract` and
        `report` all show that allocation. So this `Budget` registering a name again with another
        allocation than it gave it before (another amount or unit) raises `ConfigurationError`
        rather than being silently ignored. Another `Budget` of the same budget (a worker, a
        restart) cannot tell a new allocation from transfers, so it gets the stored allocation,
        except that registering another unit replaces it.

        ``name`` is a non-empty string: the run itself (``None`` elsewhere) has no contract,
        its `Limits` are its caps.
        """
        if name is None:
            raise ConfigurationError(
                "agent name must be a non-empty string, got None (None is the run itself, which has no contract: "
                "its caps are the budget's Limits)"
            )
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"agent name must be a non-empty string, got {name!r}")
        contract = AgentContract(
            name=name,
            priority=priority,
            max_tokens=max_tokens,
            max_cost_usd=cast(Any, max_cost_usd),
            min_reserve=cast(Any, min_reserve),
            confidence_threshold=confidence_threshold,
        )
        asked = (contract.unit, contract.allocation)
        given = self._allocations.get(name)
        if given is not None and given != asked:
            raise ConfigurationError(
                f"agent {name!r} is already registered with {_allocation_text(*given)}: an allocation changes "
                f"only by transfers (budget.reallocate), so it cannot be registered again with "
                f"{_allocation_text(*asked)}"
            )
        self._store.ensure_agent(self._key, contract, replace=True)
        self._allocations[name] = asked
        # The store may hold another allocation (transfers, another worker's registration): keep and
        # return its contract, so that this object never reads an allocation the store does not enforce.
        contract = self._contracts[name] = self._stored_contract(name) or contract
        return contract

    def ensure_agent(self, name: str | None) -> AgentContract:
        """Return ``name``'s contract, registering it with no allocation if it is new (for adapters).

        ``None`` is the budget itself, which always exists: nothing is registered for it.
        """
        if name is None:
            return self.contract(None)
        if type(name) is not str or not name:
            _refuse_agent(name)
        contract = self._contracts.get(name)
        if contract is None:
            # Another worker may have registered the name with an allocation: replace=False keeps theirs,
            # and the contract kept here is the one the store holds, never a blank one over it.
            self._store.ensure_agent(self._key, AgentContract(name=name), replace=False)
            contract = self._contracts[name] = self._stored_contract(name) or AgentContract(name=name)
        return contract

    async def aensure_agent(self, name: str | None) -> AgentContract:
        """`ensure_agent` for async code: a new agent is registered off the event loop."""
        if name is not None and (type(name) is not str or not name):
            _refuse_agent(name)
        if name is None or name in self._contracts:
            return self.ensure_agent(name)  # nothing to register
        return await off_loop(self._store, self.ensure_agent, name)

    def contract(self, name: str | None) -> AgentContract:
        """The contract registered for ``name`` (here or by another worker sharing the store); raises `UnknownAgent`.

        Read from the store, so it shows the allocation in force: transfers (`reallocate`, or the
        reallocation a call or an overrun triggered) change it after registration. The same
        contract object is returned while nothing changed.
        """
        if name is not None and (type(name) is not str or not name):
            _refuse_agent(name)
        if name is None:
            return _RUN_CONTRACT
        kept = self._contracts.get(name)
        stored = self._stored_contract(name)
        if stored is None:
            if kept is None:
                raise UnknownAgent(name, self.name)
            return kept
        if kept is not None and stored == kept:
            return kept  # the same object while nothing changed
        self._contracts[name] = stored
        return stored

    def has_agent(self, name: str | None) -> bool:
        """Whether ``name`` is registered (here or by another worker sharing the store)."""
        if name is not None and (type(name) is not str or not name):
            _refuse_agent(name)
        return name is None or name in self._contracts or self._store.has_agent(self._key, name)

    def add_soft_limit_listener(self, listener: Callable[[SoftLimit], Any]) -> Callable[[], None]:
        """Call ``listener`` on every soft-limit crossing; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    # -- decisions ---------------------------------------------------------------------

    def check(self, agent: str | None = None) -> Decision:
        """Could an LLM call for ``agent`` start now? Changes nothing (counts what reallocation could bring)."""
        if agent is not None and (type(agent) is not str or not agent):
            _refuse_agent(agent)
        return self._with_host_check(self._store.check(self._chain, agent, self._clock()), agent)

    async def acheck(self, agent: str | None = None) -> Decision:
        """`check` for async code: never blocks the event loop (see `areserve`)."""
        if agent is not None and (type(agent) is not str or not agent):
            _refuse_agent(agent)
        store = self._store
        if not is_async_store(store):
            return await off_loop(store, self.check, agent)
        return self._with_host_check(await cast(AsyncStore, store).acheck(self._chain, agent, self._clock()), agent)

    def _with_host_check(self, decision: Decision, agent: str | None) -> Decision:
        """The host guards' answer when it is stricter than the budget's ``decision``."""
        if decision.allowed and self._guards is not None:
            host = self._guards.check_before_llm(agent, 0)
            if not host.allowed or (isinstance(host, SoftLimit) and not isinstance(decision, SoftLimit)):
                return host
        return decision

    def begin_agent(
        self, agent: str | None = None, *, run_id: str | None = None, location: str | None = None,
        once: str | None = None,
    ) -> Decision:  # fmt: skip
        """The spawn gate: take one ``max_agents`` slot for ``agent`` if allowed. Never raises on refusal.

        ``once`` names the start (a task's id): if that name was marked on this budget (`mark`, by
        any worker sharing the store), the start is allowed without taking a slot: the task already
        took one before it was interrupted, and is re-run on resume.
        """
        if agent is not None and (type(agent) is not str or not agent):
            _refuse_agent(agent)
        meta = Meta(run_id or self.run_id, None, location)
        marker = _once_marker(once)
        return self._counted(self._store.begin_agent(self._chain, agent, now=self._clock(), meta=meta, once=marker))

    async def abegin_agent(
        self, agent: str | None = None, *, run_id: str | None = None, location: str | None = None,
        once: str | None = None,
    ) -> Decision:  # fmt: skip
        """`begin_agent` for async code: never blocks the event loop (see `areserve`)."""
        if agent is not None and (type(agent) is not str or not agent):
            _refuse_agent(agent)
        store = self._store
        if not is_async_store(store):
            call = functools.partial(self.begin_agent, agent, run_id=run_id, location=location, once=once)
            return await off_loop(store, call)
        meta = Meta(run_id or self.run_id, None, location)
        marker = _once_marker(once)
        return self._counted(
            await cast(AsyncStore, store).abegin_agent(self._chain, agent, now=self._clock(), meta=meta, once=marker)
        )

    def check_tool(self, agent: str | None = None, tool: str = "tool", *, run_id: str | None = None) -> Decision:
        """Decide a tool call for ``agent`` and, when it is allowed, count it (``tool`` is the tool's name)."""
        if agent is not None and (type(agent) is not str or not agent):
            _refuse_agent(agent)
        if type(tool) is not str:
            _refuse_tool(tool)
        meta = Meta(run_id or self.run_id, None, tool)
        host = self._host_tool_refusal(agent, tool)
        if host is not None:
            self._store.record_entry(self._chain, agent, "deny", now=self._clock(), meta=meta, decision=host)
            return host
        return self._counted(self._store.count_tool(self._chain, agent, tool, now=self._clock(), meta=meta))

    async def acheck_tool(self, agent: str | None = None, tool: str = "tool", *, run_id: str | None = None) -> Decision:
        """`check_tool` for async code: never blocks the event loop (see `areserve`)."""
        if agent is not None and (type(agent) is not str or not agent):
            _refuse_agent(agent)
        if type(tool) is not str:
            _refuse_tool(tool)
        store = self._store
        if not is_async_store(store):
            return await off_loop(store, functools.partial(self.check_tool, agent, tool, run_id=run_id))
        astore, meta = cast(AsyncStore, store), Meta(run_id or self.run_id, None, tool)
        host = self._host_tool_refusal(agent, tool)
        if host is not None:
            await astore.arecord_entry(self._chain, agent, "deny", now=self._clock(), meta=meta, decision=host)
            return host
        return self._counted(await astore.acount_tool(self._chain, agent, tool, now=self._clock(), meta=meta))

    def _record_refusal(self, decision: Decision, agent: str | None) -> None:
        """The ``deny`` entry of a refusal an adapter acts on that no store step wrote (`check` writes none)."""
        self._store.record_entry(
            self._chain, agent, "deny", now=self._clock(), meta=Meta(self.run_id), decision=decision
        )

    async def _arecord_refusal(self, decision: Decision, agent: str | None) -> None:
        store = self._store
        if not is_async_store(store):
            await off_loop(store, self._record_refusal, decision, agent)
            return
        await cast(AsyncStore, store).arecord_entry(
            self._chain, agent, "deny", now=self._clock(), meta=Meta(self.run_id), decision=decision
        )

    def _host_tool_refusal(self, agent: str | None, tool: str) -> Decision | None:
        """The host guards' refusal of a tool call, if any."""
        if self._guards is None:
            return None
        host = self._guards.check_before_tool(agent, tool)
        return None if host.allowed else host

    def reserve(
        self,
        agent: str | None = None,
        *,
        model: str | None = None,
        messages: Any = None,
        prompt_tokens: int | None = None,
        max_output_tokens: int | None = None,
        provider: str | None = None,
        run_id: str | None = None,
        location: str | None = None,
    ) -> Reservation:
        """Hold budget for one LLM call, or raise `BudgetExceeded`.

        The hold is the prompt (``prompt_tokens``, or an estimate of
        ``messages``) plus ``max_output_tokens`` (or ``default_output_reserve``),
        priced for ``model``. Prefer `llm_call`, which also settles or releases.
        """
        if agent is not None and (type(agent) is not str or not agent):
            _refuse_agent(agent)
        return self._reserve(agent, model, messages, prompt_tokens, max_output_tokens, provider, run_id, location)

    async def areserve(
        self,
        agent: str | None = None,
        *,
        model: str | None = None,
        messages: Any = None,
        prompt_tokens: int | None = None,
        max_output_tokens: int | None = None,
        provider: str | None = None,
        run_id: str | None = None,
        location: str | None = None,
    ) -> Reservation:
        """`reserve` for async code: never blocks the event loop.

        A store with async twins (`AsyncStore`: Redis) is awaited on the running loop; SQLite is
        called in a worker thread, the memory store inline (it takes microseconds).
        """
        if agent is not None and (type(agent) is not str or not agent):
            _refuse_agent(agent)
        args = (agent, model, messages, prompt_tokens, max_output_tokens, provider, run_id, location)
        if is_async_store(self._store):
            return await self._areserve(*args)
        return await off_loop(self._store, self._reserve, *args)

    def _reserve(
        self, agent: str | None, model: str | None, messages: Any, prompt_tokens: int | None,
        max_output_tokens: int | None, provider: str | None, run_id: str | None, location: str | None,
        unpriced_ok: bool = False,
    ) -> Reservation:  # fmt: skip
        req, meta, rates, exact, early = self._reserve_request(
            agent, model, messages, prompt_tokens, max_output_tokens, provider, run_id, location, unpriced_ok
        )
        store, chain = self._store, self._chain
        if early is not None and not early.allowed:
            store.record_entry(chain, agent, "deny", now=self._clock(), meta=meta, decision=early)
            raise self._exceeded(early, agent)
        hold_id = f"{self._hold_prefix}{next(self._hold_seq)}"
        now = self._clock()
        outcome = store.reserve(chain, agent, req, gate=self._gate, hold_id=hold_id, ttl=self.lease_ttl,
                                now=now, meta=meta, quiet=not exact)  # fmt: skip
        if not outcome.decision.allowed and not exact:
            req = self._exact_request(outcome.decision, messages, model, req, rates)
            outcome = store.reserve(chain, agent, req, gate=self._gate, hold_id=hold_id, ttl=self.lease_ttl,
                                    now=now, meta=meta)  # fmt: skip
        if not outcome.decision.allowed:
            raise self._exceeded(outcome.decision, agent)
        decision = outcome.decision if early is None else _stricter(outcome.decision, early)
        return Reservation(self, hold_id, agent, model, provider, req, meta, decision, rates, now)

    async def _areserve(
        self, agent: str | None, model: str | None, messages: Any, prompt_tokens: int | None,
        max_output_tokens: int | None, provider: str | None, run_id: str | None, location: str | None,
    ) -> Reservation:  # fmt: skip
        """`_reserve` with the store's async twins (see `AsyncStore`): the same steps, awaited."""
        if agent is not None and agent not in self._contracts and not self._cost_capped:
            # `_usd_agent` must not read the store on the event loop: read the contract here, awaited.
            # A name the store does not know is one it would refuse: refuse it the same way.
            if self._remember(agent, await self._astored_contract(agent)) is None:
                raise UnknownAgent(agent, self.name)
        req, meta, rates, exact, early = self._reserve_request(
            agent, model, messages, prompt_tokens, max_output_tokens, provider, run_id, location, False
        )
        store, chain = cast(AsyncStore, self._store), self._chain
        if early is not None and not early.allowed:
            await store.arecord_entry(chain, agent, "deny", now=self._clock(), meta=meta, decision=early)
            raise await self._aexceeded(early, agent)
        hold_id = f"{self._hold_prefix}{next(self._hold_seq)}"
        now = self._clock()
        outcome = await store.areserve(chain, agent, req, gate=self._gate, hold_id=hold_id, ttl=self.lease_ttl,
                                       now=now, meta=meta, quiet=not exact)  # fmt: skip
        if not outcome.decision.allowed and not exact:
            req = self._exact_request(outcome.decision, messages, model, req, rates)
            outcome = await store.areserve(chain, agent, req, gate=self._gate, hold_id=hold_id, ttl=self.lease_ttl,
                                           now=now, meta=meta)  # fmt: skip
        if not outcome.decision.allowed:
            raise await self._aexceeded(outcome.decision, agent)
        decision = outcome.decision if early is None else _stricter(outcome.decision, early)
        return Reservation(self, hold_id, agent, model, provider, req, meta, decision, rates, now)

    def _reserve_for(
        self, agent: str | None, model: str | None, messages: Any, max_output_tokens: int | None, location: str | None
    ) -> Reservation:
        """`reserve` for the framework adapters, which pass checked arguments: registers a new agent first."""
        if agent is not None and agent not in self._contracts:
            self.ensure_agent(agent)
        return self._reserve(agent, model, messages, None, max_output_tokens, None, None, location)

    async def _areserve_for(
        self, agent: str | None, model: str | None, messages: Any, max_output_tokens: int | None, location: str | None
    ) -> Reservation:
        """`_reserve_for` for async code: never blocks the event loop (see `areserve`)."""
        if agent is not None and agent not in self._contracts:
            await self.aensure_agent(agent)
        return await self.areserve(
            agent, model=model, messages=messages, max_output_tokens=max_output_tokens, location=location
        )

    def _reserve_request(
        self, agent: str | None, model: str | None, messages: Any, prompt_tokens: int | None,
        max_output_tokens: int | None, provider: str | None, run_id: str | None, location: str | None,
        unpriced_ok: bool,
    ) -> tuple[Vector, Meta, Any, bool, Decision | None]:  # fmt: skip
        """What a reservation asks the store for: (request, meta, rates, exact, the host guards' Deny or SoftLimit)."""
        if prompt_tokens is not None:
            # The common case (a plain non-negative int) skips the general coercion.
            prompt = (
                prompt_tokens
                if type(prompt_tokens) is int and 0 <= prompt_tokens <= MAX_INT
                else coerce_count(prompt_tokens, "prompt_tokens")
            )
            exact = True
        elif messages is not None:
            prompt, exact = upper_bound(messages), False
        else:
            prompt, exact = 0, True
        if max_output_tokens is None:
            out = self.default_output_reserve
        elif type(max_output_tokens) is int and 0 <= max_output_tokens <= MAX_INT:
            out = max_output_tokens
        else:
            out = coerce_count(max_output_tokens, "max_output_tokens")
        # Calls of one run repeat a few (model, location) pairs: reuse their Meta.
        key = (run_id or self.run_id, model, location)
        meta = self._metas.get(key)
        if meta is None:
            if len(self._metas) >= 256:
                self._metas.clear()
            meta = self._metas[key] = Meta(*key)
        host: Decision | None = None
        if self._guards is not None:
            host = self._guards.check_before_llm(agent, prompt)
            if not host.allowed:
                return [], meta, None, exact, host
            host = host if isinstance(host, SoftLimit) else None
        rates = None
        if self._cost_capped or self._usd_agent(agent):
            rates = self._prices.rates(model, provider)
            if rates is None and not (self.allow_unpriced or unpriced_ok):
                return [], meta, rates, exact, self._unpriced_refusal(agent, model)
        return _request(prompt, out, rates), meta, rates, exact, host

    def _unpriced_refusal(self, agent: str | None, model: str | None) -> Deny:
        """Why a call of a model with no price cannot run under a USD limit, and what to do about it."""
        capped: Budget | None = self
        while capped is not None and capped.limits.max_cost_usd is None:
            capped = capped.parent
        if capped is not None:
            where, budget = f"budget {capped.name!r} has a USD limit", capped.name
        else:
            where, budget = f"agent {agent!r} has a USD allocation", self.name
        if model is None:
            fix = "Name the model the call uses (model=...)"
        else:
            fix = f"Pass prices={{{model!r}: Price(input_mtok=..., output_mtok=...)}} to Budget"
        return Deny(
            resource="cost_usd",
            reason=(
                f"{'the call names no model' if model is None else f'model {model!r} has no known price'} and "
                f"{where}, so its cost cannot be checked. {fix}, or allow_unpriced=True to let it run uncounted."
            ),
            budget=budget,
            agent=agent,
        )

    @staticmethod
    def _exact_request(decision: Decision, messages: Any, model: str | None, req: Vector, rates: Any) -> Vector:
        """What to ask for again after the cheap byte bound was refused (quietly).

        With the exact (tiktoken) prompt count when the refused resource depends on the prompt;
        otherwise the same request, whose refusal this time goes to the ledger.
        """
        if decision.resource not in _INPUT_SENSITIVE:
            return req
        return _request(min(count_tokens(messages, model), req[IN]), req[OUT], rates)

    def llm_call(
        self,
        agent: str | None = None,
        *,
        model: str | None = None,
        messages: Any = None,
        prompt_tokens: int | None = None,
        max_output_tokens: int | None = None,
        provider: str | None = None,
        run_id: str | None = None,
        location: str | None = None,
    ) -> _LLMCall:
        """A ``with`` (or ``async with``) block around one LLM call.

        Entering reserves (or raises `BudgetExceeded`); call ``settle(usage)`` on
        the yielded `Reservation`. Leaving without a settle charges the hold as
        an estimate; leaving by an exception releases it.
        """
        if agent is not None and (type(agent) is not str or not agent):
            _refuse_agent(agent)
        return _LLMCall(self, (agent, model, messages, prompt_tokens, max_output_tokens, provider, run_id, location))

    def record(
        self,
        agent: str | None = None,
        usage: Any = None,
        *,
        model: str | None = None,
        provider: str | None = None,
        estimated: bool = False,
        run_id: str | None = None,
        location: str | None = None,
    ) -> LedgerEntry:
        """Charge usage that happened without a reservation (after the fact); never refuses."""
        if agent is not None and (type(agent) is not str or not agent):
            _refuse_agent(agent)
        if usage is None:
            raise UsageError("record() needs the usage to charge")
        parsed = Usage.from_provider(usage)
        # A reservation with no hold id: settling it only charges.
        charge = Reservation(self, "", agent, model, provider, zeros(), Meta(run_id or self.run_id, model, location),
                             ALLOW)  # fmt: skip
        return charge._settle(parsed, model, estimated=estimated)

    def set_confidence(self, agent: str | None, confidence: float) -> None:
        """Report ``agent``'s confidence in its work, for the confidence gate."""
        if agent is not None and (type(agent) is not str or not agent):
            _refuse_agent(agent)
        try:
            value = check_fraction(confidence, "confidence")
        except ConfigurationError as exc:
            raise UsageError(str(exc)) from None
        self._store.set_confidence(self._chain, agent, value, self._clock())

    def reallocate(self, agent: str | None, shortfall: int | Decimal | float | str) -> int | Decimal:
        """Pull up to ``shortfall`` (in ``agent``'s unit) from less important agents; return what moved."""
        if agent is not None and (type(agent) is not str or not agent):
            _refuse_agent(agent)
        contract = self._contracts.get(agent) or self.contract(agent)  # only its unit is read
        if contract.unit == "usd":
            amount = coerce_cost(shortfall, "shortfall")
            units = usd_to_nanos(amount) if amount is not None else 0
        else:
            units = coerce_count(shortfall, "shortfall")
        moved = self._store.reallocate(self._chain, agent, units, now=self._clock(), meta=Meta(self.run_id))
        return nanos_to_usd(moved) if contract.unit == "usd" else moved

    def top_up(self, *, once: str | None = None, **amounts: int | Decimal | float | str) -> bool:
        """Raise this budget's limits by ``amounts`` (``total_tokens=10_000, cost_usd=1, llm_calls=5``).

        The limits stay raised: on a windowed budget, for the windows that follow too. With
        ``once="<name>"`` the top-up is applied the first time that name is used on this budget, by
        any worker sharing the store, and ignored after that (for answers a resumed run replays;
        names are kept 30 days). Returns whether it was applied. A resource this budget sets no
        limit on stays unlimited (a parent's limit is raised on the parent): that is logged.
        """
        vector = top_up_vector(amounts)
        applied = self._store.top_up(self._key, vector, self._clock(), _once_marker(once))
        asked = zip(DIMENSIONS, vector[: len(DIMENSIONS)], strict=True)
        unlimited = [r for r, v in asked if v and getattr(self.limits, f"max_{r}") is None]
        if applied and unlimited:
            logger.warning(
                "budget %r has no limit on %s: top_up(%s) changed nothing there (top up the budget that sets it)",
                self.name, ", ".join(unlimited), ", ".join(f"{r}=..." for r in unlimited),
            )  # fmt: skip
        return applied

    def mark(self, name: str) -> bool:
        """Mark ``name`` on this budget, for every worker sharing the store; False if it was marked already.

        Marks are what ``once`` reads (`top_up`, `begin_agent`): a step that a resumed run replays
        is applied the first time only. They are kept 30 days.
        """
        marker = _once_marker(name)
        if marker is None:
            raise ConfigurationError("mark needs a name: a non-empty str")
        return self._store.top_up(self._key, zeros(), self._clock(), marker)  # a top-up of nothing, marked

    def marked(self, name: str) -> bool:
        """Whether ``name`` was marked on this budget (`mark`, `top_up`'s ``once``) by any worker. Changes nothing."""
        marker = _once_marker(name)
        if marker is None:
            raise ConfigurationError("marked needs a name: a non-empty str")
        return self._store.seen(self._key, marker, self._clock())

    def skip(
        self, agent: str | None = None, reason: str = "", *, resource: str | None = None,
        location: str | None = None, run_id: str | None = None,
    ) -> Skipped:  # fmt: skip
        """Record that work was skipped for the budget and return the marker that takes its place."""
        if agent is not None and (type(agent) is not str or not agent):
            _refuse_agent(agent)
        if not self.has_agent(agent):
            raise UnknownAgent(cast(str, agent), self.name)
        meta = Meta(run_id or self.run_id, None, location)
        self._store.record_entry(self._chain, agent, "skip", now=self._clock(), meta=meta, reason=reason)
        return Skipped(agent=agent, reason=reason, resource=resource, location=location)

    def exceeded(self, decision: Decision, agent: str | None = None) -> BudgetExceeded:
        """The `BudgetExceeded` for a `Deny` (adapters raise it)."""
        return self._exceeded(decision, agent)

    async def aexceeded(self, decision: Decision, agent: str | None = None) -> BudgetExceeded:
        """`exceeded` for async code (its snapshot is read without blocking the event loop)."""
        if is_async_store(self._store):
            return await self._aexceeded(decision, agent)
        return await off_loop(self._store, self.exceeded, decision, agent)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)``, a sync operation on this budget, without blocking the event loop.

        For the rare steps that have no async twin (a skip marker, a top-up): a memory store runs
        it inline, any other store in a worker thread.
        """
        return await off_loop(self._store, fn, *args)

    # -- reading -----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """This budget's figures now (and its parents', under ``.parent``)."""
        return self._snapshot_of(self._store.figures(self._chain, self._clock()))

    async def asnapshot(self) -> Snapshot:
        """`snapshot` for async code: never blocks the event loop (and works on an asyncio-only store)."""
        store = self._store
        if not is_async_store(store):
            return await off_loop(store, self.snapshot)
        return self._snapshot_of(await cast(AsyncStore, store).afigures(self._chain, self._clock()))

    def _snapshot_of(self, figures: list[Any]) -> Snapshot:
        limits: list[Limits] = []
        node: Budget | None = self
        while node is not None:
            limits.append(node._limits)
            node = node.parent
        return figures_snapshot(figures, limits)

    def report(self) -> dict[str, dict[str, Any]]:
        """Per agent: ``{"allocated", "consumed", "remaining"}`` in its contract's unit.

        Agents without an allocation report ``consumed`` in tokens and
        ``allocated``/``remaining`` as ``None``. ``remaining`` is negative after
        an overrun nobody covered.
        """
        return agent_report(self._store.agents(self._key, self._clock()))

    async def areport(self) -> dict[str, dict[str, Any]]:
        """`report` for async code: never blocks the event loop (and works on an asyncio-only store)."""
        store = self._store
        if not is_async_store(store):
            return await off_loop(store, self.report)
        return agent_report(await cast(AsyncStore, store).aagents(self._key, self._clock()))

    # -- governing plain functions -----------------------------------------------------

    def govern(
        self,
        agent: str | None = None,
        *,
        model: str | None = None,
        confidence_fn: Callable[[Any], float | None] | None = None,
        usage_fn: Callable[[Any], Any] | None = None,
        on_exhausted: Policy | None = None,
    ) -> Callable[[F], F]:
        """Decorate a plain (sync or async) function so each call is checked and charged.

        Before: limits, allocation and the confidence gate (no output reserve:
        a plain function has no ``max_tokens``). After: charge
        ``usage_fn(result)`` if given, else a tiktoken estimate of the string
        arguments and result (flagged estimated); report ``confidence_fn(result)``.
        On refusal: raise `BudgetExceeded`, or return a `Skipped` with
        ``on_exhausted="skip"``.
        """
        if agent is not None and (type(agent) is not str or not agent):
            _refuse_agent(agent)
        if not self.has_agent(agent):
            raise UnknownAgent(cast(str, agent), self.name)
        policy = on_exhausted or self.on_exhausted
        if policy not in POLICIES:
            raise ConfigurationError(f"on_exhausted must be one of {POLICIES}, got {policy!r}")
        if (self._cost_capped or self._usd_agent(agent)) and model is None and usage_fn is None:
            raise ConfigurationError(
                f"budget {self.name!r} has a USD limit but governed function for agent {agent!r} has neither "
                "model= (to price its estimated tokens) nor usage_fn= (to report its cost)"
            )

        def decorate(fn: F) -> F:
            location = getattr(fn, "__qualname__", repr(fn))

            def before(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Reservation | Skipped:
                texts = _string_args(args, kwargs)
                try:
                    return self._reserve(agent, model, texts, None, 0, None, None, location,
                                         unpriced_ok=usage_fn is not None)  # fmt: skip
                except BudgetExceeded as exc:
                    if policy == "skip":
                        return self.skip(agent, str(exc), resource=exc.resource, location=location)
                    raise

            def outcome(args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> tuple[Any, bool]:
                """What to record for a call: (usage, whether estimated)."""
                usage: Usage | None = None
                if usage_fn is not None:
                    try:
                        usage, estimated = Usage.from_provider(usage_fn(result)), False
                    except Exception:
                        # The function ran and was paid for: return its result, charge an estimate (SPEC §1,
                        # §6). A usage_fn that raises (the result lacks what it reads) reported no usage either.
                        logger.warning("usage_fn of %s read no usage; charging an estimate", location, exc_info=True)
                if usage is None:
                    prompt = estimate_text_tokens(_string_args(args, kwargs), model)
                    output = estimate_text_tokens(_string_args((result,), {}), model)
                    usage, estimated = Usage(input_tokens=prompt, output_tokens=output), True
                return usage, estimated

            def record(r: Reservation, usage: Any, estimated: bool) -> None:
                if estimated:
                    r._settle(usage, model, estimated=True)
                else:
                    r.settle(usage)

            if inspect.iscoroutinefunction(fn):

                @functools.wraps(fn)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    # The store is called off the event loop; the function and the callbacks run on it.
                    r = await self.off_loop(before, args, kwargs)
                    if isinstance(r, Skipped):
                        return r
                    try:
                        result = await cast(Callable[..., Awaitable[Any]], fn)(*args, **kwargs)
                    except BaseException as exc:
                        await r.arelease(f"function raised {type(exc).__name__}")
                        raise
                    await self.off_loop(record, r, *outcome(args, kwargs, result))
                    # Charged before confidence_fn runs: an exception there leaves no hold behind.
                    if confidence_fn is not None and (confidence := confidence_fn(result)) is not None:
                        await self.off_loop(self.set_confidence, agent, confidence)
                    return result

                return cast(F, async_wrapper)

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                r = before(args, kwargs)
                if isinstance(r, Skipped):
                    return r
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    r.release(f"function raised {type(exc).__name__}")
                    raise
                record(r, *outcome(args, kwargs, result))
                # Charged before confidence_fn runs: an exception there leaves no hold behind.
                if confidence_fn is not None and (confidence := confidence_fn(result)) is not None:
                    self.set_confidence(agent, confidence)
                return result

            return cast(F, wrapper)

        return decorate

    # -- internals ---------------------------------------------------------------------

    def _usd_agent(self, agent: str | None) -> bool:
        contract = self._contracts.get(agent)
        if contract is None and agent is not None:
            # Not registered here: another worker may have given it a USD allocation.
            contract = self._remember(agent, self._stored_contract(agent))
        return contract is not None and contract.unit == "usd"

    def _stored_contract(self, name: str) -> AgentContract | None:
        """``name``'s contract as the store holds it (whichever worker registered it), or ``None``."""
        state = self._store.agents(self._key, self._clock()).get(name)
        return None if state is None else _contract_of(name, state)

    async def _astored_contract(self, name: str) -> AgentContract | None:
        """`_stored_contract` for async code: never blocks the event loop."""
        store = self._store
        if not is_async_store(store):
            return await off_loop(store, self._stored_contract, name)
        state = (await cast(AsyncStore, store).aagents(self._key, self._clock())).get(name)
        return None if state is None else _contract_of(name, state)

    def _remember(self, name: str, contract: AgentContract | None) -> AgentContract | None:
        """Keep a contract read from the store, so that later calls for ``name`` do not read it again.

        A name the store does not know is not kept: another worker may register it later.
        """
        if contract is not None:
            self._contracts[name] = contract
        return contract

    def _after(self, outcome: Outcome, agent: str | None, usage: Usage) -> None:
        if self._guards is not None:
            self._guards.record_after_llm(agent, usage)
        self._tell_listeners(outcome.events)

    def _counted(self, outcome: Outcome) -> Decision:
        """The decision of an agent start or tool call, after telling listeners of the thresholds it crossed."""
        self._tell_listeners(outcome.events)
        return outcome.decision

    def _tell_listeners(self, events: Sequence[SoftLimit]) -> None:
        if not events:
            return
        node: Budget | None = self
        while node is not None:
            for listener in list(node._listeners):
                for event in events:
                    try:
                        listener(event)
                    except Exception:
                        logger.exception("soft-limit listener %r failed", listener)
            node = node.parent

    async def _aexceeded(self, decision: Decision, agent: str | None) -> BudgetExceeded:
        figures = await cast(AsyncStore, self._store).afigures(self._chain, self._clock())
        return self._exceeded(decision, agent, self._snapshot_of(figures))

    def _exceeded(self, decision: Decision, agent: str | None, snapshot: Snapshot | None = None) -> BudgetExceeded:
        if not isinstance(decision, Deny):
            raise UsageError(f"exceeded() needs a Deny, got {decision!r}")
        d = decision
        return BudgetExceeded(
            d.reason,
            budget=d.budget or self.name,
            agent=agent,
            resource=d.resource or "unknown",
            limit=d.limit,
            spent=d.spent,
            requested=d.requested,
            snapshot=snapshot if snapshot is not None else self.snapshot(),
        )

    def __repr__(self) -> str:
        return f"Budget(name={self.name!r}, mode={self.mode!r}, store={self._store.url!r})"


# Live child budgets of this process, per (store, key): the limits they were built with and how many
# objects hold them. Counted, not a WeakSet, so that an entry goes exactly when its last object does.
_live_children: dict[tuple[int, str], list[Any]] = {}
# Reentrant: the finalizer that releases an entry may run (garbage collection) inside a claim.
_live_children_lock = threading.RLock()


def _claim_child(budget: Budget, limits: Limits) -> None:
    """Refuse a child that would change the limits of a same-named child still alive in this process.

    Same-named children of one parent are one budget in the store (one key): the last one built
    sets its limits (see `Store.ensure_budget`), so a second child with other limits would silently
    re-cap the first, which still enforces, prices and reports by its own. Across processes the
    last build still wins: a store cannot tell a conflicting worker from a restart with new limits
    (docs/shared-budgets.md). Limits are compared as the store keeps them (caps in store units,
    ``warn_at``, window length), so ``Limits(max_cost_usd=2)`` and ``Limits(max_cost_usd="2.00")`` agree.
    """
    slot = (id(budget._store), budget._key)  # the store outlives its budgets: its id is not reused meanwhile
    signature = (tuple(limits.as_vector()), limits.warn_at, limits.window_seconds)
    with _live_children_lock:
        entry = _live_children.get(slot)
        if entry is not None and entry[0] != signature:
            parent = cast(Budget, budget.parent)
            raise ConfigurationError(
                f"budget {budget.name!r} under {parent.name!r} already exists in this process with other limits "
                f"({entry[2]!r}, not {limits!r}); same-named children of one parent are one budget, so build "
                "it with the same limits to share it, or give this child another name"
            )
        if entry is None:
            entry = _live_children[slot] = [signature, 0, limits]
        entry[1] += 1
    weakref.finalize(budget, _release_child, slot)


def _release_child(slot: tuple[int, str]) -> None:
    with _live_children_lock:
        entry = _live_children.get(slot)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del _live_children[slot]


def _names_store(url: Any, budget: Budget) -> bool:
    """Whether the URL ``url`` names ``budget``'s store (so a child given it can share that store).

    A ``memory://`` URL names a new, empty store every time, never one already open.
    """
    if not isinstance(url, str) or isinstance(budget._store, MemoryStore):
        return False
    return url == budget._store_from or url == budget._store.url


def _allocation_text(unit: str | None, amount: int | Decimal | None) -> str:
    """An allocation as `Budget.agent` takes it: ``max_tokens=1000``, ``max_cost_usd=0.5`` or ``no allocation``."""
    if unit is None:
        return "no allocation"
    return f"{'max_tokens' if unit == 'tokens' else 'max_cost_usd'}={amount}"


def _contract_of(name: str, state: AgentState) -> AgentContract:
    """The contract of an agent as the store holds it.

    The store keeps an agent's current allocation (transfers included), not the one it was
    registered with, so that is the allocation this contract shows.
    """
    if state.unit is None:
        return AgentContract(name=name, priority=state.priority, confidence_threshold=state.threshold)
    # Re-registering can set a min_reserve above an allocation that transfers had lowered; the
    # contract cannot hold more in reserve than it has.
    reserve = min(state.min_reserve, state.allocated)
    if state.unit == COST:
        return AgentContract(name=name, priority=state.priority, max_cost_usd=nanos_to_usd(state.allocated),
                             min_reserve=nanos_to_usd(reserve), confidence_threshold=state.threshold)  # fmt: skip
    return AgentContract(name=name, priority=state.priority, max_tokens=state.allocated, min_reserve=reserve,
                         confidence_threshold=state.threshold)  # fmt: skip


def _as_charged(usage: Usage) -> Usage:
    """``usage`` with its reported cost as the stores charge it: whole nano-dollars, rounded up (saturated).

    The ledger entry then shows what the counters added, so the entries' totals equal the
    counters (SPEC §5) when a provider reports more digits than a nano-dollar.
    """
    assert usage.cost_usd is not None
    charged = nanos_to_usd(usd_to_nanos(usage.cost_usd))
    return usage if charged == usage.cost_usd else usage.with_cost(charged)


def _stricter(decision: Decision, host: Decision | None) -> Decision:
    """A reservation's decision: the budget's, or the host guards' `SoftLimit` if the budget only allows."""
    if host is not None and not isinstance(decision, SoftLimit):
        return host
    return decision


def _checked_guards(guards: Iterable[Any] | None) -> list[Any] | None:
    """``guards`` as a list, refusing what cannot be one: a guard with none of the methods does nothing."""
    if guards is None:
        return None
    if isinstance(guards, (str, bytes)) or not isinstance(guards, Iterable):
        raise ConfigurationError(f"guards must be an iterable of guards, got {guards!r}")
    checked = list(guards)
    for i, guard in enumerate(checked):
        if not any(callable(getattr(guard, m, None)) for m in _GUARD_METHODS):
            raise ConfigurationError(f"guards[{i}] has none of {', '.join(_GUARD_METHODS)}: {guard!r}")
    return checked


_GUARD_METHODS = ("check_before_llm", "record_after_llm", "check_before_tool")


def _once_marker(once: Any) -> str | None:
    if once is None:
        return None
    if not isinstance(once, str) or not once:
        raise ConfigurationError(f"once must be a non-empty str or None, got {type(once).__name__} {once!r}")
    return once if type(once) is str else str.__str__(once)  # a str subclass travels as its plain string


def _config_count(value: Any, name: str) -> int:
    try:
        return coerce_count(value, name)
    except UsageError as exc:
        raise ConfigurationError(str(exc)) from None


def _request(prompt: int, out: int, rates: Any) -> Vector:
    total = prompt + out
    cost = rates.worst_case_nanos(prompt, out) if rates is not None else 0
    return [prompt, out, total if total <= MAX_INT else MAX_INT, cost, 1, 0, 0, 0]


def _string_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    return [v for v in (*args, *kwargs.values()) if isinstance(v, str)]


def top_up_vector(amounts: Mapping[str, int | Decimal | float | str]) -> Vector:
    """`Budget.top_up` keywords as store units (what the CLI sends without a `Budget`)."""
    vector = zeros()
    for resource, amount in amounts.items():
        if resource not in DIMENSIONS:
            raise ConfigurationError(f"cannot top up {resource!r}; known resources: {', '.join(DIMENSIONS)}")
        index = DIMENSIONS.index(resource)
        if index == COST:
            cost = coerce_cost(amount, resource)
            vector[index] = usd_to_nanos(cost) if cost is not None else 0
        else:
            vector[index] = coerce_count(amount, resource, count_unit(resource))
    return vector


def agent_report(agents: Mapping[str | None, Any]) -> dict[str, dict[str, Any]]:
    """`Budget.report` from a store's agent states (what the CLI reads without a `Budget`)."""
    out: dict[str, dict[str, Any]] = {}
    for name, state in agents.items():
        if name is None:
            continue
        if state.unit is None:
            out[name] = {"allocated": None, "consumed": state.spent[TOTAL], "remaining": None}
        else:
            allocated = user_value(state.unit, state.allocated)
            consumed = user_value(state.unit, state.spent[state.unit])
            out[name] = {"allocated": allocated, "consumed": consumed, "remaining": allocated - consumed}
    return out


def figures_snapshot(figures: list[Any], limits: list[Limits] | None = None) -> Snapshot:
    """A `Snapshot` from a store's figures of a chain (innermost first), with each level's `Limits`.

    Without ``limits`` (the CLI, which has no `Budget`), caps come from the store and
    the other `Limits` fields are the defaults.
    """
    snapshot: Snapshot | None = None
    bases = reversed(limits) if limits is not None else [Limits()] * len(figures)
    for fig, base in zip(reversed(figures), bases, strict=True):
        snapshot = _snapshot(fig, base, snapshot)
    assert snapshot is not None
    return snapshot


def _snapshot(fig: Any, base: Limits, parent: Snapshot | None) -> Snapshot:
    values: dict[str, Any] = {}
    for i, name in enumerate(DIMENSIONS):
        limit = fig.limits[i]
        values["max_" + name] = None if limit is None else user_value(i, limit)
    limits = replace(base, **values)
    spent = fig.spent
    exhausted = tuple(
        DIMENSIONS[d] for d in (IN, OUT, TOTAL, COST) if fig.limits[d] is not None and spent[d] >= fig.limits[d]
    )
    return Snapshot(
        budget=fig.name,
        limits=limits,
        input_tokens=spent[IN],
        output_tokens=spent[OUT],
        total_tokens=spent[TOTAL],
        cost_usd=nanos_to_usd(spent[COST]),
        llm_calls=spent[LLM],
        tool_calls=spent[5],
        agents_started=spent[6],
        unpriced_calls=spent[UNPRICED],
        held_tokens=fig.held[TOTAL],
        held_cost_usd=nanos_to_usd(fig.held[COST]),
        held_llm_calls=fig.held[LLM],
        exhausted_resources=exhausted,
        window_resets_at=float(fig.window_start + fig.window) if fig.window else None,
        parent=parent,
    )
