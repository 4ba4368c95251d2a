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

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from mllm_sweep import add_arguments, run_sweep  # noqa: E402

from unlearn.methods import METHODS  # noqa: E402

KEYS = ("em", "specificity", "diversity", "efficacy", "K_C", "K_N")


def summarise(rows: list[dict], concepts, methods) -> tuple[dict, str]:
    table, lines = {}, ["| concept | method | EM | specificity | diversity | efficacy | K_C | K_N |",
                        "|---|---|---|---|---|---|---|---|"]
    for concept in concepts:
        mine = [r for r in rows if r["concept"] == concept]
        o = mine[0]["original"]
        lines.append(f"| {concept} | (original) | {o['em']:.1f} | {o['specificity']:.1f} | {o['diversity']:.1f} | "
                     f"{o['efficacy']:.1f} | {o['K_C']:.3g} | {o['K_N']:.3g} |")
        for method in methods:
            runs = [r for r in mine if r["method"] == method]
            stats = {k: [float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs]))] for k in KEYS}
            table[f"{concept}/{method}"] = {**stats, "seeds": [r["seed"] for r in runs], "original": o}
            lines.append(f"| {concept} | {method} | " + " | ".join(
                f"{stats[k][0]:.1f} ± {stats[k][1]:.1f}" for k in ("em", "specificity", "diversity", "efficacy"))
                + f" | {stats['K_C'][0]:.3g} | {stats['K_N'][0]:.3g} |")
    return table, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, methods_required=False)
    ap.set_defaults(seeds=[0, 1, 2])
    args = ap.parse_args()
    args.methods = args.methods or sorted(METHODS)
    rows = [r for r in run_sweep(args) if r["method"] in args.methods and r["concept"] in args.concepts]
    table, text = summarise(rows, args.concepts, args.methods)
    settings = {"steps": args.steps, "seeds": args.seeds, "set": args.set}
    (args.out / "results.json").write_text(json.dumps({"settings": settings, "results": table}, indent=1))
    (args.out / "results.md").write_text(f"settings: {json.dumps(settings)}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
