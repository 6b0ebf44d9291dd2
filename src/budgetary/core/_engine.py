"""The budget rules applied to state: reserve, settle, release, record, begin_agent, ...

Every function here runs while the store holds its lock (memory) or its
transaction (SQLite), so each operation is one atomic step. The engine does no
I/O and knows nothing of frameworks; it works in store units (tokens and
nano-dollars) on vectors indexed like `DIMENSIONS`, plus one extra slot that
counts calls whose model had no price.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from budgetary.core._units import (
    AGENTS,
    COST,
    DIMENSIONS,
    IN,
    LLM,
    MAX_INT,
    OUT,
    SPEND_DIMS,
    TOOL,
    nanos_to_usd,
    sat,
)
from budgetary.core.errors import UnknownAgent
from budgetary.core.gate import ConfidenceGate
from budgetary.core.guard import ALLOW, Decision, Deny, SoftLimit
from budgetary.core.ledger import LedgerEntry
from budgetary.core.reallocator import DonorView, plan_transfers
from budgetary.core.usage import Usage

UNPRICED = 7
WIDTH = 8
ONCE_TTL = 30 * 86400.0
"""Seconds a ``once`` marker is kept (`Engine.seen`): a run resumed later than this repeats its marked steps."""
"""Vector width: the seven limit dimensions plus the unpriced-call counter."""

Vector = list[int]


def zeros() -> Vector:
    return [0] * WIDTH


def user_value(dim: int, value: int) -> int | Decimal:
    """A store-unit value as the API shows it (dollars for cost)."""
    return nanos_to_usd(value) if dim == COST else value


@dataclass(slots=True)
class AgentState:
    """An agent's contract and counters inside one budget."""

    priority: int = 1
    unit: int | None = None
    """`TOTAL` for a token allocation, `COST` for a USD allocation, ``None`` for none."""
    allocated: int = 0
    """Current allocation (initial allocation plus transfers in, minus transfers out)."""
    min_reserve: int = 0
    threshold: float | None = None
    confidence: float | None = None
    spent: Vector = field(default_factory=zeros)
    held: Vector = field(default_factory=zeros)
    """Only ``held[unit]`` is kept: it is the only figure an allocation decision reads."""

    def hold(self, amounts: Vector) -> None:
        if (u := self.unit) is not None:
            total = self.held[u] + amounts[u]
            self.held[u] = total if total <= MAX_INT else MAX_INT

    def unhold(self, amounts: Vector) -> None:
        if (u := self.unit) is not None:
            left = self.held[u] - amounts[u]
            self.held[u] = left if left > 0 else 0


