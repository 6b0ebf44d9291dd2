"""A three-agent CrewAI crew under one budget, without touching its agents or tasks.

Offline by default (a fake LLM that reports usage like OpenAI). With OPENAI_API_KEY
set it runs on gpt-4o-mini.

    python examples/crewai_crew.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")
os.environ.setdefault("CREWAI_DISABLE_VERSION_CHECK", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")

from crewai import LLM, Agent, Crew, Process, Task

from budgetary import Budget, Limits, is_budget_skipped
from budgetary.integrations.crewai import govern_crew


def make_llm():
    if os.environ.get("OPENAI_API_KEY"):
        return LLM(model="gpt-4o-mini", max_tokens=300)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fakes import FakeCrewLLM

    return FakeCrewLLM(model="gpt-4o-mini", prompt_tokens=400, completion_tokens=120, max_tokens=300)


def main() -> None:
    llm = make_llm()
    researcher = Agent(role="Researcher", goal="Find three facts", backstory="A careful zoologist.", llm=llm)
    writer = Agent(role="Writer", goal="Write one paragraph", backstory="A terse science writer.", llm=llm)
    critic = Agent(role="Critic", goal="Review the paragraph", backstory="A picky editor.", llm=llm)
    tasks = [
        Task(
            name="research", description="Find three facts about {topic}.", expected_output="3 facts", agent=researcher
        ),
        Task(name="write", description="Write a paragraph about {topic}.", expected_output="1 paragraph", agent=writer),
        Task(name="review", description="Review the paragraph.", expected_output="a verdict", agent=critic),
    ]
    crew = Crew(agents=[researcher, writer, critic], tasks=tasks, process=Process.sequential)

    budget = Budget(Limits(max_total_tokens=1_500, max_cost_usd="0.05"), name="crew-run",
                    on_soft_limit=lambda e: print(f"soft limit: {e.message}"))  # fmt: skip
    budget.agent("Researcher", priority=2, max_tokens=700)
    budget.agent("Writer", priority=3, max_tokens=500)  # important: may borrow from the others
    budget.agent("Critic", priority=1, max_tokens=300)
    govern_crew(crew, budget, policies={"review": "skip"})  # the review is optional

    result = crew.kickoff(inputs={"topic": "otters"})
    print(f"final output: {result.raw[:100]}")
    for task in tasks:
        state = "skipped" if is_budget_skipped(task.output) else "done"
        print(f"  task {task.name:<9} {state}")
    print("\nper agent:", budget.report())
    snap = budget.snapshot()
    print(f"run: {snap.total_tokens}/{snap.limits.max_total_tokens} tokens, ${snap.cost_usd}, {snap.llm_calls} calls")
    for entry in budget.ledger.history():
        print(f"  {entry.kind:<12} {entry.agent or '-':<11} {entry.location or '':<9} "
              f"{entry.usage.total_tokens if entry.usage else ''}")  # fmt: skip


if __name__ == "__main__":
    main()
