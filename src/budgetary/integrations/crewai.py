"""CrewAI: budget an existing crew without touching its agents or tasks.

``govern_crew(crew, budget)`` puts every kickoff of the crew (and of the copies
``kickoff_for_each`` makes) under ``budget``: before each LLM call it reserves
(a token estimate of the messages plus the LLM's ``max_tokens``) or aborts the
kickoff with `CrewBudgetExceeded`; after it, it charges the usage the provider
reported for that very call, attributed to the agent's role and the task (the
ledger entry's ``location``: the task's name, else its description, as CrewAI
names its steps; delegated work and agent-less calls are filed under the crew
task they are done for); before each tool call it counts it or refuses it (the
agent is told why).

Policies (per task name, then per agent role, then the default):
``deny`` (kickoff raises; earlier task outputs stay on their tasks), ``skip``
(decided when a task starts: if its agent could not make its first call, as
CrewAI will render it, the task does not call its model and its output is a
placeholder that `is_budget_skipped` detects on the task's ``TaskOutput``, and on the
``CrewOutput`` when that task was the last; a later task that takes it as ``context`` gets the
placeholder's text and runs), ``end`` (that task and every
later one are skipped; kickoff returns normally). The start check cannot see
what CrewAI adds later (memory, knowledge, tools the crew injects): if the
task's first real call is refused, the hook blocks it and CrewAI's own task
retry runs the task on the placeholder instead (this needs a retry left under
the agent's ``max_retry_limit``; the adapter gives it back). A refusal in the
middle of a task that already started cannot abandon that task: it raises
like ``deny``. CrewAI's delegation tool swallows a worker's refusal and shows
it to the manager as an observation: under ``deny`` the run's next LLM call
raises it again (tools are refused until then), under ``end`` the remaining
tasks are skipped, under ``skip`` the manager goes on without that work.

Agent starts (what ``max_agents`` counts) are executions, as LangGraph's node runs are: each task
start (by its agent; in a hierarchical crew by the manager, once per task), so an agent that works
three tasks starts three times, and each piece of delegated work, when a coworker tool ('Delegate
work to coworker', 'Ask question to coworker') runs a coworker (a start of the coworker, filed under
the crew task; CrewAI's retry of that work is the same start). The kickoff itself is none, and a
task skipped at its start takes no slot. Delegation is also a tool call, counted (or refused) first.
A refused delegation follows the policy: under ``deny`` the tool shows the refusal to the delegating
agent and the run's next LLM call raises it; under ``skip`` and ``end`` (which also skips every later
task) the coworker does not run and its answer is the skip placeholder. Only coworkers that are
CrewAI ``Agent``s are counted (the gate wraps ``Agent.execute_task``), and delegated work has no
start check: a coworker whose first call is then refused under ``skip`` has taken its slot.

A custom ``BaseLLM`` must call ``_invoke_before_llm_call_hooks`` and
``_invoke_after_llm_call_hooks`` around its provider call, as CrewAI's native
providers do: calls CrewAI makes without an agent (the forced final answer
after ``max_iter``) reach the hooks only that way. Without them such a call is
not checked; its usage is still charged, after the fact.

Hooks are registered once, when this module is imported: import it before any
agent runs (``govern_crew`` does), because CrewAI copies the global hook lists
into each agent executor when it is created. A host that clears CrewAI's global hooks
(``crewai.hooks.clear_all_global_hooks()``, say in a test teardown) would leave every budget open:
``govern_crew``, ``budget_scope`` and every kickoff of a governed crew (or in a scope) register
again those of this module's hooks that are gone. Importing it also wraps
``Crew.copy`` (copies keep the budget), ``Crew.kickoff``/``akickoff`` (a
kickoff ended by Ctrl-C or a cancellation, which CrewAI ends without its end
hook, leaves no run or hold behind), ``Crew.replay`` (run under the budget
as a kickoff, though CrewAI dispatches no start or end hook for it),
``Task._execute_core``/``_aexecute_core`` (a task run alone in a `budget_scope` is
a run of its own: CrewAI dispatches no start hook for it), CrewAI's
``apply_checkpoint`` and ``Crew.from_checkpoint`` (see below).

``budget_scope(budget)`` governs the work of a block: crew kickoffs, flows,
``Agent.kickoff``, tasks run alone (``Task.execute_sync``/``execute_async``/
``aexecute_sync``, with the task-start checks and policy) and bare
``llm.call()``/``acall()`` calls. A bare call is reserved and charged through
the LLM's own hook calls (so a custom ``BaseLLM`` must make them, as above), to
no agent unless it passes ``from_agent``; its refusal raises `CrewBudgetExceeded`
from the call whatever the policy (there is no task to skip), and the hold of a
bare call that raised is given back when the scope ends.

A crew resumed from a checkpoint is a new object CrewAI builds from the
checkpoint, which holds no budget: ``crew.kickoff(from_checkpoint=...)`` (and
``kickoff_async``/``akickoff``) resumes under ``crew``'s budget;
``Crew.from_checkpoint``/``Crew.fork`` restore it under the budget of the
governed crew of this process with the checkpointed crew's id. A crew restored
in another process that way must be governed again (or run in a `budget_scope`).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

try:
    import crewai.crew as crew_module
    from crewai import Agent, Crew, Task
    from crewai.agents.agent_builder.base_agent_executor import BaseAgentExecutor
    from crewai.context import get_current_task_id
    from crewai.hooks import HookAborted, InterceptionPoint, get_hooks, register_hook
    from crewai.llms.base_llm import BaseLLM
except ImportError as exc:  # pragma: no cover - exercised only without the extra (in a subprocess)
    # The version too: an older crewai imports, but lacks the interception layer this module is built on.
    raise ImportError(
        'budgetary.integrations.crewai needs crewai>=1.15.30,<1.16: pip install "budgetary[crewai]"'
    ) from exc

from budgetary.core.budget import POLICIES, Budget, Reservation
from budgetary.core.errors import BudgetExceeded, ConfigurationError, UsageError
from budgetary.core.guard import SoftLimit
from budgetary.core.skip import SKIP_ATTRIBUTE, Skipped, mark_skipped

__all__ = ["CrewBudgetExceeded", "budget_scope", "govern_crew"]

logger = logging.getLogger("budgetary.crewai")
_ATTR = "__budgetary__"
_STRUCTURED = ("output_pydantic", "output_json", "converter_cls", "response_model")
"""A task's structured-output settings, cleared while a skip placeholder stands in for its output."""
_GUARDRAILS: dict[str, Callable[[], Any]] = {"_guardrail": lambda: None, "_guardrails": list, "human_input": bool}
"""The checks of a task's output, off while the placeholder stands in: guardrails would reject it (CrewAI
retries the task on the stub, then aborts the kickoff), and a human would be asked to review it."""
_PLANNING = {"planning": False, "planning_config": None}
"""An agent's planning settings, off while the stub stands in: it never says a plan is ready, and CrewAI
refines an unbounded plan (``reasoning=True``, ``PlanningConfig()``) until one is."""
MANAGER_ROLE = "Crew Manager"


