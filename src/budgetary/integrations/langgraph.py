"""LangGraph: govern an existing graph node by node, without touching its node functions.

``govern_graph(graph, budget)`` returns a governed compiled copy of a
``StateGraph`` or compiled graph. Each node execution passes the budget's spend
limits, its agent's allocation, the confidence gate and the spawn gate
(``max_agents`` counts node executions) before it runs, and its LLM and tool
calls are charged to its agent by a `BudgetCallbackHandler` installed for that
node (other handlers of the same budget stand aside inside it; in nested governed
graphs the innermost node wins). A refusal, at entry or at any call inside the
node, follows the node's policy:

- ``deny``: raise `BudgetExceeded` (a ``RuntimeError``: the default
  ``RetryPolicy`` does not retry it). With a checkpointer, raise the budget and
  ``graph.invoke(None, config)`` re-runs only the denied node.
- ``interrupt``: pause with ``interrupt()``; resume with
  ``Command(resume={"total_tokens": 5000})`` (`Budget.top_up` keywords, applied
  once however often the node re-runs, and in whichever process: the store
  remembers the answers it applied) or ``Command(resume={})``. An LLM or tool call the
  node makes itself pauses where it is refused; every re-run of the node pauses at the same
  places (see `_Pauses`), so that the node's own ``interrupt()`` questions keep their answers.
  A refusal inside a nested graph or a tool node's tool ends that work; the node pauses as it
  ends and runs again from its start (asking its earlier questions again).
- ``skip``: the node does not run; a `Skipped` marker goes to the ledger and to a
  ``budget_skipped`` state key if the schema has one (a list with an adding
  reducer). A skipped tool node answers its pending tool calls with error tool
  messages. A node skipped twice in one run ends the run instead of looping.
- ``end``: stop the run without raising and return the state reached so far (a governed graph run
  inside a graph `govern_graph` did not wrap returns it there, and that graph goes on).

A resumed node re-runs from its start and repeats the LLM calls it made before
the refusal: keep one LLM call per node where that matters. Of parallel branches
(``Send``), those finished when a sibling is denied are kept on resume; LangGraph may
drop the result of one still running then (it finishes after its step has failed), and
that branch runs again. Error handlers that
catch every exception (``ToolNode(handle_tool_errors=True)``, a graph-level
``error_handler``) also catch `BudgetExceeded`: a denied tool then becomes an
error message to the model and the run goes on. Re-raise it there if it must stop the run.
An error-handler node is governed like any node (its agent is its node name,
``__error_handler__<node>`` or ``__default_error_handler__``): a fallback to a cheaper model is
checked and charged.
``end`` stops a run the way LangGraph stops an interrupted one (with an interrupt that asks
nothing): error handlers and retry policies leave it alone, the root run ends without an error
for tracers and ``astream_events``, and a stream stops after the step of the refusal (a question
another node of that step asks with ``interrupt()`` still reaches the caller, in ``invoke``'s result too).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import itertools
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import Token
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast
from uuid import UUID

try:
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.runnables import Runnable, RunnableConfig
    from langchain_core.runnables.config import ensure_config, set_config_context, var_child_runnable_config
    from langgraph._internal._constants import CONFIG_KEY_SCRATCHPAD  # pinned: langgraph>=1,<2
    from langgraph._internal._runnable import RunnableCallable
    from langgraph.config import get_config
    from langgraph.errors import GraphInterrupt
    from langgraph.graph.state import StateGraph
    from langgraph.types import GraphOutput, interrupt
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('budgetary.integrations.langgraph needs langgraph: pip install "budgetary[langgraph]"') from exc

from budgetary.core.budget import POLICIES, Budget
from budgetary.core.errors import BudgetExceeded, ConfigurationError
from budgetary.core.skip import Skipped
from budgetary.integrations._common import apply_top_up_once, budget_key
from budgetary.integrations.langchain import BudgetCallbackHandler, _AwaitedInAsyncRuns, _node_owners

__all__ = ["SKIPPED_KEY", "budget_node", "govern_graph"]

logger = logging.getLogger("budgetary")

SKIPPED_KEY = "budget_skipped"
"""State key that receives `Skipped` markers when the graph's schema has it."""

_AGENT_MODEL_NODES = frozenset({"model", "agent"})
"""The LLM nodes of LangChain's ``create_agent`` and LangGraph's ``create_react_agent``."""

F = TypeVar("F", bound=Callable[..., Any])


class _EndRun(GraphInterrupt):
    """Raised by a node to end the run under the ``end`` policy: to LangGraph, an interrupt that asks nothing.

    So the root graph ends its run as it ends an interrupted one: the other tasks of the step
    finish and are kept, the run ends without an error (tracers and ``astream_events`` see it
    end), with a checkpointer it is resumable at the refused node, and error handlers and
    ``RetryPolicy`` leave it alone. The governed graph returns the state reached so far.
    """

    def __init__(self, reason: str, state: Any, marker: Skipped | None) -> None:
        super().__init__()  # no interrupts: LangGraph reports none and the run has nothing to answer
        self.reason = reason
        self.state = state
        """The state the ending node received: the state reached so far."""
        self.marker = marker


@dataclass
class _RunState:
    resumable: bool = False
    """Whether the graph has a checkpointer: an ``end`` then stops the run at the refused node, resumable there."""
    skipped: dict[tuple[str, str], Any] = field(default_factory=dict)
    """(graph invocation, node) -> the step the node was first skipped at."""
    ending: _EndRun | None = None
    """Set by a node refused under ``end`` in a graph with no checkpointer: the run ends before its next step."""
    ending_at: tuple[str, Any] = ("", None)
    """Where the ``end`` refusal happened: its graph invocation and step (see `_position`)."""
    ended: _EndRun | None = None
    """The first `_EndRun` raised in the run: the root graph ends the run at it, and ``invoke`` returns the state."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    latest: Any = None
    """The latest full state ``invoke`` saw (its ``values`` stream), returned when the run ends."""
    unclaimed: bool = False
    """Set by ``invoke``: the next stream of the run is its own graph's (see `claim`)."""
    chunks: list[Any] | None = None
    """The chunks of that stream, kept when ``invoke`` returns them (a ``stream_mode`` other than ``values``)."""
    failed: set[str] = field(default_factory=set)
    """Tasks (checkpoint namespaces) that failed after they took their ``max_agents`` slot, in a run with no
    checkpointer: a retry re-running one takes no second slot (a checkpointed run marks them in the store)."""

    def claim(self) -> bool:
        """Whether a stream of this run is the one ``invoke`` runs through, whose chunks `observe` keeps.

        ``invoke`` streams its own graph before any node starts; every later stream of the run is a
        nested graph's, whose state is not the run's.
        """
        with self.lock:
            claimed, self.unclaimed = self.unclaimed, False
        return claimed

    def end(self, end: _EndRun) -> _EndRun:
        """``end``, kept as the run's ending if it is the first (what ``invoke`` returns from)."""
        with self.lock:
            if self.ended is None:
                self.ended = end
        return end

    def observe(self, chunk: Any) -> None:
        if self.chunks is not None:
            self.chunks.append(chunk)
        if isinstance(chunk, tuple) and len(chunk) == 2 and chunk[0] == "values":
            self.latest = chunk[1]
        elif isinstance(chunk, dict) and chunk.get("type") == "values":
            self.latest = chunk.get("data")