@dataclass(slots=True)
class Level:
    """One budget: its limits and counters, and its agents."""

    key: str
    name: str
    base: list[int | None]
    """Limits as constructed, store units."""
    warn_at: tuple[float, ...] = (0.8,)
    window: int | None = None
    topup: Vector = field(default_factory=zeros)
    spent: Vector = field(default_factory=zeros)
    held: Vector = field(default_factory=zeros)
    fired: set[tuple[Any, ...]] = field(default_factory=set)
    window_start: float = 0.0
    agents: dict[str | None, AgentState] = field(default_factory=dict)
    # Derived from base, topup and warn_at by `refresh()`; never stored. Precomputed because
    # they are read on every call and most levels limit only one or two dimensions.
    limits: list[int | None] = field(init=False, repr=False, compare=False)
    spend_checks: list[tuple[int, int]] = field(init=False, repr=False, compare=False)
    count_checks: list[tuple[int, int]] = field(init=False, repr=False, compare=False)
    checks: list[tuple[int, int]] = field(init=False, repr=False, compare=False)
    """``spend_checks`` then ``count_checks``: every limited dimension, for `Engine._evaluate`'s quick pass."""
    soft_checks: list[tuple[int, int, int, tuple[tuple[float, int], ...]]] = field(
        init=False, repr=False, compare=False
    )
    """Per limited dimension: the limit, the count that reaches the first threshold, and each threshold's count."""
    floors: list[tuple[int, int]] = field(init=False, repr=False, compare=False)
    """Per limited dimension: the count that reaches the first threshold (``soft_checks``, short)."""
    warm: bool = field(init=False, repr=False, compare=False)
    """False when no counter has reached its first warning threshold, so soft-limit scans can be skipped."""

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Recompute the derived limits after base, topup or warn_at changed."""
        limits = [None if b is None else sat(b + t) for b, t in zip(self.base, self.topup, strict=False)]
        self.limits = limits
        self.spend_checks = [(d, lim) for d in SPEND_DIMS if (lim := limits[d]) is not None]
        self.count_checks = [(d, lim) for d in (LLM, TOOL, AGENTS) if (lim := limits[d]) is not None]
        self.checks = self.spend_checks + self.count_checks
        warn_at = self.warn_at
        self.soft_checks = []
        for d in range(7) if warn_at else ():
            if lim := limits[d]:
                marks = tuple((t, _reach(t, lim)) for t in warn_at)
                self.soft_checks.append((d, lim, marks[0][1], marks))
        self.floors = [(d, floor) for d, _, floor, _ in self.soft_checks]
        self.rewarm()

    def rewarm(self) -> None:
        """Recompute `warm` after the counters changed."""
        self.warm = self.reached_floor()

    def reached_floor(self) -> bool:
        """Whether a counter reached its first warning threshold."""
        spent = self.spent
        for d, floor in self.floors:
            if spent[d] >= floor:
                return True
        return False


@dataclass(slots=True)
class Hold:
    """Budget held for one call in flight; a lease that expires unless settled or renewed."""

    id: str
    chain: tuple[str, ...]
    agent: str | None
    amounts: Vector
    expires: float
    run_id: str | None = None
    model: str | None = None
    location: str | None = None


@dataclass(slots=True)
class Meta:
    """What a ledger entry records besides the numbers."""

    run_id: str | None = None
    model: str | None = None
    location: str | None = None


Sink = Callable[[LedgerEntry], None]
_NO_EVENTS: tuple[SoftLimit, ...] = ()
_NO_PLAN: list[tuple[str | None, int]] = []  # shared and never mutated: plans are built fresh


@dataclass(slots=True)
class Outcome:
    """The result of one engine operation."""

    decision: Decision = ALLOW
    events: Sequence[SoftLimit] = ()
    moved: int = 0
    entry: LedgerEntry | None = None


_ALLOWED = Outcome()
"""The common reserve outcome, shared (outcomes are never mutated)."""


class Engine:
    """State plus the rules. Stores own one (memory) or build one per transaction (SQLite)."""

    def __init__(
        self, sink: Sink | None = None, guard: AbstractContextManager[Any] | None = None, ledger_max_len: int = 0
    ) -> None:
        self.guard: AbstractContextManager[Any] = guard if guard is not None else threading.RLock()
        """Taken by `reserve` and `settle`, so a store can expose them without a wrapper of its own."""
        self.levels: dict[str, Level] = {}
        self.holds: dict[str, Hold] = {}
        self.entries: deque[LedgerEntry] = deque(maxlen=ledger_max_len or None)
        """The ledger when no ``sink`` is given: the newest ``ledger_max_len`` entries (0: all)."""
        self.seq = 0
        self.once: dict[tuple[str, str], float] = {}
        """(budget key, marker) -> when it was marked, oldest first (see `seen`)."""
        self.next_expiry = float("inf")
        self._sink = sink if sink is not None else self.entries.append
        # chain -> (its levels, whether any has a window); levels are updated in place, never replaced.
        self._chains: dict[tuple[str, ...], tuple[list[Level], bool]] = {}

    # -- bookkeeping -------------------------------------------------------------------

    def _append(self, now: float, level: Level, chain: tuple[str, ...], **fields: Any) -> LedgerEntry:
        fields["time"] = now
        fields["budget"] = level.name
        fields["scopes"] = chain
        return self._emit(fields)

    def _emit(self, fields: dict[str, Any]) -> LedgerEntry:
        """Number a new ledger entry (every field but ``id`` given) and hand it to the sink."""
        self.seq += 1
        fields["id"] = self.seq
        entry = LedgerEntry._fast(fields)
        self._sink(entry)
        return entry

    def _chain(self, chain: tuple[str, ...], now: float) -> list[Level]:
        if now >= self.next_expiry:
            self.expire(now)
        cached = self._chains.get(chain)
        if cached is None:
            levels = [self.levels[k] for k in chain]
            cached = self._chains[chain] = (levels, any(level.window is not None for level in levels))
        levels, windowed = cached
        if windowed:
            for level in levels:
                if level.window is not None and now >= level.window_start + level.window:
                    self._roll_window(level, now)
        return levels

    def _locate(self, chain: tuple[str, ...], agent: str | None, now: float) -> tuple[list[Level], AgentState]:
        """`_chain` and `_agent` in one call, for the two per-call operations."""
        cached = self._chains.get(chain)
        levels = self._chain(chain, now) if cached is None or cached[1] or now >= self.next_expiry else cached[0]
        state = levels[0].agents.get(agent)
        return levels, state if state is not None else self._agent(levels[0], agent)

    def forget_chains(self) -> None:
        """Drop cached chains (after a budget was added or its window changed)."""
        self._chains.clear()

    @staticmethod
    def _roll_window(level: Level, now: float) -> None:
        assert level.window is not None
        level.window_start = (now // level.window) * level.window
        level.spent = zeros()
        level.rewarm()
        level.fired.clear()
        for state in level.agents.values():
            state.spent = zeros()

    @staticmethod
    def _agent(level: Level, agent: str | None) -> AgentState:
        state = level.agents.get(agent)
        if state is None:
            if agent is not None:
                raise UnknownAgent(agent, level.name)
            state = level.agents[None] = AgentState()
        return state

    def expire(self, now: float) -> None:
        """Release every hold whose lease has run out (its worker died)."""
        nearest = float("inf")
        due: list[Hold] = []
        for hold in self.holds.values():
            if hold.expires <= now:
                due.append(hold)
            else:
                nearest = min(nearest, hold.expires)
        # Oldest lease first, ties by id (code points order as UTF-8 bytes do): the order the Redis
        # script writes, so that the ledger reads the same in every store, whatever kept the holds.
        due.sort(key=lambda h: (h.expires, h.id))
        for hold in due:
            self._drop_hold(hold)
            level = self.levels[hold.chain[0]]
            self._append(
                now, level, hold.chain, agent=hold.agent, kind="release", model=hold.model,
                usage=_usage_of(hold.amounts), run_id=hold.run_id, location=hold.location,
                reason="lease expired",
            )  # fmt: skip
        self.next_expiry = nearest

    def _drop_hold(self, hold: Hold) -> None:
        del self.holds[hold.id]
        self._unhold(hold)

    def _unhold(self, hold: Hold) -> None:
        """Take a hold's amounts off the counters of the levels and agent that held them."""
        levels = [self.levels[k] for k in hold.chain]
        for level in levels:
            _sub(level.held, hold.amounts)
        state = levels[0].agents.get(hold.agent)
        if state is not None:
            state.unhold(hold.amounts)

    # -- decisions ---------------------------------------------------------------------

    def _evaluate(
        self, levels: list[Level], agent: str | None, state: AgentState, req: Vector, gate: bool
    ) -> tuple[Decision, list[tuple[str | None, int]]]:
        """Decide a request; return the decision and the transfers it needs (not applied)."""
        if not gate and state.unit is None and state.threshold is None and _far_from_limits(levels, req):
            return ALLOW, _NO_PLAN  # the usual call, decided in one pass; any other in full below
        # Spend limits first, at every level: they are reported before anything else.
        for level in levels:
            spent_v = level.spent
            held_v = level.held
            for d, limit in level.spend_checks:
                spent = spent_v[d]
                if spent >= limit:
                    return _deny(level, agent, d, limit, spent, req[d], "exhausted"), []
                if not gate and spent + held_v[d] + req[d] > limit:
                    return _deny(level, agent, d, limit, spent + held_v[d], req[d], "would pass"), []
        plan: list[tuple[str | None, int]] = _NO_PLAN
        u = state.unit
        if u is not None:
            # In gate mode the call is allowed while something is left, so it needs one unit.
            shortfall = state.spent[u] + state.held[u] - state.allocated + (1 if gate else req[u])
            if shortfall > 0:
                plan = self._plan(levels[0], agent, state, shortfall)
                if sum(amount for _, amount in plan) < shortfall:
                    return (
                        Deny(
                            resource="allocation",
                            reason=(
                                f"agent {agent!r} would pass its allocation of "
                                f"{user_value(u, state.allocated)} {_unit_name(u)} "
                                f"({user_value(u, state.spent[u] + state.held[u])} used or held, "
                                f"{user_value(u, req[u])} requested) and reallocation cannot cover "
                                f"{user_value(u, shortfall)}"
                            ),
                            limit=user_value(u, state.allocated),
                            spent=user_value(u, state.spent[u] + state.held[u]),
                            requested=user_value(u, req[u]),
                            budget=levels[0].name,
                            agent=agent,
                        ),
                        [],
                    )
        if state.threshold is not None and not ConfidenceGate(state.threshold).allows(state.confidence):
            return (
                Deny(
                    resource="confidence",
                    reason=(
                        f"agent {agent!r} reported confidence {state.confidence} >= its threshold "
                        f"{state.threshold}; it is done"
                    ),
                    limit=state.threshold,
                    spent=state.confidence,
                    budget=levels[0].name,
                    agent=agent,
                ),
                [],
            )
        for level in levels:
            spent_v = level.spent
            held_v = level.held
            for d, limit in level.count_checks:
                if req[d] and spent_v[d] + held_v[d] + req[d] > limit:
                    return _deny(level, agent, d, limit, spent_v[d] + held_v[d], req[d], "would pass"), []
        for level in levels:
            if level.warm:
                break
        else:  # no level near a soft limit: only the agent's own allocation could be
            run = levels[0]
            allocated = state.allocated
            if u is None or not run.warn_at or allocated <= 0 or state.spent[u] / allocated < run.warn_at[0]:
                return ALLOW, plan
        return self._soft(levels, agent, state) or ALLOW, plan

    def _plan(self, run: Level, agent: str | None, state: AgentState, shortfall: int) -> list[tuple[str | None, int]]:
        views = [
            DonorView(name, s.priority, s.allocated - s.spent[s.unit] - s.held[s.unit], s.min_reserve)
            for name, s in run.agents.items()
            if s.unit == state.unit and name != agent and s.unit is not None
        ]
        return plan_transfers(views, needy=agent, priority=state.priority, shortfall=shortfall)

    def _apply_plan(
        self, now: float, run: Level, chain: tuple[str, ...], agent: str | None,
        plan: list[tuple[str | None, int]], meta: Meta,
    ) -> int:  # fmt: skip
        state = run.agents[agent]
        moved = 0
        for donor, amount in plan:
            if amount <= 0:
                continue
            run.agents[donor].allocated -= amount
            state.allocated += amount
            moved += amount
            assert state.unit is not None
            self._append(
                now, run, chain, agent=agent, kind="transfer", donor=donor,
                amount=user_value(state.unit, amount), run_id=meta.run_id, location=meta.location,
                reason=f"reallocated {user_value(state.unit, amount)} {_unit_name(state.unit)} from {donor!r}",
            )  # fmt: skip
        if moved and run.fired and state.unit is not None:
            # A bigger allocation can put the agent's spend back under a threshold: fire again when re-crossed.
            ratio = state.spent[state.unit] / state.allocated  # the allocation grew by `moved`, so it is > 0
            run.fired -= {k for k in run.fired if k[0] == "allocation" and k[1] == agent and ratio < k[2]}
        return moved

    @staticmethod
    def _soft(levels: list[Level], agent: str | None, state: AgentState) -> SoftLimit | None:
        best: tuple[float, Level | None, int, int, int] | None = None
        for level in levels:
            if not level.warm:
                continue
            spent_v = level.spent
            for d, limit, floor, _ in level.soft_checks:
                spent = spent_v[d]
                if floor <= spent < limit:
                    ratio = spent / limit
                    if best is None or ratio > best[0]:
                        best = (ratio, level, d, spent, limit)
        run = levels[0]
        u = state.unit
        if u is not None and state.allocated > 0 and run.warn_at:
            spent = state.spent[u]
            ratio = spent / state.allocated
            if run.warn_at[0] <= ratio < 1 and (best is None or ratio > best[0]):
                best = (ratio, None, u, spent, state.allocated)
        if best is None:
            return None
        ratio, where, d, spent, limit = best
        return _soft_limit(
            where, run, agent, d, spent, limit, _crossed(run.warn_at if where is None else where.warn_at, ratio)
        )

    def _fire(self, now: float, levels: list[Level], chain: tuple[str, ...], agent: str | None,
              state: AgentState, meta: Meta) -> Sequence[SoftLimit]:  # fmt: skip
        """Soft-limit events for thresholds crossed for the first time (once per scope)."""
        events: list[SoftLimit] = []
        for level in levels:
            warm = False
            spent_v = level.spent
            for d, limit, floor, marks in level.soft_checks:
                spent = spent_v[d]
                if spent < floor:
                    continue
                warm = True
                for t, mark in marks:
                    if spent >= mark and (d, t) not in level.fired:
                        level.fired.add((d, t))
                        events.append(_soft_limit(level, levels[0], agent, d, spent, limit, t))
            level.warm = warm
        run = levels[0]
        # An allocation changes with every transfer, so its thresholds are judged by the ratio (the rule of `_reach`).
        if (
            state.unit is not None
            and run.warn_at
            and state.allocated > 0
            and (ratio := state.spent[state.unit] / state.allocated) >= run.warn_at[0]
        ):
            for t in run.warn_at:
                key = ("allocation", agent, t)
                if ratio >= t and key not in run.fired:
                    run.fired.add(key)
                    events.append(_soft_limit(None, run, agent, state.unit, state.spent[state.unit],
                                              state.allocated, t))  # fmt: skip
        for event in events:
            self._append(now, run, chain, agent=agent, kind="soft_limit", resource=event.resource,
                         reason=event.message, run_id=meta.run_id, location=meta.location)  # fmt: skip
        return events or _NO_EVENTS

    # -- operations --------------------------------------------------------------------

    def check(self, chain: tuple[str, ...], agent: str | None, now: float) -> Decision:
        """Could an LLM call start now? Changes nothing."""
        levels = self._chain(chain, now)
        state = self._agent(levels[0], agent)
        req = zeros()
        req[LLM] = 1
        return self._evaluate(levels, agent, state, req, gate=True)[0]

    def reserve(
        self, chain: tuple[str, ...], agent: str | None, req: Vector, *, gate: bool, hold_id: str,
        ttl: float, now: float, meta: Meta, quiet: bool = False,
    ) -> Outcome:  # fmt: skip
        """Atomically check and hold ``req`` for one call; ``quiet`` writes no ``deny`` entry."""
        with self.guard:
            levels, state = self._locate(chain, agent, now)
            run = levels[0]
            if gate:
                req = [0, 0, 0, 0, req[LLM], 0, 0, 0]
            decision, plan = self._evaluate(levels, agent, state, req, gate)
            if not decision.allowed:
                if not quiet:
                    self._deny_entry(now, run, chain, agent, decision, meta)
                return Outcome(decision=decision)
            moved = self._apply_plan(now, run, chain, agent, plan, meta) if plan else 0
            for level in levels:
                _add(level.held, req)
            if state.unit is not None:  # only an allocation reads what the agent holds
                state.hold(req)
            expires = now + ttl
            self.holds[hold_id] = Hold(hold_id, chain, agent, req, expires, meta.run_id, meta.model, meta.location)
            if expires < self.next_expiry:
                self.next_expiry = expires
            if decision is ALLOW and not moved:
                return _ALLOWED
            return Outcome(decision=decision, moved=moved)

    def renew(self, hold_id: str, ttl: float, now: float) -> bool:
        """Extend a live hold's lease; False if it already expired."""
        hold = self.holds.get(hold_id)
        if hold is None:
            return False
        hold.expires = now + ttl
        return True

    def settle(
        self, chain: tuple[str, ...], agent: str | None, hold_id: str | None, actual: Vector, *,
        now: float, meta: Meta, estimated: bool = False, cost_known: bool = True, usage: Usage | None = None,
    ) -> Outcome:  # fmt: skip
        """Replace a hold (if still there) by what the call consumed; also plain records.

        ``usage`` is what the ledger entry shows (with cache and reasoning parts);
        ``actual`` is what the counters add. When ``cost_known`` and ``usage`` has no
        cost, the entry's cost is ``actual[COST]``.
        """
        with self.guard:
            levels, state = self._locate(chain, agent, now)
            run = levels[0]
            hold = self.holds.get(hold_id) if hold_id is not None else None
            if hold is not None:
                del self.holds[hold.id]  # not pop(): a store's holds mapping may track deletions
            if hold is not None and hold.agent == agent and (hold.chain is chain or hold.chain == chain):
                amounts = hold.amounts
                for level in levels:  # the usual case: the same levels hold and spend
                    _move(level.held, level.spent, amounts, actual)
                if state.unit is not None:
                    state.unhold(amounts)
                _add(state.spent, actual)
            else:
                if hold is not None:
                    self._unhold(hold)
                for level in levels:
                    _add(level.spent, actual)
                _add(state.spent, actual)
            fields: dict[str, Any] = {
                "time": now, "budget": run.name, "scopes": chain, "agent": agent, "kind": "llm", "model": meta.model,
                "run_id": meta.run_id, "location": meta.location,
            }  # fmt: skip
            if estimated:  # else the class default (False): ten keys fit the dict without a resize
                fields["estimated"] = True
            if usage is None:
                usage = _usage_of(actual, cost_known)
            if cost_known and usage.cost_usd is None:
                fields["_unpriced"] = (usage, actual[COST])  # priced when first read
            else:
                fields["usage"] = usage
                fields["cost_usd"] = usage.cost_usd if cost_known else None
            entry = self._emit(fields)
            moved = 0
            u = state.unit
            if u is not None and state.spent[u] + state.held[u] > state.allocated:
                moved = self._cover_overrun(now, run, chain, agent, state, meta)
            # Thresholds fire once a counter reaches a level's first one, or on an allocation; a level
            # still below every first threshold stays cold (counters only grow between refreshes).
            if u is None and not any(level.reached_floor() for level in levels):
                return Outcome(ALLOW, _NO_EVENTS, moved, entry)
            return Outcome(ALLOW, self._fire(now, levels, chain, agent, state, meta), moved, entry)

    def _cover_overrun(self, now: float, run: Level, chain: tuple[str, ...], agent: str | None,
                       state: AgentState, meta: Meta) -> int:  # fmt: skip
        if state.unit is None:
            return 0
        shortfall = state.spent[state.unit] + state.held[state.unit] - state.allocated
        if shortfall <= 0:
            return 0
        plan = self._plan(run, agent, state, shortfall)
        if sum(amount for _, amount in plan) < shortfall:
            return 0  # all or nothing: the agent stays over and its next call is denied
        return self._apply_plan(now, run, chain, agent, plan, meta)

    def release(self, hold_id: str, *, now: float, reason: str) -> bool:
        """Drop a hold without charging it (the call failed or was cancelled)."""
        if now >= self.next_expiry:
            self.expire(now)
        hold = self.holds.get(hold_id)
        if hold is None:
            return False
        self._drop_hold(hold)
        self._append(
            now, self.levels[hold.chain[0]], hold.chain, agent=hold.agent, kind="release", model=hold.model,
            usage=_usage_of(hold.amounts), run_id=hold.run_id, location=hold.location, reason=reason,
        )  # fmt: skip
        return True

    def held_amounts(self, hold_id: str) -> Vector | None:
        hold = self.holds.get(hold_id)
        return None if hold is None else list(hold.amounts)

    def begin_agent(
        self, chain: tuple[str, ...], agent: str | None, *, now: float, meta: Meta, once: str | None = None
    ) -> Outcome:
        """The spawn gate: take one ``max_agents`` slot if nothing denies; the decision and the events it fired.

        With ``once``, a start whose marker was marked (`mark`: a task re-run after it took its slot)
        is allowed and takes no slot.
        """
        levels = self._chain(chain, now)
        run = levels[0]
        state = self._agent(run, agent)
        if once is not None and self.seen(run.key, once, now):
            return Outcome(decision=ALLOW)
        req = zeros()
        req[AGENTS] = 1
        # Reallocation that could cover the agent's next call lets it start; nothing moves yet (a start spends nothing).
        decision = self._evaluate(levels, agent, state, req, gate=True)[0]
        if not decision.allowed:
            self._deny_entry(now, run, chain, agent, decision, meta)
            return Outcome(decision=decision)
        for level in levels:
            level.spent[AGENTS] = sat(level.spent[AGENTS] + 1)
        state.spent[AGENTS] += 1
        self._append(now, run, chain, agent=agent, kind="agent_start", run_id=meta.run_id, location=meta.location)
        return Outcome(decision, self._fire(now, levels, chain, agent, state, meta))

    def count_tool(self, chain: tuple[str, ...], agent: str | None, tool: str, *, now: float, meta: Meta) -> Outcome:
        """Check and count one tool call (only ``max_tool_calls`` gates tools); the decision and the events it fired.

        Like an LLM call's, the decision reads the counters before the call: the last call a
        limit allows is a `SoftLimit` in the warning band, not an `Allow` at the limit.
        """
        levels = self._chain(chain, now)
        run = levels[0]
        state = self._agent(run, agent)
        for level in levels:
            limit = level.limits[TOOL]
            if limit is not None and level.spent[TOOL] + 1 > limit:
                decision = _deny(level, agent, TOOL, limit, level.spent[TOOL], 1, "would pass")
                self._deny_entry(now, run, chain, agent, decision, Meta(meta.run_id, None, tool))
                return Outcome(decision=decision)
        allowed = self._soft(levels, agent, state) or ALLOW
        for level in levels:
            level.spent[TOOL] = sat(level.spent[TOOL] + 1)
        state.spent[TOOL] += 1
        self._append(now, run, chain, agent=agent, kind="tool", run_id=meta.run_id, location=tool)
        return Outcome(allowed, self._fire(now, levels, chain, agent, state, meta))

    def reallocate(self, chain: tuple[str, ...], agent: str | None, shortfall: int, *, now: float,
                   meta: Meta) -> int:  # fmt: skip
        """Move up to ``shortfall`` to ``agent``; return what moved (may be partial)."""
        levels = self._chain(chain, now)
        state = self._agent(levels[0], agent)
        if state.unit is None or shortfall <= 0:
            return 0
        plan = self._plan(levels[0], agent, state, shortfall)
        return self._apply_plan(now, levels[0], chain, agent, plan, meta)

    def set_confidence(self, chain: tuple[str, ...], agent: str | None, value: float, now: float) -> None:
        self._agent(self._chain(chain, now)[0], agent).confidence = value

    # -- once markers: a step that a resumed run replays is applied the first time only ----------

    def seen(self, key: str, marker: str, now: float) -> bool:
        """Whether ``marker`` was marked for budget ``key`` (by any worker sharing the store) in the last `ONCE_TTL`."""
        marked = self.once.get((key, marker))
        return marked is not None and marked > now - ONCE_TTL

    def mark(self, key: str, marker: str, now: float) -> None:
        """Mark ``marker`` for budget ``key``; markers older than `ONCE_TTL` are forgotten."""
        once = self.once
        once.pop((key, marker), None)  # re-marked: it moves to the end, where the newest are
        once[(key, marker)] = now
        while once:  # oldest first: stop at the first one still kept
            oldest = next(iter(once))
            if once[oldest] > now - ONCE_TTL:
                break
            del once[oldest]

    def top_up(self, key: str, amounts: Vector, now: float, once: str | None = None) -> bool:
        """Raise ``key``'s limits by ``amounts``; with ``once``, only if that marker is new. True if applied."""
        level = self.levels[key]  # KeyError (an unknown budget) before anything is marked
        if once is not None:
            if self.seen(key, once, now):
                return False
            self.mark(key, once, now)
        _add(level.topup, amounts)
        level.refresh()
        limits = level.limits
        # A raised limit can put spend back under a threshold: let it fire again when re-crossed.
        level.fired = {
            k for k in level.fired
            if k[0] == "allocation" or ((lim := limits[k[0]]) is not None and level.spent[k[0]] >= _reach(k[1], lim))
        }  # fmt: skip
        return True

    def levels_of(self, chain: tuple[str, ...], now: float) -> list[Level]:
        """The levels of ``chain`` with expired leases released and windows rolled."""
        return self._chain(chain, now)

    def _deny_entry(self, now: float, run: Level, chain: tuple[str, ...], agent: str | None, decision: Decision,
                    meta: Meta) -> None:  # fmt: skip
        self._append(now, run, chain, agent=agent, kind="deny", model=meta.model, resource=decision.resource,
                     reason=decision.reason, run_id=meta.run_id, location=meta.location)  # fmt: skip

    def note(
        self, chain: tuple[str, ...], agent: str | None, kind: str, *, now: float, meta: Meta,
        decision: Decision | None = None, reason: str | None = None,
    ) -> None:  # fmt: skip
        """Write an entry that changes no counter: a ``skip``, or a ``deny`` decided outside the engine."""
        run = self._chain(chain, now)[0]
        self._append(
            now, run, chain, agent=agent, kind=kind, model=meta.model,
            resource=None if decision is None else decision.resource,
            reason=reason if reason is not None else None if decision is None else decision.reason,
            run_id=meta.run_id, location=meta.location,
        )  # fmt: skip


