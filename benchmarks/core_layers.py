"""Where the reserve/settle time goes: engine, store wrapper, Budget, llm_call block (best of 7, timeit).

python benchmarks/core_layers.py
"""

from __future__ import annotations

import itertools
import timeit

from budgetary import Budget, Limits, Usage
from budgetary.core._engine import Meta

budget = Budget(Limits(max_total_tokens=10**12, max_cost_usd=10**6, max_llm_calls=10**9), name="limited")
for name in ("planner", "researcher", "writer", "critic"):
    budget.agent(name, priority=2, max_tokens=10**11)
usage = Usage(input_tokens=100, output_tokens=50)
engine = budget._store._engine  # type: ignore[attr-defined]  # the memory store's engine, for this breakdown only
chain = budget._chain
meta = Meta("run", "gpt-4o-mini", None)
req = [100, 50, 150, 1000, 1, 0, 0, 0]
actual = [100, 50, 150, 900, 1, 0, 0, 0]
ids = itertools.count()


def best_us(stmt: str, n: int = 20_000) -> float:
    return min(timeit.repeat(stmt, number=n, repeat=7, globals=globals())) / n * 1e6


ROWS = {
    "engine: reserve + settle": (
        "h = str(next(ids)); engine.reserve(chain, 'researcher', req, gate=False, hold_id=h, ttl=60, now=1.0, "
        "meta=meta); engine.settle(chain, 'researcher', h, actual, now=1.0, meta=meta, usage=usage)"
    ),
    "store (+ lock): reserve + settle": (
        "h = str(next(ids)); budget.store.reserve(chain, 'researcher', req, gate=False, hold_id=h, ttl=60, now=1.0, "
        "meta=meta); budget.store.settle(chain, 'researcher', h, actual, now=1.0, meta=meta, usage=usage)"
    ),
    "Budget.reserve(...).settle(usage)": (
        "budget.reserve('researcher', model='gpt-4o-mini', prompt_tokens=100, max_output_tokens=50).settle(usage)"
    ),
    "with budget.llm_call(...) as c: c.settle(usage)": (
        "with budget.llm_call('researcher', model='gpt-4o-mini', prompt_tokens=100, max_output_tokens=50) as c:\n"
        "    c.settle(usage)"
    ),
}

if __name__ == "__main__":
    for label, stmt in ROWS.items():
        print(f"{label:<48} {best_us(stmt):6.2f} µs")
