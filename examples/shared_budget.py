"""Several worker processes drawing on one budget (runs offline).

    python examples/shared_budget.py                                   # SQLite file in a temp dir
    BUDGETARY_REDIS_URL=redis://127.0.0.1:6379/0 python examples/shared_budget.py   # Redis

Four workers each try to make ten "LLM calls" (a fake model, no network)
against a daily tenant budget of 25,000 tokens and a run budget of 24 calls.
Every worker opens the store by URL and constructs the same budgets by name,
so they all share the same counters: together they get exactly 24 calls, and
the last ones are refused.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
import uuid
from typing import Any

from budgetary import Budget, BudgetExceeded, Limits, Price
from budgetary.cli import main as cli_main

PRICES = {"fake-model": Price(input_mtok="0.15", output_mtok="0.60")}


def store_url() -> str:
    url = os.environ.get("BUDGETARY_REDIS_URL")
    if url:
        try:
            import redis

            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
            return url
        except Exception as exc:  # fall back to SQLite so the example always runs
            print(f"Redis at {url} is not usable ({exc!r}); using SQLite instead", file=sys.stderr)
    return "sqlite:///" + os.path.join(tempfile.mkdtemp(prefix="budgetary-example-"), "budget.db")


def open_store(url: str, prefix: str) -> Any:
    """A store by URL; Redis keys go under ``prefix`` so this demo can remove its keys afterwards."""
    if url.startswith("redis"):
        from budgetary.core.stores.redis import RedisStore

        return RedisStore(url, key_prefix=prefix)
    return url


def budgets(url: str, prefix: str) -> tuple[Budget, Budget]:
    """The shared budgets: every process builds the same ones, by name, on the same store."""
    tenant = Budget(Limits(max_total_tokens=25_000, max_cost_usd="0.05", window="1d"), name="tenant-acme",
                    store=open_store(url, prefix), prices=PRICES, lease_ttl=30)  # fmt: skip
    run = Budget(Limits(max_llm_calls=24), name="nightly-report", parent=tenant, lease_ttl=30)
    return tenant, run


def fake_llm(rng: random.Random, max_tokens: int) -> dict[str, int]:
    time.sleep(rng.uniform(0.001, 0.01))
    return {"input_tokens": 400, "output_tokens": rng.randint(100, max_tokens)}


def worker(url: str, prefix: str, index: int, results: mp.Queue) -> None:  # type: ignore[type-arg]
    _, run = budgets(url, prefix)
    run.agent(f"worker-{index}", priority=1)
    rng = random.Random(index)
    granted = refused = 0
    for _ in range(10):
        try:
            with run.llm_call(f"worker-{index}", model="fake-model", prompt_tokens=400, max_output_tokens=300) as call:
                call.settle(fake_llm(rng, 300))
            granted += 1
        except BudgetExceeded:
            refused += 1
    run.store.close()
    results.put((index, granted, refused))


def main() -> None:
    url = store_url()
    prefix = f"budgetary-example:{uuid.uuid4().hex[:8]}:"
    print(f"store: {url}")
    tenant, run = budgets(url, prefix)
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=worker, args=(url, prefix, i, results)) for i in range(4)]
    for p in procs:
        p.start()
    for _ in procs:
        index, granted, refused = results.get(timeout=120)
        print(f"worker-{index}: {granted} calls granted, {refused} refused")
    for p in procs:
        p.join()
    snap = run.snapshot()
    print(f"run {snap.budget!r}: {snap.llm_calls} LLM calls, {snap.total_tokens} tokens, ${snap.cost_usd}")
    day = snap.parent
    assert day is not None
    print(f"tenant {day.budget!r}: {day.total_tokens} of {day.limits.max_total_tokens} tokens today, "
          f"resets at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(day.window_resets_at or 0))}")  # fmt: skip
    print("per agent:", run.report())
    refusals = run.ledger.history(kind="deny")
    if refusals:
        print("first refusal:", refusals[0].reason)
    # Any host can read the same figures with the `budgetary` command (here run in-process).
    argv = ["--store", url, *(["--key-prefix", prefix] if url.startswith("redis") else [])]
    print(f"\n$ budgetary {' '.join(argv)} report tenant-acme nightly-report")
    cli_main([*argv, "report", "tenant-acme", "nightly-report"])
    tenant.store.close()
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()


if __name__ == "__main__":
    main()