# -- small helpers ------------------------------------------------------------------------


# Vectors are always WIDTH (8) long; these two run several times per call, so they are unrolled.


def _add(target: Vector, amounts: Vector) -> None:
    a0, a1, a2, a3, a4, a5, a6, a7 = amounts
    t0, t1, t2, t3, t4, t5, t6, t7 = target
    t0 += a0
    t1 += a1
    t2 += a2
    t3 += a3
    t4 += a4
    t5 += a5
    t6 += a6
    t7 += a7
    if (t0 | t1 | t2 | t3 | t4 | t5 | t6 | t7) > MAX_INT:  # exact for non-negative ints
        target[:] = [min(v, MAX_INT) for v in (t0, t1, t2, t3, t4, t5, t6, t7)]
    else:
        target[:] = (t0, t1, t2, t3, t4, t5, t6, t7)


def _move(held: Vector, spent: Vector, amounts: Vector, actual: Vector) -> None:
    """Settle in one step: ``held -= amounts`` (floored at 0) and ``spent += actual`` (saturated)."""
    a0, a1, a2, a3, a4, a5, a6, a7 = amounts
    t0, t1, t2, t3, t4, t5, t6, t7 = held
    held[:] = (
        t0 - a0 if t0 > a0 else 0,
        t1 - a1 if t1 > a1 else 0,
        t2 - a2 if t2 > a2 else 0,
        t3 - a3 if t3 > a3 else 0,
        t4 - a4 if t4 > a4 else 0,
        t5 - a5 if t5 > a5 else 0,
        t6 - a6 if t6 > a6 else 0,
        t7 - a7 if t7 > a7 else 0,
    )
    _add(spent, actual)