_RUN_KEY = "__budgetary_run"
"""Configurable key carrying a governed run's `_RunState` to its nodes and nested graphs.

The config, not a context variable: a context variable set in a generator (``stream``)
would leak into the caller's loop body between chunks. LangGraph keeps ``__`` keys out of
checkpoint metadata.
"""


def _run_of(config: Mapping[str, Any] | None) -> _RunState | None:
    """The governed run a node or nested graph belongs to (None outside `govern_graph`'s graphs)."""
    configurable = (config or {}).get("configurable")
    return configurable.get(_RUN_KEY) if configurable else None


def _with_run(config: Mapping[str, Any] | None, run: _RunState) -> dict[str, Any]:
    config = dict(ensure_config(cast(Any, config)))
    config["configurable"] = {**config.get("configurable", {}), _RUN_KEY: run}
    return config


@dataclass
class _Options:
    skip_key: bool = False
    """Whether the compiled graph's state has a ``budget_skipped`` channel."""


class _Governor:
    """Entry checks and refusal policy for one node (or one `budget_node` function)."""

    def __init__(
        self, budget: Budget, node: str | None, agent: str | None, policy: str, options: _Options, by_node: bool
    ) -> None:
        """``by_node``: the agent is the node's name (``agent`` is ignored); else ``agent`` (``None``: the run)."""
        if policy not in POLICIES:
            raise ConfigurationError(f"on_exhausted must be one of {POLICIES}, got {policy!r}")
        self.budget, self.node, self.agent, self.policy, self.options = budget, node, agent, policy, options
        self.by_node = by_node

    def names(self, config: Mapping[str, Any]) -> tuple[str, str | None]:
        node = self.node or config.get("metadata", {}).get("langgraph_node") or self.unnamed
        return node, node if self.by_node else self.agent

    def pauses(self, config: Mapping[str, Any], node: str) -> _Pauses | None:
        """Where the budget pauses this node execution; None unless its policy is ``interrupt`` in a graph run."""
        if self.policy != "interrupt" or CONFIG_KEY_SCRATCHPAD not in config.get("configurable", {}):
            return None
        task = config.get("metadata", {}).get("langgraph_checkpoint_ns") or node
        return _Pauses(self.budget, task, node, config["configurable"][CONFIG_KEY_SCRATCHPAD])

    def node_config(
        self, config: Mapping[str, Any], agent: str | None, pauses: _Pauses | None = None
    ) -> tuple[Any, _NodeHandler]:
        """``config`` with a handler charging the node's calls to ``agent`` (one per execution), and the handler."""
        # It owns the node's calls (see `own`); a node mapped to no agent charges the run.
        answers: dict[str, ToolMessage] | None = {} if self.node_is_tools else None
        handler = (
            _NodeHandler(self.budget, agent, answers)
            if pauses is None
            else _PausingNodeHandler(self.budget, agent, answers, pauses)
        )
        callbacks = config.get("callbacks")
        if callbacks is None:
            callbacks = [handler]
        elif isinstance(callbacks, list):
            callbacks = [*callbacks, handler]
        else:  # a callback manager (what LangGraph hands a node): copy it, as merge_configs would
            callbacks = callbacks.copy()
            callbacks.add_handler(handler, inherit=True)
        # Only the callbacks change: merge_configs would also copy metadata, tags and
        # configurable, which made it the largest cost of a governed node.
        return {**config, "callbacks": callbacks}, handler

    def own(self, handler: BudgetCallbackHandler) -> Token[Any]:
        """Make ``handler`` the one that charges this budget's calls in the node (reset the token after)."""
        owners = _node_owners.get()
        return _node_owners.set({**owners, handler._key: handler} if owners else {handler._key: handler})

    def enter(
        self, state: Any, config: Mapping[str, Any], node: str, agent: str | None, pauses: _Pauses | None
    ) -> tuple[bool, Any]:
        """(True, None) to run the node, else (False, the node's result under the policy)."""
        _end_if_ending(state, config)
        once = self.start_marker(config)
        if once is None and self._retried(config):
            return True, None
        entry = pauses.at(0) if pauses is not None else None
        if entry is not None:
            entry.replay()
        while not (decision := self.budget.begin_agent(agent, location=node, once=once)).allowed:
            exc = self.budget.exceeded(decision, agent)
            if entry is None:
                return False, self.refused(exc, state, config, None)[1]
            entry.ask(exc)
        return True, None

    async def aenter(
        self, state: Any, config: Mapping[str, Any], node: str, agent: str | None, pauses: _Pauses | None
    ) -> tuple[bool, Any]:
        """`enter` for async nodes: every store call is awaited or made off the event loop."""
        _end_if_ending(state, config)
        once = self.start_marker(config)
        if once is None and self._retried(config):
            return True, None
        entry = pauses.at(0) if pauses is not None else None
        if entry is not None:
            await entry.areplay()
        while not (decision := await self.budget.abegin_agent(agent, location=node, once=once)).allowed:
            exc = await self.budget.aexceeded(decision, agent)
            if entry is None:
                return False, (await self.arefused(exc, state, config, None))[1]
            await entry.aask(exc)
        return True, None

    @staticmethod
    def start_marker(config: Mapping[str, Any]) -> str | None:
        """What marks this node execution's start in the store, when a resume may re-run it: its task.

        A node that fails or pauses after it took its ``max_agents`` slot is marked (`started`);
        the resume (or ``RetryPolicy`` retry) re-running it, in this process or another, finds the
        mark and takes no second slot. None in a run with no checkpointer (see `_retried`).
        """
        task = config.get("metadata", {}).get("langgraph_checkpoint_ns")
        run = _run_of(config)  # None for a `budget_node` in a graph govern_graph did not wrap: it may resume
        return f"start:{task}" if task and (run is None or run.resumable) else None

    @staticmethod
    def _retried(config: Mapping[str, Any]) -> bool:
        """Whether a run with no checkpointer re-runs a task that failed after taking its slot (a retry, here)."""
        run = _run_of(config)
        return run is not None and config.get("metadata", {}).get("langgraph_checkpoint_ns") in run.failed

    def _remember_start(self, config: Mapping[str, Any]) -> str | None:
        """Remember a node execution that ends by an exception after it took its slot: the mark to write, if any.

        A run with no checkpointer keeps it itself (only a retry re-runs the task, in this process).
        """
        run = _run_of(config)
        if run is not None and not run.resumable:
            task = config.get("metadata", {}).get("langgraph_checkpoint_ns")
            if task:
                with run.lock:
                    run.failed.add(task)
            return None
        return self.start_marker(config)

    def started(self, config: Mapping[str, Any]) -> None:
        """Mark the start of a node execution that ends by an exception (see `start_marker`)."""
        marker = self._remember_start(config)
        if marker is not None:
            self._mark(marker)

    async def astarted(self, config: Mapping[str, Any]) -> None:
        marker = self._remember_start(config)
        if marker is not None:
            await self.budget.off_loop(self._mark, marker)

    def _mark(self, marker: str) -> None:
        try:
            self.budget.mark(marker)
        except Exception:  # the node's own exception is what the caller must see
            logger.warning("could not mark the start of %s; a resume re-running it takes another slot", marker)

    def refused(
        self, exc: BudgetExceeded, state: Any, config: Mapping[str, Any], pauses: _Pauses | None,
        answered: Mapping[str, Any] = {},
    ) -> tuple[bool, Any]:  # fmt: skip
        """Apply the policy to a refusal: (True, None) to try again after an interrupt, else (False, result).

        ``answered``: tool call id -> the `ToolMessage` of a tool the node ran before the refusal.
        """
        if self.policy == "interrupt":
            point = self._pausing(exc, pauses).at()
            point.replay()
            if not point.asked:  # else try again with the answers an earlier run of the task got here
                point.ask(exc)
            return True, None
        step, then = self._refusal(exc, state, config, answered)
        return then(step())

    async def arefused(
        self, exc: BudgetExceeded, state: Any, config: Mapping[str, Any], pauses: _Pauses | None,
        answered: Mapping[str, Any] = {},
    ) -> tuple[bool, Any]:  # fmt: skip
        """`refused` for async nodes: its store steps (a top-up, a skip marker) run off the event loop."""
        if self.policy == "interrupt":
            point = self._pausing(exc, pauses).at()
            await point.areplay()
            if not point.asked:
                await point.aask(exc)
            return True, None
        step, then = self._refusal(exc, state, config, answered)
        return then(await self.budget.off_loop(step))

    @staticmethod
    def _pausing(exc: BudgetExceeded, pauses: _Pauses | None) -> _Pauses:
        if pauses is None:  # not in a graph run (a node called directly): there is no run to pause and resume
            raise BudgetExceeded(
                f"{exc}; interrupt can pause only a graph run", budget=exc.budget, agent=exc.agent,
                resource=exc.resource, limit=exc.limit, spent=exc.spent, requested=exc.requested,
                snapshot=exc.snapshot,
            ) from exc  # fmt: skip
        return pauses

    def _refusal(
        self, exc: BudgetExceeded, state: Any, config: Mapping[str, Any], answered: Mapping[str, Any]
    ) -> tuple[Callable[[], Any], Callable[[Any], tuple[bool, Any]]]:
        """A refusal under ``deny``, ``skip`` or ``end``: its store step, and what `refused` returns after it."""
        node, agent = self.names(config)
        if self.policy == "deny":
            raise exc
        skip = functools.partial(self.budget.skip, agent, str(exc), resource=exc.resource, location=node)
        return skip, lambda marker: (False, self._skipped(marker, exc, state, config, node, answered))

    def _skipped(
        self, marker: Skipped, exc: BudgetExceeded, state: Any, config: Mapping[str, Any], node: str,
        answered: Mapping[str, Any],
    ) -> Any:  # fmt: skip
        """The node's result once skipped: its state update, or the end of the run (``end``, or a loop)."""
        governed = _run_of(config)  # None for a `budget_node` in a graph govern_graph did not wrap
        if self.policy == "end" or (governed is not None and _skipped_before(governed, node, config)):
            fields = {"budget": exc.budget, "agent": marker.agent, "resource": exc.resource, "limit": exc.limit,
                      "spent": exc.spent, "requested": exc.requested, "snapshot": exc.snapshot}  # fmt: skip
            if governed is None:  # LangGraph has no switch to end a run: only govern_graph's wrapper can
                raise BudgetExceeded(f"{exc}; the run ends here (govern_graph ends a run without raising)", **fields)
            end = _EndRun(str(exc), state, marker)
            if self.policy != "end" or not governed.resumable:
                # Let the step end with this node skipped (its pending tool calls answered, what its
                # siblings finish kept: no checkpoint may keep it), then end the run before the next
                # node starts. Only `end` with a checkpointer stops at this node (resumable there) as its step ends.
                with governed.lock:
                    if governed.ending is None:
                        governed.ending, governed.ending_at = end, _position(config)
                return self.skip_update(marker, state, answered)
            raise governed.end(end) from exc
        return self.skip_update(marker, state, answered)

    def skip_update(self, marker: Skipped, state: Any, answered: Mapping[str, Any] = {}) -> dict[str, Any]:
        update: dict[str, Any] = {SKIPPED_KEY: [marker]} if self.options.skip_key else {}
        messages = state.get("messages") if isinstance(state, Mapping) else getattr(state, "messages", None)
        last = messages[-1] if isinstance(messages, list) and messages else None
        pending: list[Any] = []
        if self.node_is_tools:
            if isinstance(state, list):  # create_agent sends the tool calls themselves to its tool node
                pending = [c for c in state if isinstance(c, Mapping) and "id" in c and "name" in c]
            elif isinstance(state, Mapping) and isinstance(state.get("tool_call"), Mapping):
                pending = [state["tool_call"]]
            elif isinstance(last, AIMessage):
                pending = list(last.tool_calls)
        if pending:
            # The agent loop needs an answer to every tool call it made.
            update["messages"] = [
                answered.get(call["id"])
                or ToolMessage(
                    content=f"Not run: {marker.reason}", tool_call_id=call["id"], name=call["name"], status="error"
                )
                for call in pending
            ]
        elif self.node_is_model and last is not None and not (isinstance(last, AIMessage) and last.tool_calls):
            # A prebuilt agent's model node must answer, or its router loops or fails: answer that it stopped.
            update["messages"] = [AIMessage(content=f"Stopped by the budget: {marker.reason}")]
        return update

    node_is_tools = False
    node_is_model = False
    unnamed = "node"
    """The node's name where no LangGraph node names it: a `budget_node` run outside any graph (in a chain)."""


