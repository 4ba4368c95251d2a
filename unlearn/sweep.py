"""Many world MLLM runs: methods x concepts x seeds x settings, one JSON line per finished run
(``results.jsonl``), resumable; and the mean +- std table over seeds. Used by the benchmarks
(benchmarks/mllm_sweep.py, mllm_results.py), Table 1 and ``unlearn claims``."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KEYS = ("efficacy", "em", "em_identify", "em_yesno", "specificity", "diversity", "K_C", "K_N")
TABLE_KEYS = ("em", "specificity", "diversity", "efficacy", "K_C", "K_N")


@dataclass
class Sweep:
    out: Path
    methods: list[str]
    concepts: list[str] = field(default_factory=lambda: ["oskel", "grom", "korvex"])  # person, cartoon, logo
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 10
    grid: dict[str, list[str]] = field(default_factory=dict)  # key -> values: the cross product is swept
    fixed: dict[str, str] = field(default_factory=dict)  # settings of every run
    world_dir: Path | None = None
    progress: bool = False


def run_sweep(sweep: Sweep) -> list[dict]:
    """Every run not in ``out/results.jsonl`` yet; returns all its rows."""
    from .run_mllm import run_mllm

    out = Path(sweep.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {json.loads(line)["name"] for line in results.read_text().splitlines()} if results.exists() else set()
    axes = list(sweep.grid.items())
    for values in itertools.product(*[vs for _, vs in axes]):
        settings = {**sweep.fixed, **{k: v for (k, _), v in zip(axes, values)}}
        tag = "-".join(f"{k}{v}" for k, v in settings.items()) or "default"
        for concept, method, seed in itertools.product(sweep.concepts, sweep.methods, sweep.seeds):
            name = f"{concept}-{method}-{tag}-s{seed}"
            if name in done:
                continue
            m = run_mllm(concept, method, out / "runs" / name, steps=sweep.steps, seed=seed, options=settings,
                         world_dir=sweep.world_dir, progress=sweep.progress, overwrite=True)
            row = {"name": name, "concept": concept, "method": method, "seed": seed, "steps": sweep.steps,
                   "settings": settings, **{k: m[k] for k in KEYS}, "original": {k: m["original"][k] for k in KEYS}}
            with results.open("a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
            print(f"{name}: " + "  ".join(f"{k} {m[k]:.1f}" for k in ("em", "specificity", "diversity")), flush=True)
    return [json.loads(line) for line in results.read_text().splitlines()]


def summarise(rows: list[dict], concepts, methods) -> tuple[dict, str]:
    """Mean and std over seeds per concept and method (and the starting model), and a markdown table."""
    table, lines = {}, ["| concept | method | EM | specificity | diversity | efficacy | K_C | K_N |",
                        "|---|---|---|---|---|---|---|---|"]
    for concept in concepts:
        mine = [r for r in rows if r["concept"] == concept]
        if not mine:
            raise ValueError(f"no runs of concept {concept!r} in the sweep")
        o = mine[0]["original"]
        lines.append(f"| {concept} | (original) | {o['em']:.1f} | {o['specificity']:.1f} | {o['diversity']:.1f} | "
                     f"{o['efficacy']:.1f} | {o['K_C']:.3g} | {o['K_N']:.3g} |")
        for method in methods:
            runs = [r for r in mine if r["method"] == method]
            if not runs:
                raise ValueError(f"no runs of method {method!r} on {concept!r} in the sweep")
            stats = {k: [float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs]))] for k in TABLE_KEYS}
            table[f"{concept}/{method}"] = {**stats, "seeds": [r["seed"] for r in runs], "original": o}
            lines.append(f"| {concept} | {method} | " + " | ".join(
                f"{stats[k][0]:.1f} ± {stats[k][1]:.1f}" for k in ("em", "specificity", "diversity", "efficacy"))
                + f" | {stats['K_C'][0]:.3g} | {stats['K_N'][0]:.3g} |")
    return table, "\n".join(lines)
