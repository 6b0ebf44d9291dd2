"""Invoke of a fake chat model: no handler vs LangChain's UsageMetadataCallbackHandler vs ours, one run.

    python benchmarks/langchain_overhead.py

The fake model answers instantly, so this measures callback overhead at its worst;
with a real provider (hundreds of milliseconds per call) it disappears in the noise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from langchain_core.callbacks import UsageMetadataCallbackHandler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fakes import FakeChatModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import compare

from budgetary import Budget, Limits
from budgetary.integrations.langchain import BudgetCallbackHandler


def cases() -> tuple[dict[str, Callable[[], object]], Budget]:
    """The three cases, and the budget the handler charges (also used by `instructions.py`)."""
    model = FakeChatModel(usage={"input_tokens": 120, "output_tokens": 30, "total_tokens": 150}, max_tokens=100)
    prompt = [("user", "Tell me one fact about otters.")]
    usage_handler = UsageMetadataCallbackHandler()
    budget = Budget(Limits(max_total_tokens=10**12, max_cost_usd=10**6, max_llm_calls=10**9))
    budget_handler = BudgetCallbackHandler(budget, agent="researcher")
    return {
        "no handler": lambda: model.invoke(prompt),
        "UsageMetadataCallbackHandler": lambda: model.invoke(prompt, config={"callbacks": [usage_handler]}),
        "BudgetCallbackHandler": lambda: model.invoke(prompt, config={"callbacks": [budget_handler]}),
    }, budget


def main() -> None:
    runs, budget = cases()
    compare(runs, baseline="UsageMetadataCallbackHandler", unit="µs/invoke", rounds=9, per_round=400,
            warmup=100, scale=1e6)  # fmt: skip
    assert budget.snapshot().llm_calls > 0


if __name__ == "__main__":
    main()
