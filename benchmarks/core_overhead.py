"""Per-call cost of the core on the memory store, next to a bare lock+dict baseline, in one run.

Run: ``make bench`` or ``python benchmarks/core_overhead.py``. Figures are medians over
many repetitions; compare the rows with each other, not with another machine.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections.abc import Callable

from budgetary import Budget, Limits, Usage
from budgetary.core.estimator import count_tokens, upper_bound

MODEL = "gpt-4o-mini"
ROUNDS = 7
PER_ROUND = 20_000


def median_us(fn: Callable[[], object], per_round: int = PER_ROUND) -> float:
    """Median over rounds of the mean time per call, in microseconds."""
    for _ in range(per_round // 10):
        fn()
    rounds = []
    gc.disable()
    try:
        for _ in range(ROUNDS):
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            rounds.append((time.perf_counter() - start) / per_round * 1e6)
    finally:
        gc.enable()
    return statistics.median(rounds)


def main() -> None:
    lock = threading.Lock()
    counters = {"total_tokens": 0, "llm_calls": 0}

    def baseline() -> None:
        with lock:
            counters["total_tokens"] += 150
            counters["llm_calls"] += 1

    limited = Budget(Limits(max_total_tokens=10**12, max_cost_usd=10**6, max_llm_calls=10**9), name="limited")
    for name in ("planner", "researcher", "writer", "critic"):
        limited.agent(name, priority=2, max_tokens=10**11)
    unbounded = Budget(name="unbounded")
    usage = Usage(input_tokens=100, output_tokens=50)

    def cycle(budget: Budget, agent: str | None, *, check: bool = True) -> Callable[[], None]:
        def run() -> None:
            if check:
                budget.check(agent)
            with budget.llm_call(agent, model=MODEL, prompt_tokens=100, max_output_tokens=50) as call:
                call.settle(usage)

        return run

    prompt = [{"role": "user", "content": " ".join(f"word{i}" for i in range(500))}]  # about 1,000 tokens
    exact = count_tokens(prompt, MODEL)  # also loads the encoder before timing

    def reserve_with_messages() -> None:
        with limited.llm_call("writer", model=MODEL, messages=prompt, max_output_tokens=50) as call:
            call.settle(usage)

    rows = [
        ("baseline: lock + dict update", median_us(baseline)),
        ("reserve + settle (llm_call), limits + 4 agents", median_us(cycle(limited, "researcher", check=False))),
        ("check + reserve + settle, limits + 4 agents", median_us(cycle(limited, "researcher"))),
        ("check + reserve + settle, unbounded budget", median_us(cycle(unbounded, None))),
        (f"same with a {exact}-token prompt (messages=)", median_us(reserve_with_messages, 5_000)),
        ("  of which: cheap upper bound of that prompt", median_us(lambda: upper_bound(prompt), 5_000)),
        ("  for comparison: exact tiktoken count", median_us(lambda: count_tokens(prompt, MODEL), 2_000)),
    ]
    base = rows[0][1]
    width = max(len(name) for name, _ in rows)
    print(f"{'operation':<{width}}  {'median µs':>10}  {'x baseline':>10}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10.2f}  {value / base:>10.1f}")


if __name__ == "__main__":
    main()
