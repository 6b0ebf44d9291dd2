"""LangChain: an enforcing callback handler, a scope that attaches it everywhere, and agent middleware.

``BudgetCallbackHandler`` reserves before every chat-model/LLM call and refuses
it by raising `BudgetExceeded` (the model never runs), settles with the usage
the provider reported, releases the hold of a call that failed (charges its estimate,
flagged, when the caller abandoned it in flight: a cancelled task, a stream closed early),
and gates tool calls. Attach it to
an existing chain with ``config={"callbacks": [handler]}`` or
``chain.with_config(callbacks=[handler])``, or govern everything started in a
block with ``with budget_scope(budget): ...``.

Streaming: usage arrives only if the provider sends a usage chunk. With
``ChatOpenAI`` against a proxy, vLLM or Azure-style endpoints set
``stream_usage=True``; otherwise the call is charged its estimate and flagged
``estimated`` in the ledger. Calls made from a bare ``ThreadPoolExecutor`` inside a
node do not see callbacks: use ``langchain_core.runnables.config.get_executor_for_config``.
``Runnable.with_retry()`` retries every ``Exception`` by default, a refusal too (with backoff, to
the same refusal): pass ``retry_if_exception_type`` naming the errors worth retrying.
LangChain logs each exception a handler raises as "Error in ... callback"; importing this module
drops that warning for refusals (the caller gets them as `BudgetExceeded`), not for other errors.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType, MethodType
from typing import Any
from uuid import UUID

try:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.callbacks import manager as _manager
    from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
    from langchain_core.tracers.context import register_configure_hook
    from langchain_core.utils.function_calling import convert_to_openai_tool
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'budgetary.integrations.langchain needs langchain-core: pip install "budgetary[langchain]"'
    ) from exc

from budgetary.core.budget import Budget, Reservation
from budgetary.core.errors import ConfigurationError, UsageError
from budgetary.core.guard import Decision, SoftLimit
from budgetary.core.usage import Usage
from budgetary.integrations._common import budget_key

__all__ = [  # noqa: F822 - BudgetMiddleware is built on first access (it needs langchain v1)
    "SOFT_LIMIT_EVENT",
    "BudgetCallbackHandler",
    "BudgetMiddleware",
    "agent_from_metadata",
    "budget_scope",
]

logger = logging.getLogger("budgetary")


class _RefusalIsNotAnError(logging.Filter):
    """Drop LangChain's "Error in <handler>.<event> callback" warning when the error is a budget refusal.

    LangChain logs every exception a handler raises, then re-raises it if the handler asks. A
    refusal is this handler's purpose, and its caller gets it as `BudgetExceeded`: a warning
    printed for each one (with no logging configured, on stderr) would report a failure that
    did not happen. Other errors of the handler are logged as before.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            record.msg == "Error in %s.%s callback: %s" and isinstance(args, tuple) and len(args) == 3
            and args[0] in _handler_names and isinstance(args[2], str)
            and args[2].startswith(("BudgetExceeded(", "GraphInterrupt("))  # a refusal, or a pause for one
        )  # fmt: skip


_handler_names = {"BudgetCallbackHandler"}  # and its subclasses' (see `__init_subclass__`)
logging.getLogger("langchain_core.callbacks.manager").addFilter(_RefusalIsNotAnError())

SOFT_LIMIT_EVENT = "budgetary_soft_limit"
"""Name of the LangChain custom event dispatched on each soft-limit crossing.

LangChain attaches a custom event to the run it happens in, so it is dispatched only for calls
inside a run (a chain, graph or agent: ``astream_events`` shows it); a bare ``model.invoke`` has
no parent run to carry it. ``on_soft_limit`` is called either way.
"""

_AGENT_KEYS = ("agent", "budgetary_agent")


def agent_from_metadata(metadata: Mapping[str, Any] | None) -> str | None:
    """The agent a LangChain/LangGraph run belongs to, from its callback metadata.

    In order: user metadata (``agent``); the outer node of a subgraph
    (first segment of ``langgraph_checkpoint_ns``); ``langgraph_node``; else the run (``None``).
    """
    if not metadata:
        return None
    for key in _AGENT_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value:
            return value
    namespace = metadata.get("langgraph_checkpoint_ns")
    if isinstance(namespace, str) and namespace:
        return namespace.split("|", 1)[0].split(":", 1)[0]
    node = metadata.get("langgraph_node")
    return node if isinstance(node, str) and node else None


# The function of LangChain's async callback manager that dispatches one event to one handler
# (it awaits a coroutine-function method and calls any other inline). None if a LangChain
# version renames it: every event then runs inline, as in sync runs (enforced, but blocking).
_ASYNC_DISPATCH = getattr(getattr(_manager, "_ahandle_event_for_handler", None), "__code__", None)
_caller_frame = sys._getframe


class _AwaitedInAsyncRuns:
    """A handler method whose async twin LangChain's async callback manager awaits.

    One handler serves sync and async runs. The sync manager calls the method (and would only log
    the errors of a coroutine it returned: a refusal must be raised by a sync method); the async
    manager awaits a coroutine function. So the method is chosen by who looks it up: the async
    manager's dispatcher gets the twin, which awaits the store (`Budget.areserve`, ...) instead of
    blocking the event loop on it; every other caller gets the sync method.
    """

    def __init__(self, method: Callable[..., Any], twin: Callable[..., Awaitable[Any]]) -> None:
        self.method, self.twin = method, twin

    def __get__(self, handler: Any, owner: type | None = None) -> Any:
        if handler is None:
            return self.method
        if _caller_frame(1).f_code is _ASYNC_DISPATCH:
            return MethodType(self.twin, handler)
        return MethodType(self.method, handler)


