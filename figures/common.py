"""What every figure script shares: arguments, finding or running the runs it reads, saving.

Each script reads saved runs under ``--runs`` (default runs/figures) and runs what is missing (on the
world by default), then writes ``--out``/<name>.html (interactive, offline) and <name>.png (kaleido;
``--no-png`` to skip) plus <name>.json with the numbers drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python figures/figN.py` from a checkout

from unlearn.run_mllm import WORLD_LR  # noqa: E402  (the figures' default lr: the world's calibrated one)


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("runs/figures"), help="saved runs (read, and written when missing)")
    ap.add_argument("--out", type=Path, default=Path("figures/out"), help="where the figure files go")
    ap.add_argument("--world-dir", type=Path, help="world cache directory")
    ap.add_argument("--no-png", action="store_true", help="HTML only (no Chromium needed)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def mllm_run(runs: Path, concept: str, method: str, steps: int = 10, lr: float = WORLD_LR, seed: int = 0,
             attention: bool = False, world_dir=None, progress: bool = True) -> Path:
    """The run directory of a traced world MLLM run, run now if it is not saved with these settings."""
    from unlearn.run_mllm import run_mllm
    from unlearn.runs import run_dir_lock, run_state

    run = Path(runs) / f"mllm-{concept}-{method}-{steps}steps-lr{lr:g}-s{seed}{'-attn' if attention else ''}"
    manifest = run / "manifest.json"
    with run_dir_lock(run, wait=True):  # another figure script making this run: wait for it, then reuse it
        if manifest.exists() and (run / "trace.zarr").exists() and run_state(run) == "complete":
            m = json.loads(manifest.read_text())
            if m["train"]["steps"] == steps and m["train"]["lr"] == lr and m["seed"] == seed:
                return run
        run_mllm(concept, method, run, steps=steps, seed=seed, options={"lr": lr}, trace=True,
                 trace_attention=attention, world_dir=world_dir, progress=progress, overwrite=True)
    return run


def sd_run(runs: Path, concept: str, method: str, steps: int, images: int, lr: float, seed: int = 0,
           eval_seeds: int = 20, fd_seeds: int = 5, world_dir=None, progress: bool = True) -> Path:
    """The run directory of a world SD run, run now if it is not saved with these settings."""
    from unlearn.run_sd import run_sd
    from unlearn.runs import run_dir_lock, run_state

    run = Path(runs) / f"sd-{concept}-{method}-{steps}steps-{images}img-lr{lr:g}-s{seed}"
    manifest = run / "manifest.json"
    with run_dir_lock(run, wait=True):
        if manifest.exists() and run_state(run) == "complete":
            m = json.loads(manifest.read_text())
            if m["train"]["steps"] == steps and m["train"]["lr"] == lr and m["seed"] == seed and m["images"] == images:
                return run
        run_sd(concept, method, run, steps=steps, images=images, seed=seed, options={"lr": lr}, eval_seeds=eval_seeds,
               fd_seeds=fd_seeds, world_dir=world_dir, progress=progress, overwrite=True)
    return run


def audited(run: Path, options: dict, retain_model, world_dir):
    """(the run's audit dataset, its audit.json), audited now unless RUN/audit holds one made with these
    options and this retain model ("none", a directory, or None: the world's)."""
    import xarray as xr

    from unlearn.audit.run import run_audit

    report = run / "audit" / "audit.json"
    same = report.exists() and json.loads(report.read_text()).get("options") == options and \
        json.loads(report.read_text()).get("retain_model") == (None if retain_model == "none" else
                                                               str(retain_model or "world"))
    if not same:
        run_audit(run, options=options, retain_model=retain_model, overwrite=True, world_dir=world_dir,
                  progress=False)
    with xr.open_dataset(run / "audit" / "audit.nc", engine="h5netcdf") as ds:
        return ds.load(), json.loads(report.read_text())


def probe_args(doc: str) -> argparse.Namespace:
    """The arguments of a figure drawn from the probe traces of world MLLM runs (Figs. 2, 3, 8)."""
    ap = parser(doc)
    ap.add_argument("--concept", default="grom")
    ap.add_argument("--steps", type=int, default=10)
    return ap.parse_args()


def probe_trace(args, method: str):
    """The probe trace (the training image's questions, step -1 = before training) of the world MLLM
    run of ``args.concept`` x ``method`` x ``args.steps``, run now if not saved."""
    import knowtrace

    run = mllm_run(args.runs, args.concept, method, args.steps, attention=True, world_dir=args.world_dir,
                   progress=not args.quiet)
    return knowtrace.open_probe_trace(run / "trace.zarr")


def save(figures: dict, out: Path, png: bool = True, numbers: dict | None = None) -> list[Path]:
    """Write each figure as out/<name>.html (and .png), and the numbers as out/<name>.json."""
    from knowtrace.plots import save as save_figures

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, fig in figures.items():
        files[out / f"{name}.html"] = fig
        if png:
            files[out / f"{name}.png"] = fig
    written = save_figures(files)
    for name, data in (numbers or {}).items():
        (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=float))
        written.append(out / f"{name}.json")
    for path in written:
        print(path)
    return written
