"""A 3-task crew on the fake LLM with and without a budget, one run.

python benchmarks/crewai_overhead.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

for name, value in {"CREWAI_DISABLE_TELEMETRY": "true", "OTEL_SDK_DISABLED": "true",
                    "CREWAI_DISABLE_VERSION_CHECK": "true", "CREWAI_TRACING_ENABLED": "false"}.items():  # fmt: skip
    os.environ.setdefault(name, value)

from crewai import Agent, Crew, Process, Task  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fakes import FakeCrewLLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import compare  # noqa: E402

from budgetary import Budget, Limits  # noqa: E402
from budgetary.integrations.crewai import govern_crew  # noqa: E402


def crew() -> Crew:
    llm = FakeCrewLLM(model="gpt-4o-mini", prompt_tokens=300, completion_tokens=60, max_tokens=100)
    agents = [Agent(role=r, goal=f"{r} work", backstory="Brief.", llm=llm) for r in ("Researcher", "Writer", "Critic")]
    tasks = [Task(name=a.role.lower(), description=f"Do {a.role} work on {{topic}}", expected_output="text", agent=a)
             for a in agents]  # fmt: skip
    return Crew(agents=agents, tasks=tasks, process=Process.sequential)


def main() -> None:
    plain = crew()
    governed = crew()
    budget = Budget(Limits(max_total_tokens=10**12, max_cost_usd=10**6))
    govern_crew(governed, budget)
    cases = {
        "plain crew": lambda: plain.kickoff(inputs={"topic": "otters"}),
        "govern_crew": lambda: governed.kickoff(inputs={"topic": "otters"}),
    }
    compare(cases, baseline="plain crew", unit="ms/kickoff", rounds=5, per_round=10, warmup=2, scale=1e3, repeats=5)
    assert budget.snapshot().llm_calls > 0


if __name__ == "__main__":
    main()