class _Claim:
    """Which handler charges a run: the same budget attached twice must charge once."""

    __slots__ = ("also", "batch", "ceded", "covered", "handler", "parent", "rank", "reservation")

    def __init__(
        self, handler: BudgetCallbackHandler, parent: UUID | None, batch: object = None,
        rank: tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        self.handler = handler
        self.rank = handler._precedence if rank is None else rank
        self.parent = parent
        # The call's invocation_params: LangChain passes the same object to the start of every
        # prompt of one generate call (a text LLM's batch), and a new one to every other call.
        self.batch = batch
        self.covered = False  # a sibling prompt's result reported the usage of the whole generate call
        # Handlers of the family with an on_soft_limit that stood aside for this one: they hear too.
        self.also: tuple[BudgetCallbackHandler, ...] = ()
        self.reservation: Reservation | None = None
        self.ceded: tuple[Reservation, ...] = ()  # BudgetMiddleware holds on parent budgets this call's charge covers


# Claims per family of budgets (a budget, its parent, ...: keyed by the top one), shared by every
# handler of the family in this process; each table is keyed by run id as `UUID.int` (hashing a
# UUID runs Python code, four times per call). A child budget's charge is also its parents', so one
# call seen by handlers of a budget and of its parent must be charged once, by the child's.
# Keyed by the top budget's `budget_key`, so that two objects of one shared budget share a table;
# each handler holds its table, which lives as long as one of them does.
class _ClaimTable(dict[int, _Claim]):
    __slots__ = ("__weakref__",)


_claims: weakref.WeakValueDictionary[tuple[Hashable, ...], _ClaimTable] = weakref.WeakValueDictionary()
_claims_lock = threading.Lock()


def _claims_of(budget: Budget) -> _ClaimTable:
    key = budget_key(_top(budget))
    with _claims_lock:
        table = _claims.get(key)
        if table is None:
            table = _claims[key] = _ClaimTable()
        return table


def _top(budget: Budget) -> Budget:
    while budget.parent is not None:
        budget = budget.parent
    return budget


def _level_names(budget: Budget) -> Iterator[str]:
    node: Budget | None = budget
    while node is not None:
        yield node.name
        node = node.parent


def _within(budget: Budget | None, key: Hashable) -> bool:
    """Whether ``budget`` or one of its parents is the budget ``key`` names (`budget_key`: any object of it)."""
    while budget is not None:
        if budget_key(budget) == key:
            return True
        budget = budget.parent
    return False


def _depth(budget: Budget) -> int:
    depth = 0
    while (budget := budget.parent) is not None:  # type: ignore[assignment]
        depth += 1
    return depth


def _holds_of_refused_start(run_id: UUID, refused: _Claim) -> list[Reservation]:
    """Take every claim on ``run_id`` and on the prompts started with it: none of them will run.

    LangChain stops at the refusing handler and sends no end or error event, neither to the
    refused call (other budgets' handlers may have reserved for it already) nor to the prompts of
    the same generate call it started before (a text LLM's batch, ``agenerate`` of several
    message lists). Their holds would otherwise be renewed for as long as the process lives.
    """
    batch, parent, key = refused.batch, refused.parent, run_id.int

    def doomed(rid: int, claim: _Claim) -> bool:
        # Prompts of one generate call share their parent run too: a call elsewhere never matches
        # both, even from a model that would reuse its invocation_params.
        return rid == key or (batch is not None and claim.batch is batch and claim.parent == parent)

    with _claims_lock:
        tables = list(_claims.values())
    taken: list[_Claim | None] = []
    for table in tables:
        # A snapshot (one atomic copy): other threads add and remove claims without the lock.
        taken.extend(table.pop(rid, None) for rid, c in list(table.items()) if doomed(rid, c))
    return [c.reservation for c in taken if c is not None and c.reservation is not None]


def _refused_elsewhere(exc: BaseException) -> str:
    budget = getattr(exc, "budget", None)
    return f"refused by budget {budget!r}" if budget is not None else f"refused before it ran ({type(exc).__name__})"


class _MiddlewareCall:
    """A model call `BudgetMiddleware` reserved: its budget, its hold, and whether a handler took it over."""

    __slots__ = ("budget", "ceded", "reservation")

    def __init__(self, budget: Budget, reservation: Reservation) -> None:
        self.budget, self.reservation, self.ceded = budget, reservation, False


# While BudgetMiddleware makes a model call: the calls its instances (an agent may take several)
# have reserved on their budgets.
_middleware_calls: ContextVar[tuple[_MiddlewareCall, ...]] = ContextVar("budgetary_middleware_calls", default=())
# Set while a governed LangGraph node runs: per budget, the handler of the innermost governed node.
# That budget's calls in the node are charged as that handler would charge them (its agent, its
# rank); other handlers of the budget (a user's own, a budget_scope, an outer node's) that see a call
# first charge it so, on its behalf, and the node's handler then finds it claimed: each call is
# reserved once, for the right agent, instead of being reserved by the first handler and
# re-attributed by the next. They cannot simply leave it to the node's handler: a call given its own
# callbacks (``model.invoke(x, config={"callbacks": [handler]})``) does not inherit the node's.
# Keyed by `budget_key`: a handler of another object of the same budget stands aside too.
_node_owners: ContextVar[dict[Hashable, BudgetCallbackHandler] | None] = ContextVar(
    "budgetary_node_owners", default=None
)


class BudgetCallbackHandler(BaseCallbackHandler):
    """Enforce a `Budget` on every LLM and tool call of the runs it is attached to.

    A denial raises `BudgetExceeded` from the caller's ``invoke``/``stream``/...;
    the model or tool never runs. ``agent`` pins every call to one agent;
    otherwise calls are attributed by `agent_from_metadata`. Each soft-limit
    threshold crossed calls ``on_soft_limit`` once (an error it raises is logged)
    and dispatches `SOFT_LIMIT_EVENT`.

    Example:
        ```python
        handler = BudgetCallbackHandler(budget, agent="researcher")
        chain.invoke({"topic": "otters"}, config={"callbacks": [handler]})
        ```
    """

    raise_error = True  # otherwise LangChain logs the denial and runs the model anyway
    run_inline = True  # in async runs, decide in the event loop before the call, in order

    def __init__(
        self,
        budget: Budget,
        agent: str | None = None,
        *,
        on_soft_limit: Callable[[SoftLimit], Any] | None = None,
        rank: int | None = None,
    ) -> None:
        """Attach ``budget``; ``rank`` orders attribution when several handlers of one budget see a call."""
        super().__init__()
        _check_arguments(budget, agent, on_soft_limit)
        self.budget = budget
        self.agent = agent
        self.on_soft_limit = on_soft_limit
        # An explicit agent is more specific than metadata: it wins a shared call.
        self.rank = rank if rank is not None else (1 if agent is not None else 0)
        # The handler of the innermost budget charges a call its family shares, then the higher rank.
        self._precedence = (_depth(budget), self.rank)
        self._levels = frozenset(_level_names(budget))  # the budgets whose soft limits this handler reports
        self._key = budget_key(budget)  # the budget across its objects (one shared budget, two objects)
        self._claims = _claims_of(budget)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _handler_names.add(cls.__name__)  # LangChain's warnings name a handler by its class

    def __copy__(self) -> BudgetCallbackHandler:
        return self  # callback managers copy handler lists; state must stay shared

    def __deepcopy__(self, memo: dict[int, Any]) -> BudgetCallbackHandler:
        return self

    # -- LLM calls -----------------------------------------------------------------------

    # Each event that reaches the store has a sync method (sync runs) and an async twin that
    # LangChain's async manager awaits (async runs: the store is awaited, the loop never blocks
    # on it); `_AwaitedInAsyncRuns` picks one. The decisions are shared: `_begin`, `_ended`, ...

    def _on_chat_model_start(
        self, serialized: dict[str, Any] | None, messages: list[list[Any]], *, run_id: UUID,
        parent_run_id: UUID | None = None, metadata: dict[str, Any] | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        """Reserve for the call or raise `BudgetExceeded`."""
        begun = self._begin(run_id, parent_run_id, metadata, kwargs)
        if begun is not None:
            claim, agent, model, max_out, location, tools = begun
            try:
                for held in claim.ceded:
                    held.release("charged through a child budget by its handler", failed=False)
                reservation = self.budget._reserve_for(
                    agent, model, messages if tools is None else [*messages, tools], max_out, location
                )
            except BaseException as exc:
                self._release_claim(run_id)  # after a denied start LangChain sends no end/error event
                for held in _holds_of_refused_start(run_id, claim):
                    held.release(_refused_elsewhere(exc), failed=False)
                raise
            if not self._started(claim, run_id, reservation):
                reservation.release("re-attributed to a more specific handler", failed=False)

    async def _aon_chat_model_start(
        self, serialized: dict[str, Any] | None, messages: list[list[Any]], *, run_id: UUID,
        parent_run_id: UUID | None = None, metadata: dict[str, Any] | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        begun = self._begin(run_id, parent_run_id, metadata, kwargs)
        if begun is not None:
            claim, agent, model, max_out, location, tools = begun
            try:
                for held in claim.ceded:
                    await held.arelease("charged through a child budget by its handler", failed=False)
                reservation = await self.budget._areserve_for(
                    agent, model, messages if tools is None else [*messages, tools], max_out, location
                )
            except BaseException as exc:
                self._release_claim(run_id)
                for held in _holds_of_refused_start(run_id, claim):
                    await held.arelease(_refused_elsewhere(exc), failed=False)
                raise
            if not self._started(claim, run_id, reservation):
                await reservation.arelease("re-attributed to a more specific handler", failed=False)

    on_chat_model_start = _AwaitedInAsyncRuns(_on_chat_model_start, _aon_chat_model_start)
    # A text-completion call: the same, with prompts for messages.
    on_llm_start = _AwaitedInAsyncRuns(_on_chat_model_start, _aon_chat_model_start)

    def _on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Settle with the usage the provider reported (or the estimate, flagged, if none)."""
        ended = self._ended(response, run_id)
        if ended is None:
            return
        reservation, usage, model, also = ended
        if usage is _CACHE_HIT:
            reservation.release("served from the LLM cache: no provider call", failed=False)
            return
        if usage is None:
            reservation.charge_estimate()  # streaming without a usage chunk: see the module docstring
        else:
            reservation.settle(usage, model=model, lenient=True)
        for event in reservation.events:
            self._tell(event, also)
            _dispatch_soft_event(event)

    async def _aon_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        ended = self._ended(response, run_id)
        if ended is None:
            return
        reservation, usage, model, also = ended
        if usage is _CACHE_HIT:
            await reservation.arelease("served from the LLM cache: no provider call", failed=False)
            return
        if usage is None:
            await reservation.acharge_estimate()
        else:
            await reservation.asettle(usage, model=model, lenient=True)
        for event in reservation.events:
            self._tell(event, also)
            await _adispatch_soft_event(event)

    on_llm_end = _AwaitedInAsyncRuns(_on_llm_end, _aon_llm_end)

    def _on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Release the hold of a failed call; charge the estimate of an abandoned one (`_ended_without_reply`)."""
        claim = self._release_claim(run_id)
        if claim is not None and claim.reservation is not None:
            _ended_without_reply(claim.reservation, error)

    async def _aon_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        claim = self._release_claim(run_id)
        if claim is not None and claim.reservation is not None:
            await _aended_without_reply(claim.reservation, error)

    on_llm_error = _AwaitedInAsyncRuns(_on_llm_error, _aon_llm_error)

    def _on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Close the holds of LLM runs abandoned with their parent (they get no end or error event).

        They were already calling the provider, which may bill them: each is charged its estimate,
        flagged ``estimated``, rather than forgotten.
        """
        for reservation in self._orphans(run_id):
            reservation._charge_if_open()  # the lease keeper may have charged a cancelled task's call

    async def _aon_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        for reservation in self._orphans(run_id):
            await reservation._acharge_if_open()

    on_chain_error = _AwaitedInAsyncRuns(_on_chain_error, _aon_chain_error)

    # -- tools ---------------------------------------------------------------------------

    def _on_tool_start(
        self, serialized: dict[str, Any] | None, input_str: str, *, run_id: UUID,
        parent_run_id: UUID | None = None, metadata: dict[str, Any] | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        """Count the tool call, or raise `BudgetExceeded` so that the tool body never runs."""
        request = self._tool_request(serialized, run_id, parent_run_id, metadata, kwargs)
        if request is None:
            return
        self.budget.ensure_agent(request[0])
        with _tool_crossings(self.budget) as crossed:
            decision = self.budget.check_tool(*request)
        if not self._tool_allowed(run_id, decision):
            raise self.budget.exceeded(decision, request[0])
        for event in crossed:
            _tell(self.on_soft_limit, event)
            _dispatch_soft_event(event)

    async def _aon_tool_start(
        self, serialized: dict[str, Any] | None, input_str: str, *, run_id: UUID,
        parent_run_id: UUID | None = None, metadata: dict[str, Any] | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        request = self._tool_request(serialized, run_id, parent_run_id, metadata, kwargs)
        if request is None:
            return
        await self.budget.aensure_agent(request[0])
        with _tool_crossings(self.budget) as crossed:
            decision = await self.budget.acheck_tool(*request)
        if not self._tool_allowed(run_id, decision):
            raise await self.budget.aexceeded(decision, request[0])
        for event in crossed:
            _tell(self.on_soft_limit, event)
            await _adispatch_soft_event(event)

    on_tool_start = _AwaitedInAsyncRuns(_on_tool_start, _aon_tool_start)

    def _tool_request(
        self, serialized: dict[str, Any] | None, run_id: UUID, parent_run_id: UUID | None,
        metadata: dict[str, Any] | None, kwargs: dict[str, Any],
    ) -> tuple[str | None, str] | None:  # fmt: skip
        """(agent, tool name) to check, or None when another handler of this budget counts the call."""
        # A tool call is counted by the first handler of this budget's family that sees it (no
        # re-attribution: a count cannot be taken back), and the claim lasts until the tool ends. So
        # a parent's handler listed before its child's counts the call for the parent only.
        claim = _Claim(self, parent_run_id)
        if self._claims.setdefault(run_id.int, claim) is not claim:  # atomic: first handler wins
            return None
        name = kwargs.get("name") or (serialized or {}).get("name") or "tool"
        return self._charging_for()._agent_for(metadata), str(name)

    def _tool_allowed(self, run_id: UUID, decision: Decision) -> bool:
        if not decision.allowed:  # a refused start gets no end or error event
            claim = self._release_claim(run_id)
            if claim is not None:
                _holds_of_refused_start(run_id, claim)  # other budgets' handlers' claims on it: no hold to give back
        return decision.allowed

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the finished tool call."""
        self._release_claim(run_id)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the failed tool call (it was counted when it started)."""
        self._release_claim(run_id)

    # -- internals -----------------------------------------------------------------------

    def _agent_for(self, metadata: Mapping[str, Any] | None) -> str | None:
        """The agent this handler charges a call to (callers register it: `ensure_agent` or its twin)."""
        return self.agent if self.agent is not None else agent_from_metadata(metadata)

    def _begin(
        self, run_id: UUID, parent_run_id: UUID | None, metadata: dict[str, Any] | None, kwargs: dict[str, Any]
    ) -> tuple[_Claim, str | None, str | None, int | None, str | None, str | None] | None:  # fmt: skip
        """Claim the call: (claim, agent, model, max output tokens, location, tools' JSON text or None).

        None if another handler charges the call. Every LLM call passes here: it reads what it needs
        from the call's metadata and invocation params in one go.
        """
        middleware = _middleware_calls.get()
        if middleware and self._middleware_charges():
            return None  # BudgetMiddleware already reserved this call
        params = kwargs.get("invocation_params") or _NOTHING
        charger = self._charging_for()  # a governed node's handler, if the call runs in one
        claim = _Claim(self, parent_run_id, params or None, charger._precedence)
        if self._claims.setdefault(run_id.int, claim) is not claim and not self._take(run_id, claim):
            return None  # atomic setdefault: the usual case, one handler per family, ends there
        if middleware:
            claim.ceded = self._take_over_middleware()
        meta = metadata or _NOTHING
        model = meta.get("ls_model_name") or params.get("model") or params.get("model_name")
        max_out = meta.get("ls_max_tokens")
        if max_out is None:
            for key in _OUTPUT_CAP_KEYS:
                max_out = params.get(key)
                if max_out is not None:
                    break
        if max_out is not None and (type(max_out) is not int or max_out < 0):
            max_out = _output_cap(max_out)
        tools = params.get("tools") or params.get("functions")
        return (
            claim,
            charger._agent_for(meta),
            model,
            max_out,
            meta.get("langgraph_node"),
            _tools_text(tools) if tools else None,
        )

    def _started(self, claim: _Claim, run_id: UUID, reservation: Reservation) -> bool:
        """Record the call's reservation; False if a more specific handler took the run meanwhile."""
        # Set first, then look: a handler taking the run over releases what it finds set, so
        # between the two of them the reservation is released at least once (release is idempotent).
        claim.reservation = reservation.keep_alive()  # a call longer than the lease keeps its hold
        return self._claims.get(run_id.int) is claim

    def _ended(
        self, response: Any, run_id: UUID
    ) -> tuple[Reservation, Any, str | None, tuple[BudgetCallbackHandler, ...]] | None:
        """(reservation, reported usage or None or `_CACHE_HIT`, billed model, ``_Claim.also``) of a call of ours."""
        claim = self._release_claim(run_id)
        if claim is None or claim.reservation is None:
            return None
        usage, model, cache_hit = _reported_usage(response)
        if cache_hit:
            usage = _CACHE_HIT
        elif type(usage) is not Usage and claim.batch is not None:  # llm_output's usage, or none
            usage = self._batch_usage(claim, usage)
        return claim.reservation, usage, model or claim.reservation.model, claim.also

    def _tell(self, event: SoftLimit, also: tuple[BudgetCallbackHandler, ...]) -> None:
        """Call this handler's ``on_soft_limit``, and those of the handlers in ``also`` whose budget crossed."""
        _tell(self.on_soft_limit, event)
        told = [self.on_soft_limit]
        for other in also:
            callback = other.on_soft_limit
            if event.budget in other._levels and not any(callback is seen for seen in told):
                told.append(callback)
                _tell(callback, event)

    def _batch_usage(self, claim: _Claim, usage: Any) -> Any:
        """``llm_output`` usage for one prompt of a generate call; zero if a sibling reported the call's.

        A text LLM's batch is one provider call: LangChain gives its usage to the first prompt's
        run and an emptied ``token_usage`` to the others (``LLMResult.flatten``), in that order.
        """
        if usage:
            for other in list(self._claims.values()):  # a snapshot: other threads add and remove claims
                if other.batch is claim.batch and other.parent == claim.parent:
                    other.covered = True
            return usage
        return _NO_USAGE if claim.covered else usage

    def _orphans(self, parent_run_id: UUID) -> list[Reservation]:
        """Take the claims of this handler's LLM runs under ``parent_run_id``; their reservations."""
        claims = self._claims
        # A snapshot (one atomic copy): other threads add and remove claims without the lock.
        orphans = [rid for rid, c in list(claims.items()) if c.parent == parent_run_id and c.handler is self]
        taken = (claims.pop(rid, None) for rid in orphans)  # None: the run ended meanwhile and settled itself
        return [c.reservation for c in taken if c is not None and c.reservation is not None]

    def _middleware_charges(self) -> bool:
        """Whether `BudgetMiddleware` reserved the current call on this budget or on a child of it.

        A child budget's charge is also its parents': a parent's handler reserving again would
        count the call twice.
        """
        return any(_within(call.budget, self._key) for call in _middleware_calls.get())

    def _take_over_middleware(self) -> tuple[Reservation, ...]:
        """The holds `BudgetMiddleware` took for this call on parents of this budget: this handler's charge covers them.

        The child's charge is also its parents': the middleware's hold must go before this handler
        reserves (both would count against the parent, refusing the last call a limit allows) and
        the middleware must not settle it (the call would count twice).
        """
        ceded = []
        for call in _middleware_calls.get():
            if not call.ceded and _within(self.budget.parent, budget_key(call.budget)):
                call.ceded = True
                ceded.append(call.reservation)
        return tuple(ceded)

    def _charging_for(self) -> BudgetCallbackHandler:
        """The handler whose agent and rank this one charges a call with: the governed node's, in one."""
        owners = _node_owners.get()
        if owners is None:
            return self
        return owners.get(self._key) or self

    def _take(self, run_id: UUID, claim: _Claim) -> bool:
        """Put ``claim`` on ``run_id``, which another handler of the family claimed first, if it takes precedence."""
        claims = self._claims
        with _claims_lock:
            current = claims.get(run_id.int)
            if current is not None and current.rank >= claim.rank:
                if self.on_soft_limit is not None:
                    current.also += (self,)
                return False
            if current is not None:
                claim.also = current.also + ((current.handler,) if current.handler.on_soft_limit is not None else ())
            claims[run_id.int] = claim
        if current is not None and current.reservation is not None:
            current.reservation.release("re-attributed to a more specific handler", failed=False)
        return True

    def _release_claim(self, run_id: UUID) -> _Claim | None:
        claim = self._claims.get(run_id.int)
        if claim is None or claim.handler is not self:
            return None
        return self._claims.pop(run_id.int, None)  # atomic: None if a parent's chain error took it meanwhile


_OUTPUT_CAP_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_NOTHING: Mapping[str, Any] = MappingProxyType({})


def _output_cap(*values: Any) -> int | None:
    """The call's cap on output tokens: the first value set; None (the default reserve) if it is no count.

    Models take values that are not token counts (-1 means "as many as fit" to LangChain's OpenAI
    text LLM): those are the user's settings, not a reason to fail the call.
    """
    for value in values:
        if value is None:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            return value if value >= 0 else None
        return int(value) if isinstance(value, str) and value.isdigit() else None
    return None


def _check_arguments(budget: Any, agent: Any, on_soft_limit: Any) -> None:
    """Fail at construction, naming the argument, rather than with an unrelated error at run time."""
    if not isinstance(budget, Budget):
        raise ConfigurationError(f"budget must be a Budget, got {type(budget).__name__} {budget!r}")
    if agent is not None and not isinstance(agent, str):
        raise ConfigurationError(f"agent must be a str or None, got {type(agent).__name__} {agent!r}")
    if agent == "":  # no agent can have it (SPEC §4): refused here, not at the first call
        raise ConfigurationError("agent must be a non-empty str or None (the run itself), got ''")
    if on_soft_limit is not None and not callable(on_soft_limit):
        raise ConfigurationError(
            f"on_soft_limit must be a callable or None, got {type(on_soft_limit).__name__} {on_soft_limit!r}"
        )


def _ended_without_reply(reservation: Reservation, error: BaseException) -> None:
    """Close the hold of a call that ended without a reply.

    A call that failed (an ``Exception``: the provider refused or errored) gives its hold back,
    per ``charge_failed_calls``. A call its caller abandoned in flight (a cancelled task, a stream
    closed early, Ctrl-C) may already be billed by the provider: it is charged its estimate,
    flagged ``estimated``, so the budget never under-counts.
    """
    if isinstance(error, Exception):
        reservation.release(f"call failed: {type(error).__name__}")
    else:
        reservation._charge_if_open()  # the lease keeper may have charged it already (a cancelled task)


async def _aended_without_reply(reservation: Reservation, error: BaseException) -> None:
    if isinstance(error, Exception):
        await reservation.arelease(f"call failed: {type(error).__name__}")
    else:
        await reservation._acharge_if_open()


_NO_USAGE = Usage(input_tokens=0, output_tokens=0)
"""What a prompt whose usage a sibling prompt's result reported is charged (it still counts as a call)."""

_CACHE_HIT = object()
"""`BudgetCallbackHandler._ended`'s usage for an LLM-cache hit (no provider call, nothing to charge)."""


# The JSON of tool sets already seen, by the ids of their tools (each kept alive by its entry).
_tool_texts: dict[tuple[int, ...], tuple[tuple[Any, ...], str]] = {}


def _tools_text(tools: Any) -> str | None:
    """The tool schemas a call sends the provider, as JSON text: they are prompt tokens too.

    ``tools`` are OpenAI-format dicts (a chat model's bound ``tools``) or tool objects
    (``create_agent``'s). A set of tools is converted once: a bound model passes the same
    objects on every call.
    """
    if not tools or not isinstance(tools, (list, tuple)):
        return None
    key = tuple(map(id, tools))
    cached = _tool_texts.get(key)
    if cached is not None and all(a is b for a, b in zip(cached[0], tools, strict=True)):
        return cached[1]
    text = json.dumps([_tool_schema(t) for t in tools], default=str)
    if len(_tool_texts) >= 256:
        _tool_texts.clear()
    _tool_texts[key] = (tuple(tools), text)
    return text


def _tool_schema(tool: Any) -> Any:
    if isinstance(tool, Mapping):
        return tool
    try:
        return convert_to_openai_tool(tool)
    except Exception:  # a tool LangChain cannot convert: its text still counts
        return str(tool)


# `Budget.check_tool` returns only its decision and tells the budget's listeners of the thresholds
# the count crossed: one listener per budget collects them for the tool call counting in this
# context (asyncio.to_thread copies the context, so a store run in a worker thread is covered).
_tool_events: ContextVar[list[SoftLimit] | None] = ContextVar("budgetary_tool_events", default=None)
_listened: weakref.WeakSet[Budget] = weakref.WeakSet()


def _collect_tool_event(event: SoftLimit) -> None:
    sink = _tool_events.get()
    if sink is not None and not any(seen is event for seen in sink):  # a parent's listener sees it too
        sink.append(event)


@contextmanager
def _tool_crossings(budget: Budget) -> Iterator[list[SoftLimit]]:
    """The soft-limit crossings of the tool count made in the block."""
    if budget not in _listened:
        with _claims_lock:
            if budget not in _listened:
                budget.add_soft_limit_listener(_collect_tool_event)
                _listened.add(budget)
    crossed: list[SoftLimit] = []
    token = _tool_events.set(crossed)
    try:
        yield crossed
    finally:
        _tool_events.reset(token)


def _tell(on_soft_limit: Callable[[SoftLimit], Any] | None, event: SoftLimit) -> None:
    """Call the user's ``on_soft_limit``; its failure is logged, never turned into a failed LLM call."""
    if on_soft_limit is not None:
        try:
            on_soft_limit(event)
        except Exception:
            logger.exception("on_soft_limit raised for %s; the call goes on", event.message)


def _dispatch_soft_event(event: SoftLimit) -> None:
    try:
        dispatch_custom_event(SOFT_LIMIT_EVENT, _event_data(event))
    except RuntimeError:
        pass  # no parent run to attach the event to (a bare model.invoke)


async def _adispatch_soft_event(event: SoftLimit) -> None:
    try:
        await adispatch_custom_event(SOFT_LIMIT_EVENT, _event_data(event))
    except RuntimeError:
        pass


def _event_data(event: SoftLimit) -> dict[str, Any]:
    return {
        "budget": event.budget, "agent": event.agent, "resource": event.resource, "consumed": event.consumed,
        "limit": event.limit, "threshold": event.threshold, "message": event.message,
    }  # fmt: skip


def _billed_model(message: Any) -> str | None:
    """The model name the provider reported in a message's ``response_metadata``, if any."""
    metadata = getattr(message, "response_metadata", None)
    if type(metadata) is not dict and not isinstance(metadata, Mapping):
        return None
    name = metadata.get("model_name") or metadata.get("model")
    return name if type(name) is str or isinstance(name, str) else None


def _reported_usage(response: Any) -> tuple[Any, str | None, bool]:
    """(usage in any shape settle reads, billed model, cache hit) from an ``LLMResult``: see `_message_usage`."""
    generations = getattr(response, "generations", None) or []
    first = generations[0][0] if generations and generations[0] else None
    return _message_usage(getattr(first, "message", None), getattr(response, "llm_output", None) or {})


def _message_usage(message: Any, llm_output: Mapping[str, Any]) -> tuple[Any, str | None, bool]:
    """(usage, billed model, cache hit) of a reply: its usage_metadata first, ``llm_output``'s usage as fallback."""
    metadata = getattr(message, "usage_metadata", None)
    model = _billed_model(message) or llm_output.get("model_name")
    if metadata:
        if type(metadata) is not dict and not isinstance(metadata, Mapping):  # model_construct, or assigned later
            return metadata, model, False  # unreadable: the lenient settle logs it and charges the estimate
        if metadata.get("total_cost") == 0:  # LangChain's only marker of an LLM-cache hit
            return None, model, True
        try:
            return Usage.from_langchain(metadata), model, False  # its shape is known: no detection
        except UsageError:
            return metadata, model, False  # the lenient settle logs it and charges the estimate
    token_usage = llm_output.get("token_usage") or llm_output.get("usage")
    return (token_usage or None), model, False


# One variable per nesting level of scopes of different budgets (a tenant's scope around a
# run's), registered once at import: LangChain's own get_usage_metadata_callback registers a
# new variable on every use, which grows its global hook list forever.
_SCOPE_DEPTH = 4
_scope_handlers: tuple[ContextVar[BudgetCallbackHandler | None], ...] = tuple(
    ContextVar(f"budgetary_scope_handler_{level}", default=None) for level in range(_SCOPE_DEPTH)
)
for _variable in _scope_handlers:
    register_configure_hook(_variable, inheritable=True)


def _scope_slot(budget: Budget) -> ContextVar[BudgetCallbackHandler | None]:
    """The variable a new scope of ``budget`` sets: its budget's own (an inner scope replaces it), or the next free."""
    key = budget_key(budget)
    for variable in _scope_handlers:
        current = variable.get()
        if current is None or current.budget is budget or current._key == key:
            return variable
    raise UsageError(f"budget_scope nests at most {_SCOPE_DEPTH} different budgets")


@contextmanager
def budget_scope(budget: Budget, agent: str | None = None) -> Iterator[BudgetCallbackHandler]:
    """Govern every LangChain/LangGraph run started inside the block, with no config change.

    Scopes of different budgets nest (each charges its budget; a child budget's scope inside its
    parent's charges the parent once, through the child); an inner scope of the same budget
    replaces the outer one until it ends (its ``agent`` applies).

    Example:
        ```python
        with budget_scope(budget):
            graph.invoke({"question": "..."})
        ```
    """
    handler = BudgetCallbackHandler(budget, agent)
    variable = _scope_slot(budget)
    token = variable.set(handler)
    try:
        yield handler
    finally:
        variable.reset(token)


_EXIT_BEHAVIORS = ("end", "error", "interrupt")


def _build_middleware() -> type:
    try:
        from langchain.agents.middleware import AgentMiddleware, ModelResponse, hook_config
        from langchain_core.messages import AIMessage
        from langgraph.config import get_config
        from langgraph.types import interrupt
    except ImportError as exc:
        raise ImportError(
            'BudgetMiddleware needs LangChain v1 (langchain>=1.0): pip install "budgetary[langchain]"'
        ) from exc

    from budgetary.core.errors import BudgetExceeded
    from budgetary.integrations._common import apply_top_up_once

    class BudgetMiddleware(AgentMiddleware):
        """Token and USD budgets for a LangChain v1 ``create_agent`` agent.

        Before each model call it checks (and reserves); after it, it settles with
        the reported usage. When the budget refuses: ``exit_behavior="end"``
        finishes the agent with a final message saying why, ``"error"`` raises
        `BudgetExceeded`, ``"interrupt"`` pauses the agent (it needs a
        checkpointer) until it is resumed with ``Command(resume={...})`` carrying
        `Budget.top_up` keywords (``{}`` if the budget was raised elsewhere).
        A soft-limit crossing calls ``on_soft_limit`` and dispatches `SOFT_LIMIT_EVENT`, as the handler does.

        Example:
            ```python
            agent = create_agent(model, tools, middleware=[BudgetMiddleware(budget, exit_behavior="end")])
            ```
        """

        def __init__(
            self, budget: Budget, *, agent: str | None = None, exit_behavior: str = "end",
            on_soft_limit: Callable[[SoftLimit], Any] | None = None,
        ) -> None:  # fmt: skip
            super().__init__()
            _check_arguments(budget, agent, on_soft_limit)
            self.on_soft_limit = on_soft_limit
            if exit_behavior not in _EXIT_BEHAVIORS:
                raise ConfigurationError(f"exit_behavior must be one of {_EXIT_BEHAVIORS}, got {exit_behavior!r}")
            self.budget = budget
            self.agent = agent
            self.exit_behavior = exit_behavior
            if agent is not None:
                budget.ensure_agent(agent)

        @property
        def name(self) -> str:
            """``BudgetMiddleware[<budget>]`` (``[<budget>/<agent>]``): unique per budget, so one agent takes several.

            LangChain refuses two middleware of one name, and the name is in the agent's node names, so
            it is stable across processes (a checkpointed run resumes elsewhere).
            """
            scope = self.budget.name if self.agent is None else f"{self.budget.name}/{self.agent}"
            return f"BudgetMiddleware[{scope.replace('|', '_').replace(':', '_')}]"  # LangGraph's reserved characters

        def _refused(self, exc: BudgetExceeded, attempt: int, checked: Decision | None = None) -> AIMessage | None:
            """Apply the exit behaviour; None means "try again" (after an interrupt's top-up).

            ``checked``: a refusal of `Budget.check`, which writes no ledger entry (a refused reserve
            writes its own). Its ``deny`` entry is written when it ends, raises or pauses the agent,
            not when a resumed agent replays the pause.
            """
            resumed = False  # "error" raises the refusal, "interrupt" pauses the agent (GraphInterrupt)
            try:
                answer = self._exit(exc, attempt)
                resumed = not isinstance(answer, AIMessage)  # its refusal was recorded when the agent paused
            finally:
                if checked is not None and not resumed:
                    self.budget._record_refusal(checked, self.agent)
            if isinstance(answer, AIMessage):
                return answer
            apply_top_up_once(self.budget, *answer)
            return None

        async def _arefused(
            self, exc: BudgetExceeded, attempt: int, checked: Decision | None = None
        ) -> AIMessage | None:
            resumed = False
            try:
                answer = self._exit(exc, attempt)
                resumed = not isinstance(answer, AIMessage)
            finally:
                if checked is not None and not resumed:
                    await self.budget._arecord_refusal(checked, self.agent)
            if isinstance(answer, AIMessage):
                return answer
            await self.budget.off_loop(apply_top_up_once, self.budget, *answer)
            return None

        def _exit(self, exc: BudgetExceeded, attempt: int) -> AIMessage | tuple[Any, tuple[str, int]]:
            """Raise, end with a message, or interrupt: the resume's answer and its once-only key."""
            if self.exit_behavior == "error":
                raise exc
            if self.exit_behavior == "end":
                # Marked: an outer BudgetMiddleware gives its hold back for this call that never ran.
                return AIMessage(
                    content=f"Stopped: the budget refused another model call. {exc}",
                    response_metadata={_REFUSAL_MARK: True},
                )
            answer = interrupt({
                "reason": str(exc), "budget": exc.budget, "agent": exc.agent, "resource": exc.resource,
                "limit": exc.limit, "spent": exc.spent, "requested": exc.requested,
            })  # fmt: skip
            return answer, (get_config().get("metadata", {}).get("langgraph_checkpoint_ns", ""), attempt)

        @hook_config(can_jump_to=["end"])
        def before_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
            """Refuse before the model node runs when no call could start."""
            attempt = 0
            while not (decision := self.budget.check(self.agent)).allowed:
                exc = self.budget.exceeded(decision, self.agent)
                if (message := self._refused(exc, attempt, decision)) is not None:
                    return {"jump_to": "end", "messages": [message]}
                attempt += 1
            return None

        @hook_config(can_jump_to=["end"])
        async def abefore_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
            """Async twin of `before_model` (the check is awaited; a refusal's behaviour runs inline)."""
            attempt = 0
            while not (decision := await self.budget.acheck(self.agent)).allowed:
                exc = await self.budget.aexceeded(decision, self.agent)
                if (message := await self._arefused(exc, attempt, decision)) is not None:
                    return {"jump_to": "end", "messages": [message]}
                attempt += 1
            return None

        def _reservation(self, request: Any) -> dict[str, Any]:
            """`Budget.reserve` arguments for a model call."""
            model = request.model
            name = getattr(model, "model_name", None) or getattr(model, "model", None)
            messages = [*([request.system_message] if request.system_message else []), *request.messages]
            if tools := _tools_text(request.tools):
                messages.append(tools)
            settings = getattr(request, "model_settings", None) or {}  # what the call binds wins
            caps = [settings.get(key) for key in _OUTPUT_CAP_KEYS]
            caps += [getattr(model, key, None) for key in _OUTPUT_CAP_KEYS]
            return {
                "agent": self.agent, "model": name if isinstance(name, str) else None, "messages": messages,
                "max_output_tokens": _output_cap(*caps),
            }  # fmt: skip

        def _reserve(self, request: Any) -> Reservation | AIMessage:
            attempt = 100  # distinct from before_model's interrupt indices
            while True:
                try:
                    return self.budget.reserve(**self._reservation(request)).keep_alive()
                except BudgetExceeded as exc:
                    if (message := self._refused(exc, attempt)) is not None:
                        return message
                attempt += 1

        async def _areserve(self, request: Any) -> Reservation | AIMessage:
            attempt = 100
            while True:
                try:
                    return (await self.budget.areserve(**self._reservation(request))).keep_alive()
                except BudgetExceeded as exc:
                    if (message := await self._arefused(exc, attempt)) is not None:
                        return message
                attempt += 1

        def wrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
            """Reserve, call the model, settle with its reported usage."""
            reservation = self._reserve(request)
            if isinstance(reservation, AIMessage):
                return ModelResponse(result=[reservation])
            call = _MiddlewareCall(self.budget, reservation)
            token = _middleware_calls.set((*_middleware_calls.get(), call))
            try:
                response = handler(request)
            except BaseException as exc:
                if not call.ceded:
                    _ended_without_reply(reservation, exc)
                raise
            finally:
                _middleware_calls.reset(token)
            if call.ceded:  # a child budget's handler charged the call, for this budget too
                return response
            usage, billed, cache_hit = _response_usage(response)
            if cache_hit:
                reservation.release("served from the LLM cache: no provider call", failed=False)
                return response
            if usage is None and _refused_inside(response):
                reservation.release("refused by an inner BudgetMiddleware: no model call", failed=False)
                return response
            if usage is None:
                reservation.charge_estimate()
            else:
                reservation.settle(usage, model=billed, lenient=True)
            for event in reservation.events:
                _tell(self.on_soft_limit, event)
                _dispatch_soft_event(event)
            return response

        async def awrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
            """Async twin of `wrap_model_call`: the store is awaited, never blocking the event loop."""
            reservation = await self._areserve(request)
            if isinstance(reservation, AIMessage):
                return ModelResponse(result=[reservation])
            call = _MiddlewareCall(self.budget, reservation)
            token = _middleware_calls.set((*_middleware_calls.get(), call))
            try:
                response = await handler(request)
            except BaseException as exc:
                if not call.ceded:
                    await _aended_without_reply(reservation, exc)
                raise
            finally:
                _middleware_calls.reset(token)
            if call.ceded:  # a child budget's handler charged the call, for this budget too
                return response
            usage, billed, cache_hit = _response_usage(response)
            if cache_hit:
                await reservation.arelease("served from the LLM cache: no provider call", failed=False)
                return response
            if usage is None and _refused_inside(response):
                await reservation.arelease("refused by an inner BudgetMiddleware: no model call", failed=False)
                return response
            if usage is None:
                await reservation.acharge_estimate()
            else:
                await reservation.asettle(usage, model=billed, lenient=True)
            for event in reservation.events:
                _tell(self.on_soft_limit, event)
                await _adispatch_soft_event(event)
            return response

    def _response_usage(response: Any) -> tuple[Any, str | None, bool]:
        """(usage, billed model name, LLM-cache hit) of a model call's response (a ``ModelResponse`` or a message).

        Read as the handler reads an ``LLMResult`` (`_reported_usage`): ``usage_metadata`` and its
        cache-hit marker, else the ``llm_output`` usage, which LangChain copies into the reply's
        ``response_metadata`` (the middleware sees no ``LLMResult``). The billed name
        (``gpt-4o-mini-2024-07-18`` for a request of an alias or an Azure deployment) is what
        prices; None falls back to the requested model.
        """
        messages = getattr(response, "result", None) or ([response] if isinstance(response, AIMessage) else [])
        replies = [m for m in messages if isinstance(m, AIMessage)]
        if not replies:
            return None, None, False
        reply = next((m for m in replies if m.usage_metadata), replies[0])
        metadata = reply.response_metadata
        return _message_usage(reply, metadata if isinstance(metadata, Mapping) else {})

    def _refused_inside(response: Any) -> bool:
        """Whether an inner `BudgetMiddleware` refused the call (so it never reached the model)."""
        messages = getattr(response, "result", None) or ([response] if isinstance(response, AIMessage) else [])
        return any(getattr(m, "response_metadata", {}).get(_REFUSAL_MARK) is True for m in messages)

    return BudgetMiddleware


_REFUSAL_MARK = "budgetary_refused"
"""``response_metadata`` key of the final message `BudgetMiddleware` ends an agent with when it refuses."""

_middleware_class: type | None = None


def __getattr__(name: str) -> Any:
    # BudgetMiddleware needs `langchain` v1 (not only langchain-core): build it on first use.
    global _middleware_class
    if name == "BudgetMiddleware":
        if _middleware_class is None:
            _middleware_class = _build_middleware()
        return _middleware_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
