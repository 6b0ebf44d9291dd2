"""Shared timing for the benchmarks: medians of rounds, cases interleaved so drift hits them alike."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping


def median_per_call(run: Callable[[], object], *, rounds: int, per_round: int, warmup: int, scale: float) -> float:
    """Median over ``rounds`` of the mean time per call, times ``scale`` (1e3 for ms, 1e6 for µs)."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(rounds):
        gc.collect()
        start = time.perf_counter()
        for _ in range(per_round):
            run()
        samples.append((time.perf_counter() - start) / per_round * scale)
    return statistics.median(samples)


def compare(
    cases: Mapping[str, Callable[[], object]], *, baseline: str, unit: str, repeats: int = 3, **timing: float
) -> None:
    """Time every case ``repeats`` times, interleaved, and print medians and ratios to ``baseline``."""
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            results[name].append(median_per_call(run, **timing))  # type: ignore[arg-type]
    medians = {name: statistics.median(values) for name, values in results.items()}
    width = max(len(name) for name in cases)
    print(f"{'case':<{width}}  {'median ' + unit:>16}  {'x ' + baseline:>{len(baseline) + 2}}")
    for name, value in medians.items():
        print(f"{name:<{width}}  {value:>16.2f}  {value / medians[baseline]:>{len(baseline) + 2}.3f}")