class CrewBudgetExceeded(BudgetExceeded, HookAborted):
    """The budget refused a call: both budgetary's `BudgetExceeded` and CrewAI's ``HookAborted``.

    ``HookAborted`` is the one exception CrewAI lets through a hook without retrying the task.
    """

    def __init__(self, exc: BudgetExceeded) -> None:
        BudgetExceeded.__init__(
            self, exc.message, budget=exc.budget, agent=exc.agent, resource=exc.resource, limit=exc.limit,
            spent=exc.spent, requested=exc.requested, snapshot=exc.snapshot,
        )  # fmt: skip
        self.reason = exc.message
        self.source = "budgetary"

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as the plain refusal it wraps, so that the copy is a CrewBudgetExceeded again.
        rebuild, args = BudgetExceeded.__reduce__(self)[:2]
        return (type(self), (rebuild(*args),))


@dataclass(frozen=True)
class _Governance:
    budget: Budget
    agents: Mapping[str, str]
    default: str
    policies: Mapping[str, str]

    def agent(self, role: str | None) -> str | None:
        if role is None:
            return None
        name = self.agents.get(role, role)
        self.budget.ensure_agent(name)
        return name

    def policy(self, task_name: str | None, role: str | None) -> str:
        return self.policies.get(task_name or "", self.policies.get(role or "", self.default))


@dataclass
class _Run:
    """One kickoff: its id, the roles of its tasks, and what the budget did in it."""

    gov: _Governance
    owner: Any = None
    """The crew (or standalone agent run) whose kickoff this is: only its own end closes the run."""
    outer: _Run | None = None
    """The run this kickoff is nested in, current again when this one ends."""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    task_roles: dict[str, str | None] = field(default_factory=dict)  # crew task id -> its agent's role
    task_names: dict[str, str | None] = field(default_factory=dict)  # crew task id -> its name
    tasks: dict[str, Any] = field(default_factory=dict)  # crew task id -> the task
    skipped: dict[int, Skipped] = field(default_factory=dict)  # id(task) -> marker
    swapped: dict[int, tuple[Any, dict[str, Any]]] = field(default_factory=dict)
    """id(agent or task) -> it and the attributes a skip replaced, to put back when the task ends."""
    ended: Skipped | None = None
    refused: BudgetExceeded | None = None
    """A refusal under ``deny`` that CrewAI may swallow (a delegation tool turns it into an observation):
    raised again at the run's next gate."""
    started: set[str] = field(default_factory=set)  # ids of the tasks that have made a call
    delegated: set[str] = field(default_factory=set)  # ids of the delegated tasks whose start was decided
    retried: set[int] = field(default_factory=set)  # id(agent): agents whose task CrewAI retries with the stub
    nudges: dict[str | None, SoftLimit] = field(default_factory=dict)
    """Soft limits to tell on the next call: per agent for its allocation, under None for the run's limits."""
    blocked_tools: dict[int, str] = field(default_factory=dict)  # thread id -> refusal reason
    open_calls: dict[str, Reservation] = field(default_factory=dict)
    """Holds of calls in flight (hold id -> reservation): released if the crew ends without their answer."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    scope: bool = False
    """A `budget_scope`'s own run, for its bare ``llm.call()``: a refusal reaches the caller and ends nothing."""
    agent_role: str | None = None
    """The role of a standalone ``Agent.kickoff``'s agent: its run's agent-less calls outside a known task."""

    def role_for(self, agent: Any, task: Any) -> str | None:
        role = getattr(agent, "role", None)
        if role is None:  # agent-less calls (the forced final answer after max_iter): the current task's agent
            task_id = str(getattr(task, "id", None) or get_current_task_id() or "")
            role = self.task_roles[task_id] if task_id in self.task_roles else self.agent_role
        return role

    def add_task(self, task: Any, role: str | None) -> None:
        """Know ``task`` (run by an agent of ``role``): its agent-less calls are charged to that role."""
        self.task_roles[str(task.id)] = role
        self.task_names[str(task.id)] = getattr(task, "name", None)
        self.tasks[str(task.id)] = task

    def own_task(self, agent: Any, task: Any) -> Any:
        """The task, else the crew task under way when ``agent`` is its own (an agent's planning call)."""
        if task is not None or agent is None:
            return task
        current = self.tasks.get(str(get_current_task_id() or ""))
        return current if getattr(current, "agent", None) is agent else None

    def policy_for(self, task: Any, role: str | None) -> str:
        """The policy of work on ``task``: by its name, else (delegated work) the crew task's, then by role."""
        name = getattr(task, "name", None) or self.task_names.get(str(get_current_task_id() or ""))
        return self.gov.policy(name, role)

    def location_for(self, task: Any) -> str | None:
        """Where work on ``task`` is filed: the task's step name if it is the run's, else the crew task's under way.

        Delegated work (a task CrewAI builds for the coworker) and agent-less calls are filed under the crew
        task they are done for.
        """
        if getattr(task, "name", None) or (task is not None and str(getattr(task, "id", "")) in self.tasks):
            return _step_name(task)
        return _step_name(self.tasks.get(str(get_current_task_id() or "")))