class _Pauses:
    """Where the budget paused one node execution (``interrupt``), so that every re-run pauses the same way.

    LangGraph gives a task's resume values to its ``interrupt()`` calls by position, the node's own
    calls included. A budget interrupt asked at a check point in an earlier run of the task is made
    again there on every re-run, even when the budget allows now: its recorded answer comes back
    (applied once), and the node's own interrupts keep theirs. Check points: 0 is the node's entry,
    then come the LLM and tool calls of its own task, in order, and the refusals that end its body
    (from a nested graph or a tool node). The store remembers where it asked, for any worker that resumes.
    """

    def __init__(self, budget: Budget, task: str, node: str, scratchpad: Any) -> None:
        self.budget, self.task, self.node = budget, task, node
        self._scratchpad = scratchpad
        self._answers_at_start = len(scratchpad.resume)  # it grows only when an interrupt takes the new answer
        self._points = itertools.count(1)

    def answer_waiting(self) -> bool:
        """Whether the task's next ``interrupt()`` would get an answer rather than pause.

        Its answer is the one recorded at its position (an earlier run's, or one given by interrupt id),
        else the run's new ``Command(resume=...)`` answer if no interrupt took it yet.
        ``Command(resume={})`` gives none: LangGraph reads an empty mapping as answers by interrupt id.
        """
        scratchpad = self._scratchpad
        position, answers = _next_interrupt(scratchpad), len(scratchpad.resume)
        if position is None:  # another LangGraph: make the interrupt again (it pauses if nothing answers)
            return True
        if position < answers:
            return True
        return position == answers == self._answers_at_start and scratchpad.get_null_resume(False) is not None

    def here(self) -> bool:
        """Whether a call runs in this node's own task (not in a graph nested in it, which has its own)."""
        current = var_child_runnable_config.get()
        return current is not None and current.get("metadata", {}).get("langgraph_checkpoint_ns") == self.task

    def at(self, point: int | None = None) -> _Point:
        """Check point ``point``, or the next one."""
        return _Point(self, next(self._points) if point is None else point)


