"""Benchmark: build the default world from scratch, time each component, time a cached load, and
print the gate figures with the issue's budgets (MLLM <= 5 min, SD <= 15 min on 2 CPU cores).

    python benchmarks/world_build.py [--out DIR] [--keep]

Builds into a fresh temporary directory unless --out names one (an existing complete cache there is
reused, so timings then report the cached load).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from unlearn.world.build import COMPONENTS, build_info, build_world, check_world

BUDGET_SECONDS = {"mllm": 5 * 60, "sd": 15 * 60}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the temporary world directory")
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="world-bench-"))
    print(f"world: {root}  torch threads: {torch.get_num_threads()}")
    start = time.perf_counter()
    paths = build_world(root, progress=True)
    first = time.perf_counter() - start
    start = time.perf_counter()
    build_world(root, progress=False)
    cached = time.perf_counter() - start
    report = check_world(root, progress=False)
    rows = []
    for name in COMPONENTS:
        seconds = build_info(paths[name])["build_seconds"]
        budget = BUDGET_SECONDS.get(name)
        ratio = f"{seconds / budget:.2f} of budget" if budget else ""
        rows.append(f"  {name:10s} build {seconds:7.1f} s  {ratio}  gate {'PASS' if report[name]['pass'] else 'FAIL'}")
    print("\n".join(["component build times (measured when built):", *rows]))
    print(f"first build_world call: {first:.1f} s; second (cached, verified) call: {cached:.2f} s")
    print(json.dumps({k: report[k] for k in ("mllm", "classifier", "sd")}, indent=1))
    if not (args.out or args.keep):
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