def _placeholder(reason: str) -> str:
    """The text that stands in for the answer of work the budget skipped."""
    return f"[skipped by budget: {reason}]"


def _step_name(task: Any) -> str | None:
    """A task's name, else its description: what CrewAI names the task's step."""
    return getattr(task, "name", None) or getattr(task, "description", None) or None


@dataclass(frozen=True)
class _Scope:
    """An open `budget_scope`: what it governs with, and its run for the LLM calls made outside any other."""

    gov: _Governance
    run: _Run


_run: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("budgetary_crew_run", default=None)
_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("budgetary_crew_scope", default=None)
_call: contextvars.ContextVar[Reservation | None] = contextvars.ContextVar("budgetary_crew_call", default=None)


def _current_run() -> _Run | None:
    """The run an LLM call belongs to: the kickoff's (or task's) under way, else the open scope's own."""
    run = _run.get()
    if run is None:
        scope = _scope.get()
        if scope is not None:
            return scope.run
    return run


class _SkipLLM(BaseLLM):
    """Stands in for a skipped task's LLM: answers at once, costs nothing."""

    llm_type: str = "budgetary-skip"
    reason: str = ""

    def call(self, messages: Any, *args: Any, **kwargs: Any) -> str:
        return f"Thought: the budget skipped this task\nFinal Answer: {_placeholder(self.reason)}"

    async def acall(self, messages: Any, *args: Any, **kwargs: Any) -> str:
        return self.call(messages)

    def supports_function_calling(self) -> bool:
        return False

    def get_context_window_size(self) -> int:
        return 128_000

    def get_input_tokens_count(self, *args: Any, **kwargs: Any) -> int:
        return 0


# -- hooks (registered once, below) ----------------------------------------------------------------


def _execution_start(ctx: Any) -> None:
    crew, enclosing = getattr(ctx, "crew", None), _run.get()
    if crew is None and enclosing is not None:
        return  # an agent's own executor inside a run (the planner, a kickoff in a tool): the run goes on
    scope = _scope.get()
    gov = getattr(crew, _ATTR, None) or (scope.gov if scope is not None else None)
    if gov is None:
        return  # an ungoverned crew: nested in a run, its calls are that run's
    # In a hierarchical crew the manager works every task: the crew's own, else the one CrewAI builds.
    default_role = None
    if getattr(crew, "process", None) == "hierarchical":
        default_role = getattr(getattr(crew, "manager_agent", None), "role", None) or MANAGER_ROLE
    owner = crew if crew is not None else getattr(ctx, "flow", None)
    run = _open(gov, owner, enclosing, getattr(crew, "tasks", None) or [], default_role)
    if isinstance(owner, BaseAgentExecutor):  # ``Agent.kickoff`` runs its executor as a flow
        run.agent_role = getattr(owner.agent, "role", None)


def _open(gov: _Governance, owner: Any, outer: _Run | None, tasks: Sequence[Any], default_role: str | None) -> _Run:
    """Make a run of ``tasks`` by ``owner`` current (its end, or `_close_abandoned`, closes it); return it."""
    run = _Run(gov, owner=owner, outer=outer)
    for task in tasks:
        run.add_task(task, getattr(getattr(task, "agent", None), "role", None) or default_role)
    _run.set(run)
    return run


def _execution_end(ctx: Any) -> None:
    run = _run.get()
    crew = getattr(ctx, "crew", None)
    if run is None or run.owner is not (crew if crew is not None else getattr(ctx, "flow", None)):
        return  # the end of something that runs inside this run
    _close(run, "the crew ended before the call answered")


def _close(run: _Run, reason: str) -> None:
    """End ``run``: put back what skips swapped, give back the holds of calls that never answered.

    A call still running elsewhere (a cancelled ``akickoff`` leaves CrewAI's worker going) is charged
    what it reports when it answers: `_track_usage` records it once its hold is gone.
    """
    _restore_all(run)
    _release_open_calls(run, reason)
    _run.set(run.outer)


def _release_open_calls(run: _Run, reason: str) -> None:
    for reservation in list(run.open_calls.values()):  # no after-hook ran for these calls
        reservation.release(reason)
    run.open_calls.clear()


def _close_abandoned(outer: _Run | None) -> None:
    """Close the runs a kickoff left current: it ended without CrewAI's end hook (a ``BaseException``)."""
    run = _run.get()
    while run is not None and run is not outer:
        _close(run, "the kickoff was interrupted before the call answered")
        run = run.outer
    _run.set(outer)


def _pre_step(ctx: Any) -> None:
    run = _run.get()
    agent_obj, task = getattr(ctx, "agent", None), getattr(ctx, "task", None)
    if run is None or agent_obj is None:
        return None
    gov = run.gov
    role = getattr(agent_obj, "role", None)
    agent = gov.agent(role)
    policy = run.policy_for(task, role)
    location = _step_name(task) or getattr(ctx, "step_name", None)
    if run.ended is not None:
        _skip(run, agent_obj, task, gov.budget.skip(agent, run.ended.reason, location=location, run_id=run.run_id))
        return None
    # The first-call check comes first: a task skipped at its start takes no max_agents slot (SPEC §2).
    exc = None if policy == "deny" else _first_call_refusal(run, agent_obj, agent, task, getattr(ctx, "payload", None))
    if exc is None:
        decision = gov.budget.begin_agent(agent, run_id=run.run_id, location=location)
        exc = None if decision.allowed else gov.budget.exceeded(decision, agent)
    if exc is None:
        return None
    if policy == "deny":
        raise CrewBudgetExceeded(exc)
    marker = gov.budget.skip(agent, str(exc), resource=exc.resource, location=location, run_id=run.run_id)
    if policy == "end":
        run.ended = marker
    _skip(run, agent_obj, task, marker)
    return None  # a non-None return would replace the task's context