def _far_from_limits(levels: list[Level], req: Vector) -> bool:
    """Whether ``req`` stays strictly under every limit of ``levels``, none of them near a soft limit.

    Then the full rules allow it with nothing to report. Strictly: a request that reaches a limit
    exactly may find it exhausted, which the full rules say.
    """
    for level in levels:
        if level.warm:
            return False
        spent = level.spent
        held = level.held
        for d, limit in level.checks:
            if spent[d] + held[d] + req[d] >= limit:
                return False
    return True


def _sub(target: Vector, amounts: Vector) -> None:
    """``target -= amounts``, floored at 0 (off the hot path: expired and released holds)."""
    target[:] = [t - a if t > a else 0 for t, a in zip(target, amounts, strict=True)]


def _usage_of(amounts: Vector, cost_known: bool = True) -> Usage:
    return Usage(
        input_tokens=amounts[IN],
        output_tokens=amounts[OUT],
        cost_usd=nanos_to_usd(amounts[COST]) if cost_known else None,
    )


def _unit_name(dim: int) -> str:
    return "USD" if dim == COST else "tokens"


_EXACT = 2**53
"""Every integer below this is an exact double."""


def _reach(t: float, limit: int) -> int:
    """The least count ``n`` with ``n / limit >= t``: where consumption reaches the fraction ``t`` of ``limit``.

    The one rule for every threshold, in every store (the Lua script computes the same count):
    ``n / limit`` rounded as a float division, so 55 of 100 reaches 0.55 although
    ``0.55 * 100 == 55.00000000000001``. Exact ``Fraction(0.55)`` would miss it too, as the
    double nearest 0.55 is slightly above it. The ratios `_soft` and `_crossed` compare are
    the same divisions, so a decision and the events agree.
    """
    if limit <= 0:
        return 0
    n = math.ceil(t * limit)
    if n >= _EXACT:  # counts this large are not exact doubles (nor the Lua script's counters): keep the product
        return n
    # The product is rounded, so it may be one off: step to the least count that reaches t.
    while n > 0 and (n - 1) / limit >= t:
        n -= 1
    while n / limit < t:
        n += 1
    return n


