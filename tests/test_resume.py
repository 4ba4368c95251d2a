"""A run's state is on disk from its start, and an interrupted run goes on from its checkpoint to the
same result, bit for bit, as a run that was never interrupted: trained parameters, metrics, history
and trace (MLLM with a retain stream, a method cursor and an evaluation curve; SD with a probe trace),
also after kill -9 (in a subprocess) and SIGTERM through the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.numpy import load_file

from knowtrace.cli import main as knowtrace_main
from tests.test_sd_run import tiny_world_sd  # noqa: F401  (fixture)
from tests.test_unlearn_mllm import WORLD, world_dir  # noqa: F401  (fixture)
from unlearn.cli import main
from unlearn.run_mllm import MLLMRun, run_mllm
from unlearn.run_sd import run_sd
from unlearn.runs import Run, evaluate_run, run_dir_lock, run_state
from unlearn.world.source import resolve_model


class InterruptAt:
    """A loop callback that raises KeyboardInterrupt (as Ctrl-C) at the end of ``step``."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, step, logs, state):
        if step == self.step:
            raise KeyboardInterrupt


def assert_same_run(a, b):
    """Trained parameters, metrics, history and every traced variable equal, bit for bit."""
    for sub in ("adapter", "weights"):
        for f in sorted((a / sub).glob("*.safetensors")):
            ta, tb = load_file(f), load_file(b / sub / f.name)
            assert set(ta) == set(tb) and all(np.array_equal(ta[k], tb[k]) for k in ta), f
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    ma, mb = (json.loads((r / "manifest.json").read_text()) for r in (a, b))
    assert ma["history"] == mb["history"] and ma["state"] == mb["state"] == "complete"
    groups = [None] + (["probe"] if (a / "trace.zarr" / "probe").exists() else [])
    for group in groups:
        ta, tb = (xr.open_zarr(r / "trace.zarr", group=group).load() for r in (a, b))
        assert list(ta.step.values) == list(tb.step.values), group
        for name in ta.data_vars:
            assert np.array_equal(ta[name].values, tb[name].values, equal_nan=True), (group, name)


def test_an_interrupted_mllm_run_resumes_to_the_same_result(tmp_path, world_dir, capsys):  # noqa: F811
    # siu: retain batches and a cursor through its targets; eval_every: a curve kept across the break
    kw = dict(steps=5, world_dir=world_dir, world_config=WORLD, progress=False, trace=True, trace_attention=True,
              eval_every=2, checkpoint_every=2)
    run_mllm("vorn", "siu", tmp_path / "whole", **kw)
    out = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):  # after step 4 of 5 (checkpoint after step 2; step 3 traced)
        run_mllm("vorn", "siu", out, callbacks=[InterruptAt(3)], **kw)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["state"] == "interrupted" and manifest["checkpoint_step"] == 1 and run_state(out) == "interrupted"
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()
    assert list(xr.open_zarr(out / "trace.zarr").step.values) == [0, 1, 2]  # more than the checkpoint holds
    with pytest.raises(ValueError, match="not complete: interrupted.*--resume"):
        evaluate_run(out, world_dir=world_dir, world_config=WORLD)
    assert knowtrace_main(["summary", str(out)]) == 0
    assert "the run is not complete (interrupted)" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="--resume"):
        run_mllm("vorn", "siu", out, **kw)
    Run.resumed(out, world_dir, progress=False, world_config=WORLD).run()
    assert_same_run(tmp_path / "whole", out)
    assert json.loads((out / "manifest.json").read_text())["resumed_after_steps"] == [2]
    assert not (out / "checkpoint").exists()  # a complete run needs none
    with pytest.raises(ValueError, match="is complete"):
        Run.resumed(out, world_dir, progress=False, world_config=WORLD).run()


def test_an_interrupted_sd_run_resumes_to_the_same_result(tmp_path, tiny_world_sd):  # noqa: F811
    kw = dict(steps=4, images=2, model=str(tiny_world_sd), eval_seeds=2, fd_seeds=2, retained=["blip"],
              progress=False, trace=True, checkpoint_every=1)
    run_sd("vorn", "fttp", tmp_path / "whole", **kw)
    out = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run_sd("vorn", "fttp", out, callbacks=[InterruptAt(2)], **kw)
    assert run_state(out) == "interrupted"
    Run.resumed(out, progress=False).run()
    assert_same_run(tmp_path / "whole", out)