def _first_call_refusal(run: _Run, agent_obj: Any, agent: str | None, task: Any, context: Any) -> BudgetExceeded | None:
    """Could the task's first LLM call be reserved? Probe with an estimate of its prompt, then give it back."""
    llm = getattr(agent_obj, "llm", None)
    model = getattr(llm, "model", None)
    try:
        messages: list[Any] = _first_messages(agent_obj, task, context)
    except Exception:  # another CrewAI version: the call's own check decides (see _before_llm)
        logger.debug("could not render the first prompt of %r; estimating from its fields", task, exc_info=True)
        messages = [str(getattr(agent_obj, name, "") or "") for name in ("role", "goal", "backstory")]
        messages += [str(getattr(task, name, "") or "") for name in ("description", "expected_output")]
        messages.append(str(context or ""))
    try:
        probe = run.gov.budget.reserve(
            agent, model=model if isinstance(model, str) else None, messages=messages,
            max_output_tokens=getattr(llm, "max_tokens", None), run_id=run.run_id, location=run.location_for(task),
        )  # fmt: skip
    except BudgetExceeded as exc:
        return exc
    probe.release("task-start check: the task's first call fits", failed=False)
    return None


def _first_messages(agent: Any, task: Any, context: Any) -> list[dict[str, str]]:
    """The task's first call as CrewAI renders it (templates, output schema, context, the declared tools).

    What CrewAI adds later (memory, knowledge, tools the crew injects) is not in it: if the real first
    call is then refused, `_before_llm` still skips the task.
    """
    from crewai.agent.utils import build_task_prompt_with_schema, format_task_with_context
    from crewai.utilities.agent_utils import get_tool_names, parse_tools, render_text_description_and_args
    from crewai.utilities.prompts import Prompts

    tools = parse_tools(list(getattr(task, "tools", None) or agent.tools or []))
    native = bool(tools) and agent.llm.supports_function_calling()
    prompt = Prompts(
        agent=agent, has_tools=bool(tools), use_native_tool_calling=native,
        use_system_prompt=agent.use_system_prompt, system_template=agent.system_template,
        prompt_template=agent.prompt_template, response_template=agent.response_template,
    ).task_execution()  # fmt: skip
    fill = {"{input}": format_task_with_context(build_task_prompt_with_schema(task, task.prompt()), context),
            "{tool_names}": get_tool_names(tools), "{tools}": render_text_description_and_args(tools)}  # fmt: skip

    def render(template: str) -> str:
        for key, value in fill.items():
            template = template.replace(key, value)
        return template

    if "system" in prompt:
        return [
            {"role": "system", "content": render(prompt["system"])},
            {"role": "user", "content": render(prompt["user"])},
        ]
    return [{"role": "user", "content": render(prompt["prompt"])}]


def _post_step(ctx: Any) -> None:
    run = _run.get()
    if run is None:
        return None
    marker = run.skipped.pop(id(getattr(ctx, "task", None)), None)
    _restore(run, getattr(ctx, "agent", None), getattr(ctx, "task", None))
    output = getattr(ctx, "payload", None)
    if marker is not None and output is not None:
        mark_skipped(output, marker)
    return None


def _skip(run: _Run, agent: Any, task: Any, marker: Skipped) -> None:
    # A placeholder is no structured output and fails guardrails: CrewAI would abort the kickoff on it.
    placeholder: dict[str, Any] = {name: None for name in _STRUCTURED if hasattr(task, name)}
    placeholder.update({name: off() for name, off in _GUARDRAILS.items() if hasattr(task, name)})
    stub: dict[str, Any] = {"llm": _SkipLLM(model="budgetary/skip", reason=marker.reason)}
    stub.update({name: off for name, off in _PLANNING.items() if hasattr(agent, name)})
    with run.lock:
        run.skipped[id(task)] = marker
        for obj, stand_ins in ((agent, stub), (task, placeholder)):
            if obj is not None and id(obj) not in run.swapped:
                run.swapped[id(obj)] = (obj, {name: getattr(obj, name) for name in stand_ins})
                for name, value in stand_ins.items():
                    setattr(obj, name, value)


def _restore(run: _Run, *objs: Any) -> None:
    with run.lock:
        entries = [run.swapped.pop(id(obj), None) for obj in objs if obj is not None]
    _put_back(entries)


def _restore_all(run: _Run) -> None:
    with run.lock:
        entries = list(run.swapped.values())
        run.swapped.clear()
    _put_back(entries)


def _put_back(entries: Sequence[tuple[Any, dict[str, Any]] | None]) -> None:
    for entry in entries:
        if entry is not None:
            for name, value in entry[1].items():
                setattr(entry[0], name, value)


