"""A 3-task crew on the fake LLM with and without a budget, one run.

python benchmarks/crewai_overhead.py
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from pathlib import Path

for name, value in {"CREWAI_DISABLE_TELEMETRY": "true", "OTEL_SDK_DISABLED": "true",
                    "CREWAI_DISABLE_VERSION_CHECK": "true", "CREWAI_TRACING_ENABLED": "false"}.items():  # fmt: skip
    os.environ.setdefault(name, value)

from crewai import Agent, Crew, Process, Task  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fakes import FakeCrewLLM  # noqa: E402

from budgetary import Budget, Limits  # noqa: E402
from budgetary.integrations.crewai import govern_crew  # noqa: E402

ROUNDS = 5
PER_ROUND = 10


def crew() -> Crew:
    llm = FakeCrewLLM(model="gpt-4o-mini", prompt_tokens=300, completion_tokens=60, max_tokens=100)
    agents = [Agent(role=r, goal=f"{r} work", backstory="Brief.", llm=llm) for r in ("Researcher", "Writer", "Critic")]
    tasks = [Task(name=a.role.lower(), description=f"Do {a.role} work on {{topic}}", expected_output="text", agent=a)
             for a in agents]  # fmt: skip
    return Crew(agents=agents, tasks=tasks, process=Process.sequential)


def timed(run) -> float:
    run()
    rounds = []
    for _ in range(ROUNDS):
        gc.collect()
        start = time.perf_counter()
        for _ in range(PER_ROUND):
            run()
        rounds.append((time.perf_counter() - start) / PER_ROUND * 1e3)
    return statistics.median(rounds)


def main() -> None:
    plain = crew()
    governed = crew()
    budget = Budget(Limits(max_total_tokens=10**12, max_cost_usd=10**6))
    govern_crew(governed, budget)
    results: dict[str, list[float]] = {"plain crew": [], "govern_crew": []}
    for _ in range(3):  # interleaved, so drift on a busy machine hits both alike
        results["plain crew"].append(timed(lambda: plain.kickoff(inputs={"topic": "otters"})))
        results["govern_crew"].append(timed(lambda: governed.kickoff(inputs={"topic": "otters"})))
    base = statistics.median(results["plain crew"])
    print(f"{'case':<12} {'median ms/kickoff':>18} {'x plain':>8}")
    for name, values in results.items():
        value = statistics.median(values)
        print(f"{name:<12} {value:>18.2f} {value / base:>8.3f}")
    assert budget.snapshot().llm_calls > 0


if __name__ == "__main__":
    main()
