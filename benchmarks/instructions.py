"""The LangChain and LangGraph overhead benchmarks counted in CPU instructions (valgrind's callgrind).

    python benchmarks/instructions.py            # about 5 minutes on 2 cores; needs valgrind

Wall clock on a shared VM moves with the load; an instruction count does not. Each case runs
in a child process under callgrind twice, with 0 and with N timed calls after the same warm-up,
and the difference divided by N is what one call costs, imports and setup cancelled out.
Address-space randomisation is turned off (``setarch -R``) where available; a few thousand
instructions of noise per call remain (a background thread, garbage-collection timing).
Instructions are not time: our code also misses the CPU caches more per instruction than
LangChain's does, so the wall-clock ratios of the two timed benchmarks are higher.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (benchmark module, baseline case, timed calls, warm-up calls)
SUITES = [
    ("langchain_overhead", "UsageMetadataCallbackHandler", 2000, 200),
    ("langgraph_overhead", "plain graph", 50, 20),
]


def child(module: str, case: str, calls: int, warmup: int) -> None:
    sys.path.insert(0, str(HERE))
    runs, _ = importlib.import_module(module).cases()
    run = runs[case]
    for _ in range(warmup + calls):
        run()


def count(module: str, case: str, calls: int, warmup: int) -> int:
    """Instructions callgrind counts for the whole child process."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
               "--child", module, case, str(calls), str(warmup)]  # fmt: skip
    if shutil.which("setarch"):
        command = ["setarch", "-R", *command]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    found = re.search(r"refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    jobs = [
        (module, case, calls, warmup, n)
        for module, _, calls, warmup in SUITES
        for case in importlib.import_module(module).cases()[0]
        for n in (0, calls)
    ]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        counted = dict(zip(jobs, pool.map(lambda job: count(*job[:2], job[4], job[3]), jobs), strict=True))
    for module, baseline, calls, warmup in SUITES:
        per_call = {
            case: (counted[(module, case, calls, warmup, calls)] - counted[(module, case, calls, warmup, 0)]) / calls
            for case in importlib.import_module(module).cases()[0]
        }
        print(f"{module}: instructions per call ({calls} calls after {warmup})")
        width = max(map(len, per_call))
        for case, value in per_call.items():
            print(f"  {case:<{width}}  {value:>14,.0f}  {value / per_call[baseline]:.3f}x {baseline}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.path.insert(0, str(HERE))
        main()
