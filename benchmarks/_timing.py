"""Shared timing for the benchmarks: cases interleaved round by round, medians of the rounds.

On a shared machine the load changes from one second to the next. Timing each case
in its own block lets a busy moment land on one case only and skew the ratio, so
every round times each case once, in turn, and each case reports the median of its
rounds.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping


def _round(run: Callable[[], object], per_round: int, scale: float) -> float:
    gc.collect()
    start = time.perf_counter()
    for _ in range(per_round):
        run()
    return (time.perf_counter() - start) / per_round * scale


def compare(
    cases: Mapping[str, Callable[[], object]],
    *,
    baseline: str,
    unit: str,
    rounds: int,
    per_round: int,
    warmup: int,
    scale: float,
    repeats: int = 3,
) -> None:
    """Time ``rounds * repeats`` rounds of ``per_round`` calls per case, interleaved; print medians and ratios.

    ``scale`` turns seconds into ``unit`` (1e3 for ms, 1e6 for µs).
    """
    for run in cases.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds * repeats):
        for name, run in cases.items():
            samples[name].append(_round(run, per_round, scale))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    width = max(len(name) for name in cases)
    print(f"{'case':<{width}}  {'median ' + unit:>16}  {'x ' + baseline:>{len(baseline) + 2}}")
    for name, value in medians.items():
        print(f"{name:<{width}}  {value:>16.2f}  {value / medians[baseline]:>{len(baseline) + 2}.3f}")