KILL = """
import os, signal, sys
from pathlib import Path
from tests.test_unlearn_mllm import WORLD
from unlearn.run_mllm import run_mllm

class KillAt:
    def on_step_end(self, step, logs, state):
        if step == 3:
            os.kill(os.getpid(), signal.SIGKILL)

run_mllm("vorn", "graddiff", Path(sys.argv[1]), steps=6, world_dir=Path(sys.argv[2]), world_config=WORLD,
         progress=False, trace=True, checkpoint_every=2, callbacks=[KillAt()])
"""


def test_a_run_killed_with_sigkill_resumes_to_the_same_result(tmp_path, world_dir, capsys):  # noqa: F811
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL, str(out), str(world_dir)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["state"] == "running" and run_state(out) == "interrupted"  # its lock died with it
    assert knowtrace_main(["summary", str(out), "--json"]) == 0  # knowtrace reads the lock too
    assert json.loads(capsys.readouterr().out)["run"]["state"] == "interrupted"
    with run_dir_lock(out):  # a process at work on it: running
        assert knowtrace_main(["summary", str(out), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["run"]["state"] == "running"
    MLLMRun.resumed(out, world_dir, progress=False, world_config=WORLD).run()
    run_mllm("vorn", "graddiff", tmp_path / "whole", steps=6, world_dir=world_dir, world_config=WORLD, progress=False,
             trace=True, checkpoint_every=2)
    assert_same_run(tmp_path / "whole", out)


def test_sigterm_ends_a_cli_run_cleanly_and_resume_finishes_it(tmp_path, world_dir, capsys):  # noqa: F811
    model = resolve_model("world", "mllm", world_dir, WORLD)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "unlearn.cli", "mllm", "--concept", "vorn", "--method", "ga", "--model", str(model),
           "--steps", "400", "--checkpoint-every", "1", "--trace", "--quiet", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # until a checkpoint is on disk
        manifest = out / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text()).get("checkpoint_step") is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["state"] == "interrupted" and manifest["error"] == "SIGTERM"
    done = manifest["checkpoint_step"]
    assert done < 399
    assert main(["mllm", "--resume", str(out), "--steps", "3"]) == 2  # a resumed run keeps its settings
    assert "drop --steps" in capsys.readouterr().err
    assert main(["mllm", "--resume", str(out), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 400 and run_state(out) == "complete"
    assert list(xr.open_zarr(out / "trace.zarr").step.values) == list(range(400))


def test_a_run_stopped_in_its_final_evaluation_keeps_its_training_and_unlearn_eval_finishes_it(
        tmp_path, world_dir, monkeypatch):  # noqa: F811
    kw = dict(steps=2, world_dir=world_dir, world_config=WORLD, progress=False)
    whole = run_mllm("vorn", "ga", tmp_path / "whole", **kw)
    evaluate = MLLMRun.evaluate

    def fails_after_training(self, stage):
        if stage == "unlearned":
            raise RuntimeError("evaluation died")
        return evaluate(self, stage)

    monkeypatch.setattr(MLLMRun, "evaluate", fails_after_training)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation died"):
        run_mllm("vorn", "ga", out, **kw)
    monkeypatch.undo()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["state"] == "trained" and "evaluation died" in manifest["error"]
    assert (out / "adapter").is_dir() and not (out / "metrics.json").exists()
    again = evaluate_run(out, world_dir=world_dir, world_config=WORLD)
    assert run_state(out) == "complete"
    assert json.loads((out / "metrics.json").read_text()) == whole == {**again, "original": whole["original"]}


class BreakTheUNet:
    """A loop callback that makes the model non-finite after the last step (past the loop's own checks)."""

    def on_step_end(self, step, logs, state):
        with torch.no_grad():
            next(p for p in state.model.parameters() if p.ndim > 1).fill_(float("nan"))


def test_a_model_that_generates_nan_images_gets_no_score(tmp_path, tiny_world_sd):  # noqa: F811
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="non-finite images"):
        run_sd("vorn", "ga", out, steps=1, images=2, model=str(tiny_world_sd), eval_seeds=2, fd_seeds=2,
               retained=["blip"], progress=False, callbacks=[BreakTheUNet()])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["state"] == "trained" and "non-finite images" in manifest["error"]
    assert not (out / "metrics.json").exists()