def _next_interrupt(scratchpad: Any) -> int | None:
    """The position the task's next ``interrupt()`` takes (LangGraph counts them per task run); None if unknown.

    Read without taking one: LangGraph's counter is an ``itertools.count`` (its ``repr`` is ``count(n)``).
    """
    counter = getattr(scratchpad.interrupt_counter, "_counter", False)
    if counter is None:  # not used yet in this run of the task
        return 0
    match = re.fullmatch(r"count\((\d+)\)", repr(getattr(counter, "__self__", None)))
    return int(match.group(1)) if match else None


class _Point:
    """One check point of a node execution: the budget interrupts asked there, in order."""

    __slots__ = ("asked", "pauses", "point")

    def __init__(self, pauses: _Pauses, point: int) -> None:
        self.pauses, self.point, self.asked = pauses, point, 0

    def _marker(self, what: str) -> str:
        # "resume:" is the marker of the applied answer (`apply_top_up_once`).
        return f"{what}:{self.pauses.task}:{self.point}:{self.asked}"

    def replay(self) -> None:
        """Make again the interrupts asked here by earlier runs of the task."""
        while self._replays():
            self._answered(interrupt(self._waiting()))

    async def areplay(self) -> None:
        while await self.pauses.budget.off_loop(self._replays):
            await self.pauses.budget.off_loop(self._answered, interrupt(self._waiting()))

    def _replays(self) -> bool:
        """Whether the next interrupt asked here earlier is made again (its answer is there, or is coming now).

        One left unanswered by a resume without an answer (a top-up made elsewhere, then
        ``Command(resume={})``) is retired: the run goes on if the budget allows, else asks anew.
        """
        budget = self.pauses.budget
        while budget.marked(self._marker("ask")):
            if budget.marked(self._marker("retired")):
                self.asked += 1
                continue
            if budget.marked(self._marker("resume")) or self.pauses.answer_waiting():
                return True
            budget.mark(self._marker("retired"))
            self.asked += 1
            return False
        return False

    def ask(self, exc: BudgetExceeded) -> None:
        """Pause for ``exc`` (remembered first: a re-run asks here again); resumed, apply the answer."""
        self.pauses.budget.mark(self._marker("ask"))
        self._answered(interrupt(self._question(exc)))

    async def aask(self, exc: BudgetExceeded) -> None:
        budget = self.pauses.budget
        await budget.off_loop(budget.mark, self._marker("ask"))
        await budget.off_loop(self._answered, interrupt(self._question(exc)))

    def _answered(self, answer: Any) -> None:
        apply_top_up_once(self.pauses.budget, answer, (self.pauses.task, f"{self.point}:{self.asked}"))
        self.asked += 1

    def _question(self, exc: BudgetExceeded) -> dict[str, Any]:
        return {
            "reason": str(exc), "node": self.pauses.node, "agent": exc.agent, "budget": exc.budget,
            "resource": exc.resource, "limit": exc.limit, "spent": exc.spent, "requested": exc.requested,
        }  # fmt: skip

    def _waiting(self) -> dict[str, Any]:
        """What a replayed interrupt asks when it has no answer yet (the run was resumed without one)."""
        budget = self.pauses.budget
        return {
            "reason": f"the budget interrupt of node {self.pauses.node!r} waits for its answer: resume with "
            "Command(resume={...}) (top_up keywords, or {} after a top-up made elsewhere)",
            "node": self.pauses.node, "agent": None, "budget": budget.name, "resource": None, "limit": None,
            "spent": None, "requested": None,
        }  # fmt: skip


class _NodeHandler(BudgetCallbackHandler):
    """The handler of one node execution: it charges the node's agent, whatever metadata names.

    A node mapped to the run (``agents={"node": None}``) charges the run. A tool node's handler keeps
    what its tools answered: skipped, the node answers only the tool calls that did not run.
    """

    def __init__(self, budget: Budget, agent: str | None, answers: dict[str, ToolMessage] | None) -> None:
        super().__init__(budget, agent, rank=1)
        self.answers = answers

    def _agent_for(self, metadata: Mapping[str, Any] | None) -> str | None:
        return self.agent

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        super().on_tool_end(output, run_id=run_id, **kwargs)
        if self.answers is not None and isinstance(output, ToolMessage):
            self.answers[output.tool_call_id] = output


