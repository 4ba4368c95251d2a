"""Benchmark: every MLLM method on 3 world concepts of different kinds, mean +- std over 3 seeds of
EM, specificity and diversity (and efficacy, K_C, K_N), next to the starting model.

    python benchmarks/mllm_results.py --out runs/bench-mllm-paper                 # paper settings: LoRA, Adam 3e-4, batch 2, 10 steps, 1 image
    python benchmarks/mllm_results.py --set lr=3e-3 --out runs/bench-mllm-lr3e-3  # the world's calibrated lr (docs/methods.md)

Runs are resumable (results.jsonl); writes results.md (the table) and results.json (the numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from mllm_sweep import add_arguments, sweep_of  # noqa: E402

from unlearn.methods import METHODS  # noqa: E402
from unlearn.sweep import run_sweep, summarise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, methods_required=False)
    ap.set_defaults(seeds=[0, 1, 2])
    args = ap.parse_args()
    args.methods = args.methods or sorted(METHODS)
    rows = [r for r in run_sweep(sweep_of(args)) if r["method"] in args.methods and r["concept"] in args.concepts]
    table, text = summarise(rows, args.concepts, args.methods)
    settings = {"steps": args.steps, "seeds": args.seeds, "set": args.set}
    (args.out / "results.json").write_text(json.dumps({"settings": settings, "results": table}, indent=1))
    (args.out / "results.md").write_text(f"settings: {json.dumps(settings)}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