def _before_llm(ctx: Any) -> bool | None:
    run = _current_run()
    if run is None:
        return None
    if isinstance(getattr(ctx, "llm", None), _SkipLLM):
        _skip_retried(run, ctx.agent, ctx.task)
        return None
    previous = _call.get()
    if previous is not None and not previous.done:  # the last call in this thread raised: no after-hook ran
        previous.release("the call failed before it answered")
        run.open_calls.pop(previous.hold_id, None)
    if run.refused is not None:
        raise CrewBudgetExceeded(run.refused)
    task = run.own_task(ctx.agent, ctx.task)
    if task is not None and id(task) in run.skipped and id(ctx.agent) in run.retried:
        return False  # the task was skipped at its planning call: blocked again until CrewAI retries it
    try:
        gov = run.gov
        agent = gov.agent(run.role_for(ctx.agent, ctx.task))
        llm = ctx.llm
        model = getattr(llm, "model", None)
        nudge = run.nudges.pop(agent, None) or run.nudges.pop(None, None)
        if nudge is not None:
            ctx.messages.append({"role": "user", "content": f"Budget notice: {nudge.message}. Wrap up now and give "
                                 "your Final Answer."})  # fmt: skip
        reservation = gov.budget.reserve(
            agent, model=model if isinstance(model, str) else None, messages=ctx.messages,
            max_output_tokens=getattr(llm, "max_tokens", None), run_id=run.run_id,
            location=run.location_for(ctx.task),
        ).keep_alive()  # fmt: skip
    except BudgetExceeded as exc:
        if _skip_first_call(run, ctx.agent, task, agent, exc):
            return False  # blocked: CrewAI retries the task, now with the stub LLM
        if not run.scope:  # a bare call's refusal reaches its caller: no tool swallows it
            _refused_mid_task(run, ctx.agent, ctx.task, exc)
        raise CrewBudgetExceeded(exc) from exc
    except Exception as exc:  # our own bug: CrewAI would swallow it and run the call unchecked
        logger.exception("budget check failed; refusing the call")
        raise HookAborted(f"budget check failed: {exc!r}", source="budgetary") from exc
    if ctx.task is not None:
        run.started.add(str(ctx.task.id))
    _call.set(reservation)
    run.open_calls[reservation.hold_id] = reservation
    return None


def _skip_first_call(run: _Run, agent_obj: Any, task: Any, agent: str | None, exc: BudgetExceeded) -> bool:
    """Skip a task whose first call is refused under skip/end (the start check could not see all of it).

    A hook cannot skip the call under way, but CrewAI retries a task whose call a hook blocks, up to the
    agent's ``max_retry_limit``, with an executor rebuilt from ``agent.llm``: the stub, once swapped in.
    """
    if agent_obj is None or task is None or str(task.id) in run.started:
        return False  # the task has started: it cannot be abandoned
    policy = run.policy_for(task, agent_obj.role)
    if policy == "deny" or getattr(agent_obj, "_times_executed", 0) >= getattr(agent_obj, "max_retry_limit", 0):
        return False
    marker = run.gov.budget.skip(agent, str(exc), resource=exc.resource, location=run.location_for(task),
                                 run_id=run.run_id)  # fmt: skip
    if policy == "end":
        run.ended = marker
    _skip(run, agent_obj, task, marker)
    run.retried.add(id(agent_obj))
    return True


def _refused_mid_task(run: _Run, agent_obj: Any, task: Any, exc: BudgetExceeded) -> None:
    """Make a refusal hold for the run even when CrewAI swallows it (delegated work, a kickoff in a tool)."""
    policy = run.policy_for(task, getattr(agent_obj, "role", None))
    if policy == "deny" and run.refused is None:
        run.refused = exc
    elif policy == "end" and run.ended is None:
        run.ended = Skipped(agent=exc.agent, reason=str(exc), resource=exc.resource, location=run.location_for(task))


def _skip_retried(run: _Run, agent_obj: Any, task: Any) -> None:
    """The stub answers the retry `_skip_first_call` asked for: undo what only that retry needed."""
    if id(agent_obj) not in run.retried:
        return
    run.retried.discard(id(agent_obj))
    times = getattr(agent_obj, "_times_executed", None)
    if isinstance(times, int) and times > 0:  # CrewAI counts the retry as a failure and never resets the count
        agent_obj._times_executed = times - 1
    if task is not None and str(task.id) != get_current_task_id():  # delegated work: no step hook restores it
        run.skipped.pop(id(task), None)
        _restore(run, agent_obj, task)


def _after_llm(ctx: Any) -> None:
    reservation = _call.get()
    if reservation is not None:
        if not reservation.done:
            reservation.charge_estimate()  # the provider reported no usage for this call
        run = _current_run()
        if run is not None:
            run.open_calls.pop(reservation.hold_id, None)
    _call.set(None)
    return None


def _settle(reservation: Reservation, usage: Any) -> None:
    reservation.settle(usage, lenient=True)  # the thresholds it crosses reach `_tell_agents`


def _tell_agents(event: SoftLimit) -> None:
    """Soft-limit listener of every governed budget: tell the crossing on the run's next call.

    Crossings by a call, a tool or an agent start alike; the agent's own next call for its allocation.
    """
    run = _current_run()
    if run is not None:
        run.nudges[event.agent if event.resource == "allocation" else None] = event


def _before_tool(ctx: Any) -> Any:
    run = _run.get()
    if run is None:
        return None
    if run.refused is not None:  # the run is over under deny: no more paid work before its next LLM gate
        run.blocked_tools[threading.get_ident()] = run.refused.message
        return False
    agent = run.gov.agent(run.role_for(ctx.agent, ctx.task))
    decision = run.gov.budget.check_tool(agent, ctx.tool_name, run_id=run.run_id)
    if decision.allowed:
        return None
    run.blocked_tools[threading.get_ident()] = decision.reason
    return False  # blocks this tool call only; the agent goes on


def _after_tool(ctx: Any) -> Any:
    run = _run.get()
    reason = run.blocked_tools.pop(threading.get_ident(), None) if run is not None else None
    if reason is None:
        return None
    return f"The tool {ctx.tool_name!r} was not run: the budget refused it ({reason}). Do without it."


def _track_usage(original: Any) -> Any:
    def tracked(self: Any, usage_data: Any) -> None:
        original(self, usage_data)
        if isinstance(self, _SkipLLM):
            return
        reservation = _call.get()
        if reservation is not None and not reservation.done:
            _settle(reservation, usage_data)
            return
        run = _current_run()
        if run is not None:  # a call no hook saw (a custom LLM that skips the hooks): record it anyway
            agent = run.gov.agent(run.role_for(None, None))
            try:
                run.gov.budget.record(agent, _usage_or_none(usage_data), model=getattr(self, "model", None),
                                      run_id=run.run_id, location=run.location_for(None))  # fmt: skip
            except UsageError:  # never crash the user's run on a provider's garbage; there is no estimate here
                logger.warning("unreadable usage %r from %r was not recorded", usage_data, self)

    return tracked