class _PausingNodeHandler(_NodeHandler):
    """The handler of a node execution under ``interrupt``: a call of the node's own task pauses where refused.

    A node re-run from its start after a pause would ask its own interrupt() questions again, and
    every re-run of the task pauses at the same places (see `_Pauses`). A call in a graph nested in
    the node raises: the nested graph stops and the node pauses as it ends (`_govern_call`); so does a
    tool of a tool node (its calls run at once, in no fixed order). Nodes under other policies use
    `_NodeHandler`, which adds nothing to their calls.
    """

    def __init__(
        self, budget: Budget, agent: str | None, answers: dict[str, ToolMessage] | None, pauses: _Pauses
    ) -> None:
        super().__init__(budget, agent, answers)
        self.pauses = pauses
        self.tool_pauses = pauses if answers is None else None  # a tool node's tools raise, as above

    def _pausing(self, pauses: _Pauses | None, start: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        if pauses is None or not pauses.here():
            return start(self, *args, **kwargs)
        point = pauses.at()
        point.replay()
        while True:
            try:
                return start(self, *args, **kwargs)
            except BudgetExceeded as exc:
                point.ask(exc)

    async def _apausing(
        self, pauses: _Pauses | None, start: Callable[..., Awaitable[None]], *args: Any, **kwargs: Any
    ) -> None:  # fmt: skip
        if pauses is None or not pauses.here():
            return await start(self, *args, **kwargs)
        point = pauses.at()
        await point.areplay()
        while True:
            try:
                return await start(self, *args, **kwargs)
            except BudgetExceeded as exc:
                await point.aask(exc)

    def _on_call_start(self, *args: Any, **kwargs: Any) -> None:
        return self._pausing(self.pauses, BudgetCallbackHandler._on_chat_model_start, *args, **kwargs)

    async def _aon_call_start(self, *args: Any, **kwargs: Any) -> None:
        return await self._apausing(self.pauses, BudgetCallbackHandler._aon_chat_model_start, *args, **kwargs)

    def _on_tool_call_start(self, *args: Any, **kwargs: Any) -> None:
        return self._pausing(self.tool_pauses, BudgetCallbackHandler._on_tool_start, *args, **kwargs)

    async def _aon_tool_call_start(self, *args: Any, **kwargs: Any) -> None:
        return await self._apausing(self.tool_pauses, BudgetCallbackHandler._aon_tool_start, *args, **kwargs)

    on_chat_model_start = _AwaitedInAsyncRuns(_on_call_start, _aon_call_start)
    on_llm_start = _AwaitedInAsyncRuns(_on_call_start, _aon_call_start)
    on_tool_start = _AwaitedInAsyncRuns(_on_tool_call_start, _aon_tool_call_start)


def _end_if_ending(state: Any, config: Mapping[str, Any]) -> None:
    """End the run at a node of a later step than one refused under ``end``, in the same graph (see `_skipped`)."""
    run = _run_of(config)
    if run is not None and run.ending is not None:
        graph, step = _position(config)
        if graph != run.ending_at[0] or step == run.ending_at[1]:
            return  # a sibling in the refused node's step, or a node of a subgraph running in it
        # A new exception per node (several may enter the next step at once), with the state this node was given.
        raise run.end(_EndRun(run.ending.reason, state, run.ending.marker))


def _end_after_subgraph(config: Mapping[str, Any]) -> None:
    """A node whose subgraph was refused under ``end`` at its last step: end the run after this node's step.

    The subgraph had no next step to end at, so the ending moves up to the graph this node runs in.
    """
    run = _run_of(config)
    if run is None or run.ending is None:
        return
    namespace = config.get("metadata", {}).get("langgraph_checkpoint_ns", "")
    with run.lock:
        refused_in = run.ending_at[0]
        if namespace and (refused_in == namespace or refused_in.startswith(namespace + "|")):
            run.ending_at = _position(config)


def _position(config: Mapping[str, Any]) -> tuple[str, Any]:
    """Where a node runs: its graph invocation (the checkpoint namespace above it) and its step there."""
    metadata = config.get("metadata", {})
    return metadata.get("langgraph_checkpoint_ns", "").rpartition("|")[0], metadata.get("langgraph_step")


def _skipped_before(run: _RunState, node: str, config: Mapping[str, Any]) -> bool:
    """Whether ``node`` was skipped at an earlier step of this run: a loop, which skipping would spin.

    Its `Send` siblings skipped in the same step are not a loop.
    """
    graph, step = _position(config)
    key = (graph, node)  # the same node name in another graph invocation (a sub-agent's) is another node
    with run.lock:
        if key not in run.skipped:
            run.skipped[key] = step
            return False
        return step is None or run.skipped[key] != step


def _govern_call(
    governor: _Governor, state: Any, config: Any, invoke: Callable[[Any], Any], in_context: bool = False
) -> Any:
    """Entry checks, then ``invoke(node_config)`` with the node's handler in the config context.

    ``in_context``: ``invoke`` sets the config context from ``node_config`` itself.
    """
    node, agent = governor.names(config)
    governor.budget.ensure_agent(agent)
    pauses = governor.pauses(config, node)
    go, result = governor.enter(state, config, node, agent, pauses)
    if not go:
        return result
    try:
        while True:
            node_config, handler = governor.node_config(config, agent, pauses)
            owner = governor.own(handler)
            try:
                if in_context:
                    result = invoke(node_config)
                else:
                    # Node functions that take no `config` read it from this context variable.
                    with set_config_context(node_config) as context:
                        result = context.run(invoke, node_config)
                _end_after_subgraph(config)
                return result
            except BudgetExceeded as exc:
                again, result = governor.refused(exc, state, config, pauses, handler.answers or {})
                if not again:
                    return result
            finally:
                _node_owners.reset(owner)
    except BaseException:
        governor.started(config)  # paused or failed after it took its slot: a resume must not take another
        raise


async def _agovern_call(
    governor: _Governor, state: Any, config: Any, invoke: Callable[[Any], Any], in_context: bool = False
) -> Any:
    """Async twin of `_govern_call`; ``invoke`` returns an awaitable."""
    node, agent = governor.names(config)
    await governor.budget.aensure_agent(agent)
    pauses = governor.pauses(config, node)
    go, result = await governor.aenter(state, config, node, agent, pauses)
    if not go:
        return result
    try:
        while True:
            node_config, handler = governor.node_config(config, agent, pauses)
            owner = governor.own(handler)
            try:
                if in_context:
                    result = await invoke(node_config)
                else:
                    with set_config_context(node_config) as context:
                        result = await context.run(_as_task, invoke, node_config)
                _end_after_subgraph(config)
                return result
            except BudgetExceeded as exc:
                again, result = await governor.arefused(exc, state, config, pauses, handler.answers or {})
                if not again:
                    return result
            finally:
                _node_owners.reset(owner)
    except BaseException:
        await governor.astarted(config)
        raise


def _wrap_runnable(inner: Runnable[Any, Any], governor: _Governor) -> Runnable[Any, Any]:
    """Wrap a node's runnable; `RunnableLambda` keeps subgraph detection and LangGraph's injected kwargs."""
    # A traced RunnableCallable (what add_node makes of a function) runs its function in the
    # config context of the config it is given; anything else gets the context from us.
    in_context = isinstance(inner, RunnableCallable) and bool(inner.trace)

    def run(state: Any, config: RunnableConfig) -> Any:
        return _govern_call(governor, state, config, lambda node_config: inner.invoke(state, node_config), in_context)

    async def arun(state: Any, config: RunnableConfig) -> Any:
        return await _agovern_call(
            governor, state, config, lambda node_config: inner.ainvoke(state, node_config), in_context
        )

    # LangGraph's own node wrapper, untraced like the nodes it wraps: a RunnableLambda would add a
    # traced run per node execution (and double the graph's overhead). LangGraph still finds
    # subgraphs through the closure of `run`.
    return RunnableCallable(run, arun, name=getattr(inner, "name", None) or "node", trace=False, recurse=False)


def _as_task(invoke: Callable[[Any], Any], node_config: Any) -> Any:
    # Called inside the node's context: the coroutine is created there, and the task
    # (which copies the current context) runs there.
    return asyncio.ensure_future(invoke(node_config))


def _governed_class(base: Any) -> type:
    """A subclass of the compiled graph's class that turns the ``end`` policy into a normal return."""
    cached = _governed_classes.get(base)
    if cached is not None:
        return cached

    def _ended(
        self: Any,
        end: _EndRun,
        config: Any,
        run: _RunState,
        kwargs: dict[str, Any],
        output: Any = None,
        nested: bool = False,
    ) -> Any:
        """What ``invoke`` returns (its ``stream_mode``, ``output_keys`` and ``version``) for the run so far.

        ``output``: what LangGraph's ``invoke`` returned (its real interrupts are kept). ``nested``: the graph
        runs inside a graph `govern_graph` did not wrap, which goes on with this state.
        """
        if run.chunks is not None:
            return run.chunks
        keys = kwargs.get("output_keys")
        keys = self.output_channels if keys is None else keys
        configurable = (config or {}).get("configurable", {})
        if _persists(self) and configurable.get("thread_id") is not None and not nested:
            # What the thread's latest checkpoint holds: resumable from here. Not the checkpoint a run
            # replayed from (``checkpoint_id``, time travel): that one is where the run started.
            latest = {**config, "configurable": {k: v for k, v in configurable.items() if k != "checkpoint_id"}}
            state = _output(self.get_state(latest).values, keys)
        else:  # what the run's stream returned (invoke's output already), else the ending node's input
            state = run.latest if run.latest is not None else _output(end.state, keys)
        # The marker is missing when the run stopped at once, or ended in a nested graph whose state never
        # reached this one; a skip update that reached it already holds it.
        if end.marker is not None and isinstance(state, Mapping) and not isinstance(keys, str) and SKIPPED_KEY in keys:
            if end.marker not in (markers := state.get(SKIPPED_KEY) or []):
                state = {**state, SKIPPED_KEY: [*markers, end.marker]}
        # A sibling of the refused node that asked the user (interrupt()) in the same step: the question
        # still reaches the user, as LangGraph's invoke hands it over.
        if isinstance(output, GraphOutput):
            interrupts = tuple(output.interrupts)
        else:
            interrupts = tuple(output.get("__interrupt__", ())) if isinstance(output, Mapping) else ()
        if kwargs.get("version") == "v2":
            return GraphOutput(value=state, interrupts=interrupts)
        if interrupts:
            return (
                {**state, "__interrupt__": list(interrupts)}
                if isinstance(state, dict)
                else {"__interrupt__": list(interrupts)}
            )
        return state

    # Only the outermost call of a run turns `end` into a return: `invoke` runs through `stream`,
    # and a governed graph used as a subgraph must end its parent's run too.
    def invoke(self: Any, input: Any, config: Any = None, **kwargs: Any) -> Any:
        if _run_of(config) is not None or _run_of(var_child_runnable_config.get()) is not None:
            return base.invoke(self, input, config, **kwargs)
        run = _RunState(resumable=_persists(self), unclaimed=True)
        if kwargs.get("stream_mode", "values") != "values":
            run.chunks = []
        try:
            output = base.invoke(self, input, _with_run(config, run), **kwargs)
        except GraphInterrupt as exc:
            if (end := _ended_inside(run, exc)) is None:
                raise
            return _ended(self, end, config, run, kwargs, nested=True)
        return output if run.ended is None else _ended(self, run.ended, config, run, kwargs, output)

    async def ainvoke(self: Any, input: Any, config: Any = None, **kwargs: Any) -> Any:
        if _run_of(config) is not None or _run_of(var_child_runnable_config.get()) is not None:
            return await base.ainvoke(self, input, config, **kwargs)
        run = _RunState(resumable=_persists(self), unclaimed=True)
        if kwargs.get("stream_mode", "values") != "values":
            run.chunks = []
        try:
            output = await base.ainvoke(self, input, _with_run(config, run), **kwargs)
        except GraphInterrupt as exc:
            if (end := _ended_inside(run, exc)) is None:
                raise
            return _ended(self, end, config, run, kwargs, nested=True)
        return output if run.ended is None else _ended(self, run.ended, config, run, kwargs, output)

    def stream(self: Any, input: Any, config: Any = None, **kwargs: Any) -> Any:
        current = _run_of(config) or _run_of(var_child_runnable_config.get())
        if current is not None:
            observe = current.observe if current.claim() else None
            for chunk in base.stream(self, input, config, **kwargs):
                if current.ended is not None and _ends_run(chunk):
                    continue
                if observe is not None:
                    observe(chunk)
                yield chunk
            return
        run = _RunState(resumable=_persists(self))
        try:
            for chunk in base.stream(self, input, _with_run(config, run), **kwargs):
                if run.ended is None or not _ends_run(chunk):
                    yield chunk
        except GraphInterrupt as exc:
            if _ended_inside(run, exc) is None:
                raise

    async def astream(self: Any, input: Any, config: Any = None, **kwargs: Any) -> Any:
        current = _run_of(config) or _run_of(var_child_runnable_config.get())
        if current is not None:
            observe = current.observe if current.claim() else None
            async for chunk in base.astream(self, input, config, **kwargs):
                if current.ended is not None and _ends_run(chunk):
                    continue
                if observe is not None:
                    observe(chunk)
                yield chunk
            return
        run = _RunState(resumable=_persists(self))
        try:
            async for chunk in base.astream(self, input, _with_run(config, run), **kwargs):
                if run.ended is None or not _ends_run(chunk):
                    yield chunk
        except GraphInterrupt as exc:
            if _ended_inside(run, exc) is None:
                raise

    def copy(self: Any, update: dict[str, Any] | None = None) -> Any:
        # Pregel.copy (also behind with_config) rebuilds the graph from its constructor's arguments,
        # which do not include how it was governed: carry that over.
        own = {key: value for key, value in self.__dict__.items() if key.startswith("_budgetary_")}
        attrs = {key: value for key, value in self.__dict__.items() if key not in own and key != "__orig_class__"}
        new = self.__class__(**{**attrs, **(update or {})})
        new.__dict__.update(own)
        return new

    namespace = {
        "invoke": invoke, "ainvoke": ainvoke, "stream": stream, "astream": astream, "copy": copy, "_budgetary": True,
    }  # fmt: skip
    cls = type(f"Governed{base.__name__}", (base,), namespace)
    _governed_classes[base] = cls
    return cls


_governed_classes: dict[type, type] = {}


def _ended_inside(run: _RunState, exc: GraphInterrupt) -> _EndRun | None:
    """The run's `end` if ``exc`` is it leaving a governed graph nested in a graph `govern_graph` did not wrap.

    A nested graph passes its interrupts up rather than ending on them; the governed graph's run is its
    own, so it returns its state so far there (and the parent goes on). One with a real interrupt in it
    goes up: the user must see the question.
    """
    return None if exc.args and exc.args[0] else run.ended


def _ends_run(chunk: Any) -> bool:
    """Whether a stream chunk is LangGraph's report of the `_EndRun` (an interrupt with nothing to ask).

    Its shapes: ``{"__interrupt__": ()}`` alone, or last in a tuple (with the mode or namespace), or
    as a version 2 part's ``data``.
    """
    if isinstance(chunk, tuple) and chunk:
        chunk = chunk[-1]
    elif isinstance(chunk, dict) and "data" in chunk and "type" in chunk:
        chunk = chunk["data"]
    return isinstance(chunk, dict) and len(chunk) == 1 and chunk.get("__interrupt__", None) == ()


def _persists(graph: Any) -> bool:
    """Whether a compiled graph checkpoints its runs (``checkpointer=False`` opts out of a parent graph's too)."""
    return graph.checkpointer not in (None, False)


def _output(values: Any, keys: str | Sequence[str]) -> Any:
    """A graph's output from its full state ``values``: the output channels ``keys`` (as ``invoke`` picks them)."""
    if not isinstance(values, Mapping):
        return values
    if isinstance(keys, str):
        return values.get(keys)
    return {key: values[key] for key in keys if key in values}


def govern_graph(
    graph: Any,
    budget: Budget,
    *,
    agents: Mapping[str, str] | None = None,
    on_exhausted: str | None = None,
    policies: Mapping[str, str] | None = None,
    checkpointer: Any = None,
) -> Any:
    """Return a governed compiled copy of ``graph`` (a ``StateGraph`` or a compiled graph).

    ``agents`` maps node names to budget agents (default: the node name,
    registered on first use; ``None``: the run); ``on_exhausted`` is the default policy (default:
    the budget's); ``policies`` overrides it per node. ``checkpointer`` is the
    governed graph's (compiling a ``StateGraph``, or replacing a compiled graph's). The user's graph object is
    not changed. Governing a governed graph again returns it as it is, or, given other
    ``policies``/``agents``/``on_exhausted``, governs the original graph with those;
    another budget is refused (`ValueError`), as are names of nodes the graph lacks.
    A node the user wrapped with `budget_node` of the same budget keeps its own settings.

    Example:
        ```python
        app = govern_graph(builder, budget, policies={"critic": "skip"}, checkpointer=InMemorySaver())
        app.invoke({"topic": "otters"}, {"configurable": {"thread_id": "1"}})
        ```
    """
    default = on_exhausted or budget.on_exhausted
    policies = dict(policies or {})
    agents = dict(agents or {})
    settings = (budget, default, policies, agents)
    config = None
    if getattr(type(graph), "_budgetary", False):
        governed_by = graph._budgetary_settings
        if governed_by[0] is not budget:
            raise ValueError(
                f"this graph is already governed by budget {governed_by[0].name!r}; govern the original graph "
                "(a budget's parent is charged with it: Budget(..., parent=...) puts one budget under another)"
            )
        if governed_by == settings or (on_exhausted is None and not policies and not agents):
            return graph  # governing twice wraps once
        if checkpointer is None:
            checkpointer = graph.checkpointer
        config = graph.config  # a with_config copy's
        graph = graph._budgetary_source  # new policies or agents: govern the original again
    nodes = [name for name in graph.nodes if not name.startswith("__")]
    for what, keyed in (("policies", policies), ("agents", agents)):
        if unknown := sorted(set(keyed) - set(nodes)):
            raise ValueError(f"{what} names nodes the graph does not have: {unknown} (its nodes: {sorted(nodes)})")
    for node, policy in {"on_exhausted": default, **policies}.items():
        if policy not in POLICIES:
            raise ConfigurationError(f"policy for {node!r} must be one of {POLICIES}, got {policy!r}")
    options = _Options()

    def governor(node: str, runnable: Any) -> _Governor:
        g = _Governor(budget, node, agents.get(node), policies.get(node, default), options, node not in agents)
        g.node_is_tools = _is_tool_node(runnable)
        g.node_is_model = node in _AGENT_MODEL_NODES
        return g

    def runnable_of(node: Any) -> Any:  # a StateGraph's node spec, or a compiled graph's PregelNode
        return node.runnable if isinstance(graph, StateGraph) else node.bound

    if isinstance(graph, StateGraph):
        builder = copy.copy(graph)
        builder.nodes = {
            name: spec
            if _governed_by(spec.runnable, budget)
            else replace(spec, runnable=_wrap_runnable(cast(Any, spec.runnable), governor(name, spec.runnable)))
            for name, spec in graph.nodes.items()
        }
        compiled = builder.compile(checkpointer=checkpointer)
        compiled.builder = graph
        # compile() adds the handler of set_node_defaults(error_handler=...) itself: govern it here.
        for name, added in list(compiled.nodes.items()):
            if name not in graph.nodes and _is_error_handler(added) and not _governed_by(added.bound, budget):
                compiled.nodes[name] = added.copy({"bound": _wrap_runnable(added.bound, governor(name, added.bound))})
    else:
        update: dict[str, Any] = {
            "nodes": {
                name: node
                if (name.startswith("__") and not _is_error_handler(node)) or _governed_by(node.bound, budget)
                else node.copy({"bound": _wrap_runnable(node.bound, governor(name, node.bound))})
                for name, node in graph.nodes.items()
            }
        }
        if checkpointer is not None:  # it wins over the compiled graph's, in the copy only
            update["checkpointer"] = checkpointer
        compiled = graph.copy(update)

    def may_interrupt(name: str, node: Any) -> bool:
        # A budget_node keeps its own policy: alone for this budget, beside the node's for another budget.
        runnable = runnable_of(node)
        if _budget_node_policy(runnable) == "interrupt":
            return True
        return not _governed_by(runnable, budget) and policies.get(name, default) == "interrupt"

    interrupting = sorted(
        name for name, node in graph.nodes.items() if not name.startswith("__") and may_interrupt(name, node)
    )
    if interrupting and not _persists(compiled):
        raise ValueError(
            "on_exhausted='interrupt' needs a checkpointer (compile with checkpointer=..., or pass checkpointer= "
            f"to govern_graph): an interrupt without one could never be resumed (interrupting nodes: {interrupting})"
        )
    options.skip_key = SKIPPED_KEY in getattr(compiled, "channels", {})
    compiled.__class__ = _governed_class(type(compiled))
    compiled._budgetary_source, compiled._budgetary_settings = graph, settings  # type: ignore[attr-defined]
    if config is not None:
        compiled.config = config
    return compiled


def budget_node(
    fn: F | None = None, budget: Budget | None = None, *, agent: str | None = None, on_exhausted: str = "deny"
) -> Any:
    """Govern one node: a function (sync or async, signature kept) or a runnable. Usable as a decorator.

    In a graph that `govern_graph` did not wrap, the node cannot see its run as a whole:
    ``on_exhausted="end"`` raises `BudgetExceeded` (LangGraph has no switch that ends a run
    from a node), and a ``skip`` node re-entered in a loop is skipped again until LangGraph's
    recursion limit. `govern_graph` ends the run cleanly in both cases.

    Called directly, outside any graph (``write(state)`` in a unit test of the node), the
    function runs as one node execution would: the entry checks and the policy apply, and
    its LLM calls are charged to its agent (with no ``agent``, to the function's name, which
    `add_node` would give the node). ``config=`` passed to it is the run's config. There is
    no run to pause there: ``interrupt`` raises `BudgetExceeded` instead, and ``end`` raises
    as above.

    Example:
        ```python
        @budget_node(budget=budget, agent="writer", on_exhausted="skip")   # or @budget_node(budget, ...)
        def write(state: State) -> dict: ...

        builder.add_node("write", write)
        builder.add_node("review", budget_node(review, budget, agent="critic"))
        ```
    """
    if isinstance(fn, Budget) and budget is None:  # @budget_node(budget, agent=...)
        fn, budget = None, fn
    if budget is None:
        raise ConfigurationError("budget_node needs a budget")
    if fn is None:
        return lambda f: budget_node(f, budget, agent=agent, on_exhausted=on_exhausted)
    # The marker always goes in the update: LangGraph drops keys its state schema does not have.
    governor = _Governor(budget, None, agent, on_exhausted, _Options(skip_key=True), agent is None)
    if isinstance(fn, Runnable):
        governor.node_is_tools = _is_tool_node(fn)
        governor.unnamed = fn.get_name()  # what add_node would name it
        return _mark(_wrap_runnable(fn, governor), governor)
    func = fn

    def with_config(kwargs: dict[str, Any], node_config: Any) -> dict[str, Any]:
        return {**kwargs, "config": node_config} if "config" in kwargs else kwargs

    # Named as `add_node` would name the function: outside any graph (a unit test, a chain step) no
    # LangGraph node names it.
    name = governor.unnamed = getattr(func, "__name__", None) or type(func).__name__

    def run_config(kwargs: dict[str, Any]) -> Any:
        if var_child_runnable_config.get() is not None:
            return get_config()
        # Called outside any graph (a unit test of the node): a run of its own, from the config it was
        # given, named as `add_node` would name the function.
        config = ensure_config(kwargs.get("config"))
        config["metadata"] = {"langgraph_node": name, **config.get("metadata", {})}
        return config

    # An object whose __call__ is async is an async node too (LangGraph awaits it).
    if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__):

        @functools.wraps(func)
        async def async_node(*args: Any, **kwargs: Any) -> Any:
            return await _agovern_call(
                governor, args[0] if args else None, run_config(kwargs),
                lambda node_config: func(*args, **with_config(kwargs, node_config)),
            )  # fmt: skip

        return _mark(async_node, governor)

    @functools.wraps(func)
    def node(*args: Any, **kwargs: Any) -> Any:
        return _govern_call(
            governor, args[0] if args else None, run_config(kwargs),
            lambda node_config: func(*args, **with_config(kwargs, node_config)),
        )  # fmt: skip

    return _mark(node, governor)


