"""Training checkpoints: everything the loop needs to go on from a finished step exactly as if it had
never stopped, written atomically into ``RUN/checkpoint/``.

- ``trained.safetensors``: the trained parameters by name (the LoRA adapters, or the fine-tuned tensors)
- ``state.pt``: the optimizer's state and every random stream (torch CPU and CUDA, the loop's noise
  generator), tensors only: read back with ``torch.load(weights_only=True)``
- ``progress.json``: the step, the loop's history, the retain batches drawn so far, the method's own
  position (:attr:`Method.resume_state`), the callbacks' state (``state_dict()``), and the Python and
  NumPy random states

A new checkpoint is written beside the old one and swapped in by renames, so a kill at any moment
leaves one complete checkpoint (the old or the new).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint"


@dataclass
class Checkpoint:
    step: int  # the last finished step
    trained: dict[str, torch.Tensor]
    optimizer: dict
    generator: torch.Tensor
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]
    progress: dict  # history, retain_drawn, method, callbacks, python_rng, numpy_rng


def save_checkpoint(run: Path, ck: Checkpoint) -> Path:
    from safetensors.torch import save_file

    final = Path(run) / CHECKPOINT
    partial, old = final.with_name(f".{CHECKPOINT}.partial"), final.with_name(f".{CHECKPOINT}.old")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({n: t.detach().contiguous().cpu() for n, t in ck.trained.items()}, partial / "trained.safetensors")
    torch.save(on_host({"optimizer": ck.optimizer, "generator": ck.generator, "torch_rng": ck.torch_rng,
                        "cuda_rng": ck.cuda_rng}), partial / "state.pt")
    (partial / "progress.json").write_text(json.dumps({"step": ck.step, **ck.progress}, allow_nan=False))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def on_host(obj):
    """``obj`` with every tensor in its dicts, lists and tuples copied to the CPU: a checkpoint names no
    device (the optimizer puts its state back on its parameters' device when it loads it)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_host(v) for v in obj)
    return obj


def find_checkpoint(run: Path) -> Path | None:
    """The run's complete checkpoint (the new one, or the old one when a kill came between the renames)."""
    for path in (Path(run) / CHECKPOINT, Path(run) / f".{CHECKPOINT}.old"):
        if (path / "progress.json").exists():
            return path
    return None


def load_checkpoint(path: Path, device) -> Checkpoint:
    from safetensors.torch import load_file

    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    progress = json.loads((path / "progress.json").read_text())
    return Checkpoint(progress.pop("step"), load_file(path / "trained.safetensors", device=str(device)),
                      state["optimizer"], state["generator"], state["torch_rng"], state["cuda_rng"], progress)


def random_states() -> dict:
    """The Python and NumPy random states as JSON."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python_rng": [version, list(internal), gauss],
            "numpy_rng": [kind, keys.tolist(), pos, has_gauss, cached]}


def set_random_states(progress: dict) -> None:
    version, internal, gauss = progress["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = progress["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
