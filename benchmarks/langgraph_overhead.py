"""A 10-node chain graph (one fake LLM call per node) with and without govern_graph, one run.

python benchmarks/langgraph_overhead.py
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypedDict

from langchain_core.callbacks import UsageMetadataCallbackHandler
from langgraph.graph import END, START, StateGraph

from budgetary import Budget, Limits
from budgetary.integrations.langgraph import govern_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fakes import FakeChatModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import compare

NODES = 10


class State(TypedDict, total=False):
    notes: Annotated[list[str], operator.add]


def build(model: FakeChatModel) -> StateGraph:
    builder = StateGraph(State)
    previous = START
    for i in range(NODES):

        def node(state: State, i: int = i) -> dict:
            return {"notes": [str(model.invoke(f"step {i}").content)]}

        builder.add_node(f"n{i}", node)
        builder.add_edge(previous, f"n{i}")
        previous = f"n{i}"
    builder.add_edge(previous, END)
    return builder


def cases() -> tuple[dict[str, Callable[[], object]], Budget]:
    """The three cases, and the budget of the governed graph (also used by `instructions.py`)."""
    model = FakeChatModel(usage={"input_tokens": 50, "output_tokens": 10, "total_tokens": 60}, max_tokens=10)
    plain = build(model).compile()
    budget = Budget(Limits(max_total_tokens=10**12, max_cost_usd=10**6))
    governed = govern_graph(build(model), budget)
    usage = UsageMetadataCallbackHandler()
    return {
        "plain graph": lambda: plain.invoke({"notes": []}),
        "plain + usage handler": lambda: plain.invoke({"notes": []}, {"callbacks": [usage]}),
        "govern_graph": lambda: governed.invoke({"notes": []}),
    }, budget


def main() -> None:
    runs, budget = cases()
    compare(runs, baseline="plain graph", unit="ms/run", rounds=7, per_round=20, warmup=3, scale=1e3)
    assert budget.snapshot().llm_calls > 0 and budget.snapshot().agents_started > 0


if __name__ == "__main__":
    main()