def _usage_or_none(usage: Any) -> Any:
    dump = getattr(usage, "model_dump", None)
    return dump() if callable(dump) else usage


def _governed_copy(copy: Any) -> Any:
    """``Crew.copy`` (what ``kickoff_for_each`` runs) that carries the budget over to the copy.

    CrewAI rebuilds the crew from its fields, and the budget is no field. Patched on the class: a
    per-crew function would stay bound to that crew in its ``model_copy`` clones.
    """

    @functools.wraps(copy)
    def governed(self: Any, *args: Any, **kwargs: Any) -> Any:
        clone = copy(self, *args, **kwargs)
        gov = getattr(self, _ATTR, None)
        if gov is not None:
            _attach(clone, gov, governs=False)
        return clone

    return governed


def _marked_if_last_skipped(result: Any) -> Any:
    """Mark a ``CrewOutput`` whose last task was skipped: its text is that task's placeholder."""
    outputs = getattr(result, "tasks_output", None)
    if isinstance(outputs, list) and outputs:
        marker = getattr(outputs[-1], SKIP_ATTRIBUTE, None)
        if isinstance(marker, Skipped):
            mark_skipped(result, marker)
    return result


def _closing_kickoff(kickoff: Any, *, starts_run: bool = False) -> Any:
    """``Crew.kickoff`` that closes the runs CrewAI left current when it ended without its end hook.

    CrewAI dispatches no end when a kickoff ends by a ``BaseException`` (Ctrl-C, a cancelled
    ``akickoff``): its run would stay current in the caller's context, and charge whatever runs there next.
    ``starts_run`` (``Crew.replay``, for which CrewAI dispatches no start or end hook) also opens the run.
    """

    @functools.wraps(kickoff)
    def closing(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, _ATTR, None) is not None or _scope.get() is not None:
            _ensure_hooks(self)  # before CrewAI copies the hook lists into new agents' executors
        outer = _run.get()
        if starts_run:
            _execution_start(_ReplayStart(self))
        try:
            return _marked_if_last_skipped(kickoff(self, *args, **kwargs))
        finally:
            _close_abandoned(outer)

    return closing


def _closing_akickoff(akickoff: Any) -> Any:
    """`_closing_kickoff` for ``Crew.akickoff``."""

    @functools.wraps(akickoff)
    async def closing(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, _ATTR, None) is not None or _scope.get() is not None:
            _ensure_hooks(self)
        outer = _run.get()
        try:
            return _marked_if_last_skipped(await akickoff(self, *args, **kwargs))
        finally:
            _close_abandoned(outer)

    return closing


def _task_run(execute: Any) -> Any:
    """``Task._execute_core`` that makes a task run outside any kickoff, in a `budget_scope`, a run of its own.

    ``execute_sync``, ``execute_async`` (in its thread) and, for `_atask_run`, ``aexecute_sync`` pass
    through it. CrewAI dispatches no start hook for a bare task (only its agent's executor does, after the
    task's start hook): without this run the task's start checks and policy would not apply, and the
    agent-less calls it makes (the forced final answer) would be charged to no agent.
    """

    @functools.wraps(execute)
    def governed(self: Any, agent: Any = None, *args: Any, **kwargs: Any) -> Any:
        scope = _scope.get()
        if _join_run(self, agent) or scope is None:
            return execute(self, agent, *args, **kwargs)
        _open_task_run(scope, self, agent)
        try:
            return execute(self, agent, *args, **kwargs)
        finally:
            _close_abandoned(None)

    return governed


def _atask_run(execute: Any) -> Any:
    """`_task_run` for ``Task._aexecute_core``."""

    @functools.wraps(execute)
    async def governed(self: Any, agent: Any = None, *args: Any, **kwargs: Any) -> Any:
        scope = _scope.get()
        if _join_run(self, agent) or scope is None:
            return await execute(self, agent, *args, **kwargs)
        _open_task_run(scope, self, agent)
        try:
            return await execute(self, agent, *args, **kwargs)
        finally:
            _close_abandoned(None)

    return governed


def _join_run(task: Any, agent: Any) -> bool:
    """Whether a run is under way: a task run in it (a crew's, or one a flow runs itself) is its work.

    A task the run does not know yet (run by a flow step, a tool) is added to it, so that its agent-less
    calls (the forced final answer) are charged to its agent and its name, as a crew's tasks are.
    """
    run = _run.get()
    if run is None:
        return False
    if str(task.id) not in run.task_roles:
        run.add_task(task, _runner_role(task, agent))
    return True


def _runner_role(task: Any, agent: Any) -> str | None:
    # CrewAI runs the task by the agent passed, else its own: that agent's role owns its agent-less calls.
    return getattr(agent or getattr(task, "agent", None), "role", None)


def _open_task_run(scope: _Scope, task: Any, agent: Any) -> None:
    run = _open(scope.gov, task, None, [], None)
    run.add_task(task, _runner_role(task, agent))


def _governed_restore(apply: Any) -> Any:
    """CrewAI's ``apply_checkpoint`` (what ``kickoff(from_checkpoint=...)`` resumes through) keeping the budget.

    The crew it restores is a new object built from the checkpoint, which holds no budget: it takes
    the budget of the crew whose kickoff resumes it.
    """

    @functools.wraps(apply)
    def governed(instance: Any, from_checkpoint: Any) -> Any:
        restored = apply(instance, from_checkpoint)
        gov = getattr(instance, _ATTR, None)
        if restored is not None and gov is not None:
            _attach(restored, gov, governs=False)
        return restored

    return governed


