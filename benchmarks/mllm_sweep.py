"""Sweep world MLLM runs over methods x concepts x seeds x settings; one JSON line per run.

    python benchmarks/mllm_sweep.py --methods ga --concepts oskel grom korvex \
        --grid lr=3e-4,1e-3,3e-3,1e-2 --out runs/sweep-lr

``--grid key=v1,v2`` (repeatable) spans the cross product of settings (training options or method
options, as in ``unlearn mllm key=value``); ``--set key=value`` fixes one for every run. Finished runs
(a line in results.jsonl) are skipped, so an interrupted sweep resumes. Used for the lr calibration
and the FTTP alpha/beta measurement documented in docs/methods.md. The machinery is unlearn.sweep.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unlearn.sweep import Sweep, run_sweep


def add_arguments(ap: argparse.ArgumentParser, methods_required: bool = True) -> None:
    ap.add_argument("--methods", nargs="+", required=methods_required)
    ap.add_argument("--concepts", nargs="+", default=["oskel", "grom", "korvex"])  # person, cartoon, logo
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed setting for every run")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--world-dir", type=Path)


def sweep_of(args: argparse.Namespace) -> Sweep:
    return Sweep(args.out, args.methods, args.concepts, args.seeds, args.steps,
                 grid={k: vs.split(",") for k, vs in (g.split("=", 1) for g in args.grid)},
                 fixed=dict(kv.split("=", 1) for kv in args.set), world_dir=args.world_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    run_sweep(sweep_of(ap.parse_args()))


if __name__ == "__main__":
    main()