def _crossed(warn_at: tuple[float, ...], ratio: float) -> float:
    return max((t for t in warn_at if ratio >= t), default=0.0)


def _deny(level: Level, agent: str | None, d: int, limit: int, spent: int, requested: int, how: str) -> Deny:
    resource = DIMENSIONS[d]
    shown_limit, shown_spent, shown_req = user_value(d, limit), user_value(d, spent), user_value(d, requested)
    if how == "exhausted":
        reason = f"Exhausted the {resource} limit of {shown_limit} of budget {level.name!r} ({resource}={shown_spent})"
    else:
        reason = (
            f"Would exceed the {resource} limit of {shown_limit} of budget {level.name!r} "
            f"({resource}={shown_spent} spent or held, {shown_req} requested)"
        )
    if agent is not None:
        reason += f" for agent {agent!r}"
    return Deny(resource=resource, reason=reason, limit=shown_limit, spent=shown_spent, requested=shown_req,
                budget=level.name, agent=agent)  # fmt: skip


def _soft_limit(
    level: Level | None, run: Level, agent: str | None, d: int, spent: int, limit: int, threshold: float
) -> SoftLimit:
    shown_spent, shown_limit = user_value(d, spent), user_value(d, limit)
    if level is None:
        message = (
            f"agent {agent!r} used {shown_spent} of its {shown_limit} {_unit_name(d)} allocation "
            f"({threshold:.0%} threshold)"
        )
        return SoftLimit(resource="allocation", consumed=shown_spent, limit=shown_limit, message=message,
                         threshold=threshold, budget=run.name, agent=agent)  # fmt: skip
    resource = DIMENSIONS[d]
    message = (
        f"budget {level.name!r} used {shown_spent} of its {resource} limit of {shown_limit} ({threshold:.0%} threshold)"
    )
    return SoftLimit(resource=resource, consumed=shown_spent, limit=shown_limit, message=message,
                     threshold=threshold, budget=level.name, agent=agent)  # fmt: skip


__all__ = [
    "AgentState",
    "Engine",
    "Hold",
    "Level",
    "Meta",
    "Outcome",
    "UNPRICED",
    "WIDTH",
    "user_value",
    "zeros",
]
