"""A four-agent research graph under one budget, governed without touching its nodes.

planner -> researcher -> writer -> critic. The critic is optional (skipped when the
budget cannot pay for it); the writer is denied when the run is short, then resumed
after a top-up from the checkpoint. Runs offline with a fake model.

    python examples/langgraph_research.py
"""

from __future__ import annotations

import operator
import sys
from pathlib import Path
from typing import Annotated, TypedDict

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

from budgetary import Budget, BudgetExceeded, Limits, Skipped
from budgetary.integrations.langgraph import govern_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fakes import FakeChatModel


class Research(TypedDict, total=False):
    topic: str
    notes: Annotated[list[str], operator.add]
    budget_skipped: Annotated[list[Skipped], operator.add]


def build(model: FakeChatModel) -> StateGraph:
    def agent(name: str):
        def node(state: Research) -> dict:
            reply = model.invoke(f"{name} on {state['topic']}")
            return {"notes": [f"{name}: {reply.content}"]}

        return node

    builder = StateGraph(Research)
    for name in ("planner", "researcher", "writer", "critic"):
        builder.add_node(name, agent(name))
    builder.add_edge(START, "planner")
    builder.add_edge("planner", "researcher")
    builder.add_edge("researcher", "writer")
    builder.add_edge("writer", "critic")
    builder.add_edge("critic", END)
    return builder


def main() -> None:
    model = FakeChatModel(
        responses=["a plan", "three facts", "a draft", "looks fine"],
        usage={"input_tokens": 30, "output_tokens": 100, "total_tokens": 130},
        max_tokens=100,
    )
    budget = Budget(Limits(max_total_tokens=300, max_cost_usd="0.01"), name="research-run")
    budget.agent("researcher", priority=3)
    app = govern_graph(build(model), budget, policies={"critic": "skip"}, checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "otters-1"}}
    try:
        app.invoke({"topic": "otters"}, config)
    except BudgetExceeded as exc:
        print(f"denied at {app.get_state(config).next}: {exc}")
        budget.top_up(total_tokens=150)
        print("topped up by 150 tokens; resuming from the checkpoint")
    state = app.invoke(None, config)
    for note in state["notes"]:
        print("  ", note)
    for marker in state.get("budget_skipped", []):
        print(f"   skipped {marker.location}: {marker.reason}")
    print("\nledger by agent:")
    for agent, figures in budget.report().items():
        print(f"   {agent:<11} consumed {figures['consumed']:>5} tokens")
    for entry in budget.ledger.history():
        print(f"   {entry.kind:<11} {entry.agent or '-':<11} {entry.usage.total_tokens if entry.usage else ''}")
    snap = budget.snapshot()
    print(f"\nrun: {snap.total_tokens}/{snap.limits.max_total_tokens} tokens, ${snap.cost_usd}, {snap.llm_calls} calls")


if __name__ == "__main__":
    main()
