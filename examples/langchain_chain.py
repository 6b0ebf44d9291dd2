"""A LangChain chain under a budget: one line attaches enforcement to an existing chain.

Offline by default (a fake model that reports usage like OpenAI). With
OPENAI_API_KEY set and ``langchain-openai`` installed it calls the real API.

    python examples/langchain_chain.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from budgetary import Budget, BudgetExceeded, Limits
from budgetary.integrations.langchain import BudgetCallbackHandler


def make_model():
    if os.environ.get("OPENAI_API_KEY"):
        try:
            from langchain_openai import ChatOpenAI

            # stream_usage=True: without it, streamed calls through proxies report no usage.
            return ChatOpenAI(model="gpt-4o-mini", max_tokens=200, stream_usage=True)
        except ImportError:
            print("langchain-openai is not installed; using the offline fake model")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fakes import FakeChatModel

    return FakeChatModel(
        responses=["Otters hold hands while sleeping.", "Otters use rocks as tools.", "Otters have dense fur."],
        usage={
            "input_tokens": 420,
            "output_tokens": 60,
            "total_tokens": 480,
            "input_token_details": {"cache_read": 256},
        },
        max_tokens=200,
    )


def main() -> None:
    budget = Budget(Limits(max_total_tokens=1_500, max_cost_usd="0.01"), name="chain-demo",
                    on_soft_limit=lambda e: print(f"  soft limit: {e.message}"))  # fmt: skip
    chain = ChatPromptTemplate.from_messages([("user", "Tell me one fact about {animal}.")]) | make_model()
    chain = chain | StrOutputParser()
    handler = BudgetCallbackHandler(budget, agent="fact-finder")
    for animal in ["otters", "sea otters", "river otters", "giant otters"]:
        try:
            print(f"{animal}: {chain.invoke({'animal': animal}, config={'callbacks': [handler]})}")
        except BudgetExceeded as exc:
            print(f"{animal}: refused before the call ({exc.resource}: {exc})")
    snap = budget.snapshot()
    print(
        f"\nspent {snap.total_tokens}/{snap.limits.max_total_tokens} tokens, ${snap.cost_usd}, {snap.llm_calls} calls"
    )
    for entry in budget.ledger.history():
        tokens = entry.usage.total_tokens if entry.usage else ""
        print(
            f"  {entry.kind:<10} {entry.agent or '-':<12} {entry.model or '':<14} {tokens!s:>6} {entry.cost_usd or ''}"
        )


if __name__ == "__main__":
    main()
