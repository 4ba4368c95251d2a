"""Benchmark: every MLLM method on 3 world concepts of different kinds at the paper's settings
(LoRA, Adam 3e-4, batch 2, 10 steps, one image), mean +- std over 3 seeds of EM, specificity,
diversity (and K_C, K_N), next to the starting model.

    python benchmarks/mllm_results.py [--concepts oskel grom korvex] [--seeds 0 1 2] [--out runs/bench-mllm]

Writes every run under --out and a summary (results.json, results.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from unlearn.methods import METHODS
from unlearn.run_mllm import run_mllm

KEYS = ("em", "specificity", "diversity", "efficacy", "K_C", "K_N")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", nargs="+", default=["oskel", "grom", "korvex"])  # person, cartoon, logo
    ap.add_argument("--methods", nargs="+", default=sorted(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-mllm"))
    ap.add_argument("--world-dir", type=Path)
    args = ap.parse_args()
    rows = {}
    for concept in args.concepts:
        for method in args.methods:
            runs = []
            for seed in args.seeds:
                m = run_mllm(concept, method, args.out / f"{concept}-{method}-s{seed}", steps=args.steps, seed=seed,
                             world_dir=args.world_dir, progress=False, overwrite=True)
                runs.append(m)
                print(f"{concept:8s} {method:12s} seed {seed}: " + "  ".join(f"{k} {m[k]:.1f}" for k in KEYS[:3]),
                      flush=True)
            rows[f"{concept}/{method}"] = {
                **{k: [float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs]))] for k in KEYS},
                "original": {k: runs[0]["original"][k] for k in KEYS},
            }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = ["| concept | method | EM | specificity | diversity | K_C | K_N |", "|---|---|---|---|---|---|---|"]
    for concept in args.concepts:
        o = rows[f"{concept}/{args.methods[0]}"]["original"]
        lines.append(f"| {concept} | (original) | {o['em']:.1f} | {o['specificity']:.1f} | {o['diversity']:.1f} | "
                     f"{o['K_C']:.3g} | {o['K_N']:.3g} |")
        for method in args.methods:
            r = rows[f"{concept}/{method}"]
            lines.append(f"| {concept} | {method} | " + " | ".join(
                f"{r[k][0]:.1f} ± {r[k][1]:.1f}" for k in ("em", "specificity", "diversity")) +
                f" | {r['K_C'][0]:.3g} | {r['K_N'][0]:.3g} |")
    table = "\n".join(lines)
    (args.out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
