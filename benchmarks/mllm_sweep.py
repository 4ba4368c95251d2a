"""Sweep world MLLM runs over methods x concepts x seeds x settings; one JSON line per run.

    python benchmarks/mllm_sweep.py --methods ga --concepts oskel grom korvex \
        --grid lr=3e-4,1e-3,3e-3,1e-2 --out runs/sweep-lr

``--grid key=v1,v2`` (repeatable) spans the cross product of settings (training options or method
options, as in ``unlearn mllm key=value``). Finished runs (a line in results.jsonl) are skipped, so
an interrupted sweep resumes. Used for the lr calibration and the FTTP alpha/beta measurement
documented in docs/methods.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from unlearn.run_mllm import run_mllm

KEYS = ("efficacy", "em", "em_identify", "em_yesno", "specificity", "diversity", "K_C", "K_N")


def add_arguments(ap: argparse.ArgumentParser, methods_required: bool = True) -> None:
    ap.add_argument("--methods", nargs="+", required=methods_required)
    ap.add_argument("--concepts", nargs="+", default=["oskel", "grom", "korvex"])  # person, cartoon, logo
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed setting for every run")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--world-dir", type=Path)


def run_sweep(args: argparse.Namespace) -> list[dict]:
    """Every run of the sweep that is not in results.jsonl yet; returns all rows of results.jsonl."""
    fixed = dict(kv.split("=", 1) for kv in args.set)
    axes = [(k, vs.split(",")) for k, vs in (g.split("=", 1) for g in args.grid)]
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = {json.loads(line)["name"] for line in results.read_text().splitlines()} if results.exists() else set()
    for values in itertools.product(*[vs for _, vs in axes]):
        settings = {**fixed, **{k: v for (k, _), v in zip(axes, values)}}
        tag = "-".join(f"{k}{v}" for k, v in settings.items()) or "default"
        for concept, method, seed in itertools.product(args.concepts, args.methods, args.seeds):
            name = f"{concept}-{method}-{tag}-s{seed}"
            if name in done:
                continue
            m = run_mllm(concept, method, args.out / "runs" / name, steps=args.steps, seed=seed, options=settings,
                         world_dir=args.world_dir, progress=False, overwrite=True)
            row = {"name": name, "concept": concept, "method": method, "seed": seed, "steps": args.steps,
                   "settings": settings, **{k: m[k] for k in KEYS}, "original": {k: m["original"][k] for k in KEYS}}
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name}: " + "  ".join(f"{k} {m[k]:.1f}" for k in ("em", "specificity", "diversity")), flush=True)
    return [json.loads(line) for line in results.read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    run_sweep(ap.parse_args())


if __name__ == "__main__":
    main()