_G = TypeVar("_G")


def _mark(wrapper: _G, governor: _Governor) -> _G:
    """Mark a `budget_node` wrapper with its budget and policy: `govern_graph` leaves it as the user set it."""
    wrapper._budgetary_budget = governor.budget  # type: ignore[attr-defined]
    wrapper._budgetary_policy = governor.policy  # type: ignore[attr-defined]
    return wrapper


def _budget_node_parts(runnable: Any) -> list[Any]:
    """The `budget_node` wrappers a node is made of (itself, or the function LangGraph wrapped it in)."""
    parts = (runnable, getattr(runnable, "func", None), getattr(runnable, "afunc", None))
    return [part for part in parts if getattr(part, "_budgetary_budget", None) is not None]


def _governed_by(runnable: Any, budget: Budget) -> bool:
    """Whether a node is a `budget_node` of ``budget`` (of this object, or another of the same shared budget)."""
    key = budget_key(budget)
    return any(budget_key(part._budgetary_budget) == key for part in _budget_node_parts(runnable))


def _budget_node_policy(runnable: Any) -> str | None:
    """The policy of a node that is a `budget_node` (of any budget), else None."""
    parts = _budget_node_parts(runnable)
    return parts[0]._budgetary_policy if parts else None


def _is_error_handler(node: Any) -> bool:
    """Whether a compiled graph's node is an ``error_handler`` (LangGraph names it ``__error_handler__<node>``).

    A fallback's LLM calls (a cheaper model) are calls like any other: governed, charged to the handler node.
    """
    return getattr(node, "is_error_handler", False) is True


def _is_tool_node(runnable: Any) -> bool:
    return type(runnable).__name__ == "ToolNode"
