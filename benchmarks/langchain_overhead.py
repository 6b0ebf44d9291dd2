"""Invoke of a fake chat model: no handler vs LangChain's UsageMetadataCallbackHandler vs ours, one run.

    python benchmarks/langchain_overhead.py

The fake model answers instantly, so this measures callback overhead at its worst;
with a real provider (hundreds of milliseconds per call) it disappears in the noise.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

from langchain_core.callbacks import UsageMetadataCallbackHandler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fakes import FakeChatModel

from budgetary import Budget, Limits
from budgetary.integrations.langchain import BudgetCallbackHandler

ROUNDS = 9
PER_ROUND = 400


def timed(invoke) -> float:
    for _ in range(100):
        invoke()
    rounds = []
    for _ in range(ROUNDS):
        gc.collect()
        start = time.perf_counter()
        for _ in range(PER_ROUND):
            invoke()
        rounds.append((time.perf_counter() - start) / PER_ROUND * 1e6)
    return statistics.median(rounds)


def main() -> None:
    model = FakeChatModel(usage={"input_tokens": 120, "output_tokens": 30, "total_tokens": 150}, max_tokens=100)
    prompt = [("user", "Tell me one fact about otters.")]
    usage_handler = UsageMetadataCallbackHandler()
    budget = Budget(Limits(max_total_tokens=10**12, max_cost_usd=10**6, max_llm_calls=10**9))
    budget_handler = BudgetCallbackHandler(budget, agent="researcher")
    cases = {
        "no handler": lambda: model.invoke(prompt),
        "UsageMetadataCallbackHandler": lambda: model.invoke(prompt, config={"callbacks": [usage_handler]}),
        "BudgetCallbackHandler": lambda: model.invoke(prompt, config={"callbacks": [budget_handler]}),
    }
    # Interleave the cases so drift on a busy machine hits them alike.
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(3):
        for name, fn in cases.items():
            results[name].append(timed(fn))
    medians = {name: statistics.median(values) for name, values in results.items()}
    reference = medians["UsageMetadataCallbackHandler"]
    print(f"{'case':<30} {'median µs/invoke':>17} {'x usage handler':>16}")
    for name, value in medians.items():
        print(f"{name:<30} {value:>17.1f} {value / reference:>16.3f}")
    assert budget.snapshot().llm_calls > 0


if __name__ == "__main__":
    main()
