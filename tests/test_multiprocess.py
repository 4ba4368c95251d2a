"""The MLLM loop under `accelerate launch` with 2 CPU processes: one run directory, metrics gathered
on the main process, the same trained adapter on both processes."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.test_world_mllm import TINY
from unlearn.world.mllm import train_mllm


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher is not on PATH")
def test_two_cpu_processes(tmp_path):
    world = tmp_path / "world_mllm"
    train_mllm(TINY, world, progress=False)
    out = tmp_path / "run"
    # accelerate 1.x starts several processes through torchrun only with --multi_gpu; without CUDA the
    # loop puts them on the CPU (gloo). ("--cpu" would start a single process.)
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "unlearn.cli", "mllm", "--concept", "vorn", "--method", "fttp",
           "--steps", "2", "--model", str(world), "--out", str(out), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and len(manifest["history"]) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "em" in metrics and "em" in metrics["original"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert sys.executable  # the launcher used this environment's python
