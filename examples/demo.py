"""Three agents share one budget: a reallocation, a soft limit, a skip and a deny.

Runs offline: a tiny fake "provider" reports usage the way OpenAI does. Run with
``make demo`` (or ``python examples/demo.py``).
"""

from __future__ import annotations

import sys

from budgetary import Budget, BudgetExceeded, Limits, SoftLimit, is_budget_skipped

MODEL = "gpt-4o-mini"


def fake_provider(prompt: str, max_tokens: int, *, wordy: bool = False) -> dict:
    """What an OpenAI-compatible endpoint would report for one call."""
    prompt_tokens = len(prompt.split()) * 10
    completion_tokens = max_tokens if wordy else max_tokens // 2
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": prompt_tokens // 4},
    }


def main() -> int:
    events: list[SoftLimit] = []
    budget = Budget(
        Limits(max_total_tokens=6_000, max_cost_usd="0.01", warn_at=(0.5, 0.8)),
        name="research-run",
        on_soft_limit=events.append,
    )
    budget.agent("researcher", priority=3, max_tokens=1_200)
    budget.agent("writer", priority=2, max_tokens=2_500)
    budget.agent("critic", priority=1, max_tokens=1_500, min_reserve=100)

    log: list[tuple[str, str]] = []

    def call(agent: str, prompt: str, max_tokens: int, *, wordy: bool = False) -> None:
        with budget.llm_call(agent, model=MODEL, messages=[{"role": "user", "content": prompt}],
                             max_output_tokens=max_tokens) as c:  # fmt: skip
            c.settle(fake_provider(prompt, max_tokens, wordy=wordy))
        log.append((agent, f"ok ({c.decision.__class__.__name__})"))

    # The researcher is important and busy: its allocation runs short, so budget moves
    # from the least important idle agent (the critic) to it.
    for step in range(4):
        call("researcher", f"search the literature on otters step {step} " * 3, 300)

    # The writer drafts; total spend crosses 50 % and then 80 % of the run: soft limits fire.
    # Its last pass needs more than its own allocation: reallocation covers it too.
    call("writer", "draft the report from these notes " * 4, 800, wordy=True)
    call("writer", "revise the draft " * 4, 600, wordy=True)
    call("writer", "polish the prose " * 4, 1_500, wordy=True)  # past its allocation: the critic covers it

    # The critic is an optional finaliser: it gave its spare budget away and nobody less
    # important can give it any, so it is skipped rather than failing the run.
    @budget.govern("critic", model=MODEL, on_exhausted="skip",
                   usage_fn=lambda r: fake_provider("review", 1_200, wordy=True))  # fmt: skip
    def review(draft: str) -> str:
        return "looks good"

    result = review("the draft " * 800)
    log.append(("critic", "skipped" if is_budget_skipped(result) else f"ok: {result}"))

    # The writer wants one more long pass: the run cannot cover it, so the call is denied.
    try:
        call("writer", "rewrite everything at length " * 10, 2_000, wordy=True)
    except BudgetExceeded as exc:
        log.append(("writer", f"denied: {exc.resource} ({exc.budget})"))

    _print(budget, log, events)
    return 0


def _print(budget: Budget, log: list[tuple[str, str]], events: list[SoftLimit]) -> None:
    snap = budget.snapshot()
    report = budget.report()
    rows = [(name, str(r["allocated"]), str(r["consumed"]), str(r["remaining"])) for name, r in report.items()]
    transfers = [f"{e.amount} tokens {e.donor} -> {e.agent}" for e in budget.ledger.history(kind="transfer")]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text without the `rich` extra
        print(f"{'agent':<12}{'allocated':>10}{'consumed':>10}{'remaining':>10}")
        for row in rows:
            print(f"{row[0]:<12}{row[1]:>10}{row[2]:>10}{row[3]:>10}")
        for line in [*(f"{a}: {what}" for a, what in log), *transfers, *(e.message for e in events)]:
            print(line)
        print(f"run: {snap.total_tokens}/{snap.limits.max_total_tokens} tokens, ${snap.cost_usd} "
              f"of ${snap.limits.max_cost_usd}, {snap.llm_calls} calls")  # fmt: skip
        return
    console = Console()
    table = Table(title=f"budget {budget.name!r}: agents")
    for column in ("agent", "allocated", "consumed", "remaining"):
        table.add_column(column, justify="left" if column == "agent" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    calls = Table(title="what happened")
    calls.add_column("agent")
    calls.add_column("outcome")
    for agent, what in log:
        calls.add_row(agent, what)
    console.print(calls)
    for line in transfers:
        console.print(f"[cyan]reallocated[/cyan] {line}")
    for event in events:
        console.print(f"[yellow]soft limit[/yellow] {event.message}")
    console.print(
        f"[bold]run[/bold]: {snap.total_tokens}/{snap.limits.max_total_tokens} tokens, "
        f"${snap.cost_usd} of ${snap.limits.max_cost_usd}, {snap.llm_calls} LLM calls, "
        f"{len(budget.ledger.history())} ledger entries"
    )


if __name__ == "__main__":
    sys.exit(main())
