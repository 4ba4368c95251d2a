"""Many world runs: MLLM methods x concepts x seeds x settings (:class:`Sweep`), or SD methods x concepts x
seeds at the SD benchmark's budgets (:class:`SDSweep`); one JSON line per finished run (``results.jsonl``),
resumable; and the mean +- std table over seeds. Used by the benchmarks (benchmarks/mllm_sweep.py,
mllm_results.py, audit_results.py), Table 1 and ``unlearn claims``."""

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


SD_KEYS = ("ua", "fd", "K_C", "K_N", "retained_mean")
# SD budgets (steps, images), the SD benchmark's (benchmarks/sd_results.py, docs/sd.md): the paper's relative budget
# scaled to the world; the baselines the paper ran 1000 steps on 900 images get 100 steps on 20 images
SD_FAST = (20, 5)
SD_BASELINE = (100, 20)
SD_BASELINES = ("esd_x", "esd_u", "salun", "sa")


def sd_budget(method: str) -> tuple[int, int]:
    """(steps, images) of an SD method in the benchmarks."""
    return SD_BASELINE if method in SD_BASELINES else SD_FAST


@dataclass
class SDSweep:
    out: Path
    methods: list[str]
    concepts: list[str] = field(default_factory=lambda: ["oskel", "grom", "korvex"])
    seeds: list[int] = field(default_factory=lambda: [0])
    lr: float = 3e-5  # the world SD's (unlearn.run_sd.WORLD_LR)
    eval_seeds: int = 20
    fd_seeds: int = 5
    world_dir: Path | None = None
    progress: bool = False


def run_sd_sweep(sweep: SDSweep) -> list[dict]:
    """Every world SD run (``out/runs/<concept>-<method>-s<seed>``) not in ``out/results.jsonl`` yet, each at
    its method's :func:`sd_budget`; returns all its rows."""
    from .run_sd import run_sd

    out = Path(sweep.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {json.loads(line)["name"] for line in results.read_text().splitlines()} if results.exists() else set()
    for concept, method, seed in itertools.product(sweep.concepts, sweep.methods, sweep.seeds):
        name = f"{concept}-{method}-s{seed}"
        if name in done:
            continue
        steps, images = sd_budget(method)
        m = run_sd(concept, method, out / "runs" / name, steps=steps, images=images, seed=seed, options={"lr": sweep.lr},
                   eval_seeds=sweep.eval_seeds, fd_seeds=sweep.fd_seeds, world_dir=sweep.world_dir,
                   progress=sweep.progress, overwrite=True)
        row = {"name": name, "concept": concept, "method": method, "seed": seed, "steps": steps, "images": images,
               "lr": sweep.lr, **{k: m[k] for k in SD_KEYS}, "original": {k: m["original"][k] for k in SD_KEYS}}
        with results.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        print(f"{name}: UA {m['ua']:.0f} (original {m['original']['ua']:.0f}), retained {m['retained_mean']:.0f}",
              flush=True)
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
