"""Reserve+settle throughput and latency for the memory, SQLite and Redis stores.

Run:
    python benchmarks/stores.py                 # 1 and 4 processes, 2,000 cycles per process
    python benchmarks/stores.py --cycles 5000 --redis redis://127.0.0.1:6379/0

One cycle is ``budget.reserve(...)`` followed by ``reservation.settle(usage)``
through the public API: two store operations (each one atomic step: one Lua
script call in Redis, one ``BEGIN IMMEDIATE`` transaction in SQLite). The
baseline is one plain Redis ``INCRBY`` round trip from the same client
library, measured in the same run; "per op" columns divide a cycle by two.
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import uuid
import warnings
from typing import Any

from budgetary import Budget, Limits, Price

PRICES = {"bench-model": Price(input_mtok="0.15", output_mtok="0.60")}
USAGE = {"input_tokens": 120, "output_tokens": 80}


def _store(kind: str, where: str, prefix: str) -> Any:
    if kind == "memory":
        from budgetary.core.stores import MemoryStore

        return MemoryStore()
    if kind == "sqlite":
        from budgetary.core.stores.sqlite import SQLiteStore

        return SQLiteStore(where)
    from budgetary.core.stores.redis import RedisStore

    return RedisStore(where, key_prefix=prefix)


def _cycles(
    kind: str, where: str, prefix: str, name: str, cycles: int, barrier: Any
) -> tuple[float, float, list[float]]:
    """Run ``cycles`` reserve+settle cycles; return (start, end, per-cycle latencies in seconds)."""
    warnings.simplefilter("ignore")
    store = _store(kind, where, prefix)
    budget = Budget(Limits(max_total_tokens=10**15, max_cost_usd=10**6, max_llm_calls=10**12), name=name,
                    store=store, prices=PRICES)  # fmt: skip
    budget.agent("worker", max_tokens=10**14)
    for _ in range(min(200, cycles)):  # warm up: connections, script cache, statement cache
        budget.reserve("worker", model="bench-model", prompt_tokens=120, max_output_tokens=200).settle(USAGE)
    if barrier is not None:
        barrier.wait()
    latencies = []
    clock = time.perf_counter
    start = time.time()
    for _ in range(cycles):
        t0 = clock()
        reservation = budget.reserve("worker", model="bench-model", prompt_tokens=120, max_output_tokens=200)
        reservation.settle(USAGE)
        latencies.append(clock() - t0)
    end = time.time()
    store.close()
    return start, end, latencies


def _incrby(
    kind: str, where: str, prefix: str, name: str, cycles: int, barrier: Any
) -> tuple[float, float, list[float]]:
    """The baseline: one plain INCRBY round trip per iteration."""
    import redis

    client = redis.Redis.from_url(where)
    key = f"{prefix}{name}"
    for _ in range(200):
        client.incrby(key, 1)
    if barrier is not None:
        barrier.wait()
    latencies = []
    clock = time.perf_counter
    start = time.time()
    for _ in range(cycles):
        t0 = clock()
        client.incrby(key, 1)
        latencies.append(clock() - t0)
    end = time.time()
    client.delete(key)
    client.close()
    return start, end, latencies


def _worker(fn: Any, args: tuple[Any, ...], barrier: Any, results: Any) -> None:
    results.put(fn(*args, barrier))


def measure(fn: Any, kind: str, where: str, prefix: str, cycles: int, processes: int) -> dict[str, float]:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    if processes == 1:
        runs = [fn(kind, where, prefix, name, cycles, None)]
    else:
        ctx = mp.get_context("spawn")
        barrier, results = ctx.Barrier(processes), ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(fn, (kind, where, prefix, name, cycles), barrier, results))
                 for _ in range(processes)]  # fmt: skip
        for p in procs:
            p.start()
        runs = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
    latencies = sorted(x for _, _, lat in runs for x in lat)
    wall = max(end for _, end, _ in runs) - min(start for start, _, _ in runs)
    return {
        "rate": len(latencies) / wall,
        "p50": statistics.median(latencies) * 1e6,
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e6,
    }


def _redis_reachable(url: str) -> str | None:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        client.ping()
        client.close()
    except Exception as exc:  # the benchmark runs without Redis too
        return repr(exc)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=2000, help="reserve+settle cycles per process")
    parser.add_argument("--processes", type=int, default=4, help="processes for the multi-process rows")
    parser.add_argument("--redis", default=os.environ.get("BUDGETARY_REDIS_URL", "redis://127.0.0.1:6379/0"))
    opts = parser.parse_args()
    prefix = f"budgetary-bench:{uuid.uuid4().hex[:6]}:"
    tmp = tempfile.mkdtemp(prefix="budgetary-bench-")
    redis_down = _redis_reachable(opts.redis)
    rows: list[tuple[str, int, dict[str, float], float]] = []

    for processes in (1, opts.processes):
        runs: list[tuple[str, Any, str, str]] = []
        if processes == 1:
            runs.append(("memory", _cycles, "memory", ""))
        runs.append(("sqlite", _cycles, "sqlite", os.path.join(tmp, f"bench-{processes}.db")))
        if redis_down is None:
            runs.append(("redis", _cycles, "redis", opts.redis))
            runs.append(("INCRBY baseline", _incrby, "redis", opts.redis))
        for label, fn, kind, where in runs:
            figures = measure(fn, kind, where, prefix, opts.cycles, processes)
            ops_per_cycle = 1 if fn is _incrby else 2
            rows.append((label, processes, figures, ops_per_cycle))

    print(f"budgetary store benchmark: {opts.cycles} cycles per process, {os.cpu_count()} CPUs, "
          f"Redis {'unreachable: ' + redis_down if redis_down else opts.redis}")  # fmt: skip
    header = f"{'store':<16} {'procs':>5} {'cycles/s':>10} {'p50 us':>9} {'p99 us':>9} {'p50 us/op':>10}"
    print(header)
    print("-" * len(header))
    baseline: dict[int, float] = {}
    for label, processes, figures, _ in rows:
        if label.startswith("INCRBY"):
            baseline[processes] = figures["p50"]
    for label, processes, figures, ops in rows:
        per_op = figures["p50"] / ops
        print(f"{label:<16} {processes:>5} {figures['rate']:>10,.0f} {figures['p50']:>9,.0f} "
              f"{figures['p99']:>9,.0f} {per_op:>10,.0f}", end="")  # fmt: skip
        if label == "redis" and processes in baseline:
            print(f"   ({per_op / baseline[processes]:.2f}x INCRBY p50)")
        else:
            print()
    if redis_down is None:
        import redis

        client = redis.Redis.from_url(opts.redis)
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()


if __name__ == "__main__":
    main()
