"""A run on disk: ``manifest.json`` (resolved config, seed, versions, git commit, timings),
``metrics.json``, the trained parameters (safetensors), ``samples/``.

Files are written to a temporary name and renamed, so a file is either complete or absent.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path


def versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    from . import __version__

    return {"unlearn": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__}


def git_commit() -> str | None:
    """The toolkit's commit (and "+dirty" with uncommitted changes), or None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def write_json(path: Path, data) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


# what a run writes into its directory; --overwrite removes these (and nothing else) first, so that
# a new run never appends to or mixes with an old one's trace, weights or metrics
RUN_ARTIFACTS = ("manifest.json", "metrics.json", "trace.zarr", "adapter", "weights", "samples", "plots",
                 "report.html", "summary.txt")
RUN_ARTIFACT_PATTERNS = ("eval-*.json",)  # cached re-evaluations (figures/sd_common.py)


_HELD: set[str] = set()  # run directories this process holds the lock of (the lock is re-entrant per process)


@contextlib.contextmanager
def run_dir_lock(out: Path, wait: bool = False, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on run directory ``out`` for a run's duration, so that two processes
    never write one directory (one's ``--overwrite`` or failure clean-up would delete the other's
    files). The lock is ``flock`` on ``.<name>.lock`` beside the directory (beside, so that removing
    the directory cannot drop it); the OS releases it if the process dies. Held elsewhere: an error
    naming the directory, or with ``wait`` block until it is free (figure scripts then reuse the
    finished run). ``enabled=False`` (the non-main processes of a multi-process run): no lock."""
    key = str(Path(out).resolve())
    if not enabled or key in _HELD:
        yield
        return
    path = Path(out).parent / f".{Path(out).name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise RuntimeError(f"run directory {out} is being written by another process (lock {path}); wait for it "
                               f"to finish or choose another --out") from None
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)  # releases the lock


def prepare_run_dir(out: Path, overwrite: bool = False) -> Path:
    """Create the run directory; an existing non-empty one is an error unless ``overwrite``, which
    removes the previous run's files (only the names a run writes: other files are left alone)."""
    import shutil

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"run directory {out} exists and is not empty; choose another --out or pass --overwrite")
        old = [out / name for name in RUN_ARTIFACTS] + [p for pat in RUN_ARTIFACT_PATTERNS for p in out.glob(pat)]
        for path in old:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def split_options(method: str, pairs: dict[str, str], modality: str = "mllm") -> tuple[dict, dict]:
    """key=value pairs -> (TrainConfig fields, the method's options); an unknown method or key is an
    error listing the valid ones (``steps`` and ``seed`` are arguments of a run, not settings)."""
    import dataclasses

    from .loop import TrainConfig
    from .methods.base import method_options, methods_of

    registry = methods_of(modality)
    what = "method" if modality == "mllm" else f"{modality} method"
    if method not in registry:
        raise KeyError(f"unknown {what} {method!r}; {what}s: {', '.join(sorted(registry))}")
    own = method_options(registry[method])
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)} - {"options", "steps", "seed"}
    train, opts = {}, {}
    for k, v in pairs.items():
        if k in own:
            opts[k] = v
        elif k in train_keys:
            train[k] = v
        else:
            raise KeyError(f"unknown option {k!r}; training options: {', '.join(sorted(train_keys))}; "
                           f"options of {what} {method!r}: {', '.join(own) or 'none'}")
    return train, opts
