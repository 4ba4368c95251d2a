"""What the SD figure scripts share: finding or running a world SD run (resumable), and its metrics at
the evaluation settings a figure asks for (re-evaluating a saved run instead of retraining it).

Import after ``common`` (which puts the checkout on ``sys.path``).
"""

from __future__ import annotations

import json
from pathlib import Path

from unlearn.run_sd import WORLD_LR
from unlearn.runs import run_dir_lock
from unlearn.world.concepts import CONCEPTS


def object_concepts(exclude: str) -> list[str]:
    """The world's non-style concepts other than ``exclude``: the retained set of the SD figures' FD
    (as in benchmarks/sd_results.py; styles are whole-image concepts)."""
    return [c.key for c in CONCEPTS if c.kind != "style" and c.key != exclude]


def sd_run(runs: Path, concept: str, method: str, steps: int = 20, images: int = 5, lr: float = WORLD_LR,
           seed: int = 0, eval_seeds: int = 20, fd_seeds: int = 5, trace: bool = False, world_dir=None,
           progress: bool = True) -> tuple[Path, dict]:
    """(run directory, metrics) of a world SD run with these training settings, run now if not saved.

    The FD's retained concepts are the other non-style concepts. A saved run evaluated with other
    ``eval_seeds`` / ``fd_seeds`` is re-evaluated (not retrained): the metrics are cached in the run
    as ``eval-ua<N>-fd<M>.json``.
    """
    run = Path(runs) / f"sd-{concept}-{method}-{steps}steps-{images}img-lr{lr:g}-s{seed}"
    with run_dir_lock(run, wait=True):  # another figure script making this run: wait for it, then reuse it
        return _sd_run(run, concept, method, steps, images, lr, seed, eval_seeds, fd_seeds, trace, world_dir, progress)


def _sd_run(run, concept, method, steps, images, lr, seed, eval_seeds, fd_seeds, trace, world_dir, progress):
    from unlearn.run_sd import evaluate_run, run_sd
    from unlearn.runs import run_state, write_json

    manifest, metrics_path = run / "manifest.json", run / "metrics.json"
    done = manifest.exists() and metrics_path.exists() and (not trace or (run / "trace.zarr").exists()) \
        and run_state(run) == "complete"
    if done:
        m = json.loads(manifest.read_text())
        done = (m["train"]["steps"] == steps and m["train"]["lr"] == lr and m["seed"] == seed and m["images"] == images
                and m["method"] == method)
    if not done:
        metrics = run_sd(concept, method, run, steps=steps, seed=seed, images=images, options={"lr": lr},
                         eval_seeds=eval_seeds, fd_seeds=fd_seeds, retained=object_concepts(concept), trace=trace,
                         world_dir=world_dir, progress=progress, overwrite=True)
        return run, metrics
    settings = json.loads(manifest.read_text()).get("eval", {})
    if settings.get("eval_seeds") == eval_seeds and settings.get("fd_seeds") == fd_seeds:
        return run, json.loads(metrics_path.read_text())
    cached = run / f"eval-ua{eval_seeds}-fd{fd_seeds}.json"
    if cached.exists():
        return run, json.loads(cached.read_text())
    metrics = evaluate_run(run, world_dir=world_dir, eval_seeds=eval_seeds, fd_seeds=fd_seeds)
    write_json(cached, metrics)  # atomic: no half-written cache file
    return run, metrics