def _governed_from_checkpoint(from_checkpoint: Any) -> Any:
    """``Crew.from_checkpoint`` (and ``Crew.fork``): the restored crew keeps the budget of its governed original.

    The original is the governed crew of this process with the checkpointed crew's id. A crew restored
    in another process has none: govern it again (the budget is a live object, not in the checkpoint).
    """

    @functools.wraps(from_checkpoint)
    def restore(cls: Any, config: Any) -> Any:
        crew = from_checkpoint(cls, config)
        original = _governed_crews.get(str(getattr(crew, "id", "")))
        gov = getattr(original, _ATTR, None)
        if gov is not None and getattr(crew, _ATTR, None) is None:
            _attach(crew, gov, governs=False)
        return crew

    return classmethod(restore)


def _delegated_start(execute: Any) -> Any:
    """``Agent.execute_task`` that counts the start of an agent on work no task start of the run counted.

    That is delegation: CrewAI's coworker tools ('Delegate work to coworker', 'Ask question to coworker')
    run the coworker on a task they build, which passes no step hook. See `_begin_delegated`.
    """

    @functools.wraps(execute)
    def governed(self: Any, task: Any, *args: Any, **kwargs: Any) -> Any:
        refused = _begin_delegated(self, task)
        return execute(self, task, *args, **kwargs) if refused is None else refused

    return governed


def _adelegated_start(execute: Any) -> Any:
    """`_delegated_start` for ``Agent.aexecute_task``."""

    @functools.wraps(execute)
    async def governed(self: Any, task: Any, *args: Any, **kwargs: Any) -> Any:
        refused = _begin_delegated(self, task)
        return await execute(self, task, *args, **kwargs) if refused is None else refused

    return governed


def _begin_delegated(agent_obj: Any, task: Any) -> str | None:
    """Take a ``max_agents`` slot for ``agent_obj``'s start on ``task``, unless a task start counted it.

    Returns None to let the work run, else (``skip``/``end``) the placeholder that is its answer; under
    ``deny`` it raises, and since the delegation tool turns that into an observation, the run's next
    gate raises it again (as for a coworker's refused call, `_refused_mid_task`).
    """
    run = _run.get()
    if run is None or task is None:
        return None
    task_id = str(getattr(task, "id", ""))
    with run.lock:
        # A task of the run was counted at its start; CrewAI's retry of delegated work is the same start.
        if task_id in run.task_roles or task_id in run.delegated:
            return None
        run.delegated.add(task_id)
    gov = run.gov
    role = getattr(agent_obj, "role", None)
    agent = gov.agent(role)
    location = run.location_for(task)
    decision = gov.budget.begin_agent(agent, run_id=run.run_id, location=location)
    if decision.allowed:
        return None
    exc = gov.budget.exceeded(decision, agent)
    policy = run.policy_for(task, role)
    if policy == "deny":
        if run.refused is None:
            run.refused = exc
        raise CrewBudgetExceeded(exc)
    marker = gov.budget.skip(agent, str(exc), resource=exc.resource, location=location, run_id=run.run_id)
    if policy == "end" and run.ended is None:
        run.ended = marker
    return _placeholder(marker.reason)


@dataclass(frozen=True)
class _ReplayStart:
    """What `_execution_start` reads of CrewAI's start context, for a replay."""

    crew: Any


_install_lock = threading.Lock()
_installed = False
_telling: weakref.WeakSet[Budget] = weakref.WeakSet()  # the budgets `_tell_agents` listens to
_governed_crews: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
"""Crew id -> the governed crew with that id (the last governed), for `Crew.from_checkpoint`."""


def _register_missing_hooks() -> None:
    """Register each dispatcher of this module that is not registered: all of them at import.

    A host may clear CrewAI's global hooks after the import (``clear_all_global_hooks()`` in a test
    teardown): the budget would then fail open, silently. ``register_before_llm_call_hook`` and the
    other legacy registrations append to these same lists. Call it under ``_install_lock``.
    """
    for point, hook in (
        (InterceptionPoint.EXECUTION_START, _execution_start),
        (InterceptionPoint.EXECUTION_END, _execution_end),
        (InterceptionPoint.PRE_STEP, _pre_step),
        (InterceptionPoint.POST_STEP, _post_step),
        (InterceptionPoint.PRE_MODEL_CALL, _before_llm),
        (InterceptionPoint.POST_MODEL_CALL, _after_llm),
        (InterceptionPoint.PRE_TOOL_CALL, _before_tool),
        (InterceptionPoint.POST_TOOL_CALL, _after_tool),
    ):
        if hook not in get_hooks(point):
            register_hook(point, hook)


def _ensure_hooks(crew: Any = None) -> None:
    """Register again the dispatchers a host cleared (before a governed kickoff, in govern_crew, budget_scope).

    An agent that ran while they were gone keeps its executor, which copied the LLM-call hook lists
    without them when it was made: ``crew``'s agents' executors get them back too.
    """
    with _install_lock:
        _register_missing_hooks()
    agents = [*(getattr(crew, "agents", None) or ()), getattr(crew, "manager_agent", None)]
    for agent in agents:
        executor = getattr(agent, "agent_executor", None)
        for hooks, hook in (("before_llm_call_hooks", _before_llm), ("after_llm_call_hooks", _after_llm)):
            listed = getattr(executor, hooks, None)
            if isinstance(listed, list) and hook not in listed:
                listed.append(hook)


