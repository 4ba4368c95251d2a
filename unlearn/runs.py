"""A run on disk: ``manifest.json`` (resolved config, seed, versions, git commit, timings),
``metrics.json``, the trained parameters (safetensors), ``samples/``.

Files are written to a temporary name and renamed, so a file is either complete or absent.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
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


def prepare_run_dir(out: Path, overwrite: bool = False) -> Path:
    """Create the run directory; an existing non-empty one is an error unless ``overwrite``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"run directory {out} exists and is not empty; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out