def _install() -> None:
    """Register one dispatcher per hook point, once per process."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _register_missing_hooks()
        # The one synchronous place where each call's provider-reported usage passes.
        BaseLLM._track_token_usage_internal = _track_usage(BaseLLM._track_token_usage_internal)  # type: ignore[method-assign]
        Crew.copy = _governed_copy(Crew.copy)  # type: ignore[method-assign]
        Crew.kickoff = _closing_kickoff(Crew.kickoff)  # type: ignore[method-assign]
        Crew.akickoff = _closing_akickoff(Crew.akickoff)  # type: ignore[method-assign]
        Crew.replay = _closing_kickoff(Crew.replay, starts_run=True)  # type: ignore[method-assign]
        # Every kickoff variant resumes from a checkpoint through this module-level function of crew.py.
        crew_module.apply_checkpoint = _governed_restore(crew_module.apply_checkpoint)  # type: ignore[attr-defined]
        Crew.from_checkpoint = _governed_from_checkpoint(vars(Crew)["from_checkpoint"].__func__)  # type: ignore[method-assign]
        # The one method every way of running a task alone passes through (private: pinned crewai).
        Task._execute_core = _task_run(Task._execute_core)  # type: ignore[method-assign]
        Task._aexecute_core = _atask_run(Task._aexecute_core)  # type: ignore[method-assign]
        # Where delegated work starts: the coworker tools call it directly, past every step hook.
        Agent.execute_task = _delegated_start(Agent.execute_task)  # type: ignore[method-assign]
        Agent.aexecute_task = _adelegated_start(Agent.aexecute_task)  # type: ignore[method-assign]
        _installed = True


_install()


def govern_crew(
    crew: Any,
    budget: Budget,
    *,
    agents: Mapping[str, str] | None = None,
    on_exhausted: str | None = None,
    policies: Mapping[str, str] | None = None,
) -> Any:
    """Put every kickoff of ``crew`` (and of its copies) under ``budget``; return the crew.

    ``agents`` maps agent roles to budget agents (default: the role, registered on
    first use); ``policies`` maps task names, then roles, to ``deny``/``skip``/``end``.

    Example:
        ```python
        govern_crew(crew, budget, policies={"review": "skip"})
        crew.kickoff(inputs={"topic": "otters"})
        ```
    """
    if not isinstance(crew, Crew):
        raise ConfigurationError(f"crew must be a crewai Crew, got {type(crew).__name__} {crew!r}")
    gov = _governance(budget, agents, on_exhausted, policies)
    _attach(crew, gov)
    _ensure_hooks(crew)
    return crew


def _governance(
    budget: Budget, agents: Mapping[str, str] | None, on_exhausted: str | None, policies: Mapping[str, str] | None
) -> _Governance:
    # Fail here, naming the argument, rather than mid-kickoff (where a hook error only aborts the call).
    if not isinstance(budget, Budget):
        raise ConfigurationError(f"budget must be a Budget, got {type(budget).__name__} {budget!r}")
    if not _names_to_strings(agents, values=lambda v: isinstance(v, str) and v != ""):
        raise ConfigurationError(
            f"agents must map agent roles to budget agent names, got {type(agents).__name__} {agents!r}"
        )
    if not _names_to_strings(policies, values=lambda v: True):
        raise ConfigurationError(
            f"policies must map task names or agent roles to policies, got {type(policies).__name__} {policies!r}"
        )
    default = on_exhausted or budget.on_exhausted
    for policy in (default, *(policies or {}).values()):
        if policy not in POLICIES or policy == "interrupt":
            raise ConfigurationError(f"CrewAI policies are 'deny', 'skip' or 'end', got {policy!r}")
    with _install_lock:
        if budget not in _telling:
            budget.add_soft_limit_listener(_tell_agents)
            _telling.add(budget)
    return _Governance(budget, dict(agents or {}), default, dict(policies or {}))


def _names_to_strings(mapping: Any, values: Callable[[Any], bool]) -> bool:
    """Whether ``mapping`` is None or maps strings to values that pass ``values``."""
    if mapping is None:
        return True
    return isinstance(mapping, Mapping) and all(isinstance(k, str) and values(v) for k, v in mapping.items())


def _attach(crew: Any, gov: _Governance, *, governs: bool = True) -> None:
    """Put ``crew`` under ``gov``; ``governs=False`` for a crew that only inherits it (a copy, a restore).

    An inheriting crew is found by `Crew.from_checkpoint` only while no governed crew with its id lives:
    a crew restored by ``kickoff(from_checkpoint=...)`` has its original's id, and replacing the original
    there would leave `Crew.from_checkpoint` ungoverned once the (short-lived) restored crew is gone.
    """
    object.__setattr__(crew, _ATTR, gov)
    if governs:
        _governed_crews[str(crew.id)] = crew
    else:
        _governed_crews.setdefault(str(crew.id), crew)


@contextmanager
def budget_scope(budget: Budget, *, on_exhausted: str | None = None) -> Iterator[Budget]:
    """Govern the CrewAI work done inside the block: for crews built deep inside other code.

    Every crew kickoff, flow and ``Agent.kickoff`` in the block is a run under ``budget``; so is each
    task run alone (``Task.execute_sync``, ``execute_async``, ``aexecute_sync``). A bare
    ``llm.call()``/``acall()`` made outside those is reserved and charged too (to the budget's run,
    no agent unless it passes ``from_agent``); a refusal raises `CrewBudgetExceeded` from the call,
    whatever the policy (there is no task to skip). A crew governed by `govern_crew` keeps its own budget.
    The scope follows the context: threads the block starts itself (``threading.Thread``, a bare
    ``ThreadPoolExecutor``) do not see it unless their work runs in ``contextvars.copy_context()``.

    Example:
        ```python
        with budget_scope(budget, on_exhausted="skip"):
            build_and_run_crews()
        ```
    """
    gov = _governance(budget, None, on_exhausted, None)
    _ensure_hooks()
    outer = _run.get()
    scope = _Scope(gov, _Run(gov, outer=outer, scope=True))
    token = _scope.set(scope)
    try:
        yield budget
    finally:
        _scope.reset(token)
        _close_abandoned(outer)  # a kickoff in the block that ended without CrewAI's end hook
        _release_open_calls(scope.run, "the budget scope ended before the call answered")
