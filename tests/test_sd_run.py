"""`unlearn sd` / run_sd end to end on a tiny trained world SD: the run directory, the metrics'
keys, trained parameters that load back, and bad input that stops the run before anything is written.
Plus one behaviour check on the cached world SD: a few FTTP steps lower the concept's K_C while
K_N stays near."""

import json
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.test_world_sd import TINY_SD
from unlearn.cli import main
from unlearn.run_sd import load_run, run_sd
from unlearn.world.records import world_sd_data
from unlearn.world.sd import train_sd

FAST = ["--eval-seeds", "2", "--fd-seeds", "2", "--retained", "blip", "korvex", "--quiet"]


@pytest.fixture(scope="module")
def tiny_world_sd(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_sd")
    train_sd(TINY_SD, out, progress=False)
    return out


def test_cli_run_directory_and_metrics(tiny_world_sd, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["sd", "--concept", "vorn", "--method", "fttp", "--steps", "2", "--images", "2", "--model", str(tiny_world_sd),
               "--out", str(out), *FAST, "lr=1e-3", "alpha=0.9"])
    assert rc == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    for part in (metrics, metrics["original"]):
        assert {"ua", "fd", "fd_space", "K_C", "K_N"} <= set(part)
        assert 0 <= part["ua"] <= 100 and 0 < part["K_C"] <= 1 and 0 < part["K_N"] <= 1
    assert metrics["steps"] == 2 and metrics["images"] == 2 and metrics["fd_space"] == "world-classifier-features"
    assert printed["ua"] == metrics["ua"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "sd" and manifest["method_options"]["alpha"] == 0.9 and manifest["train"]["lr"] == 1e-3
    assert manifest["train"]["lora"] is False and manifest["train"]["batch_size"] == 2 and len(manifest["history"]) == 2
    assert len(list((out / "samples").glob("original_vorn_*.png"))) == 4
    assert len(list((out / "samples").glob("unlearned_vorn_*.png"))) == 4
    # the trained UNet tensors, and they load back onto the starting pipeline
    saved = load_file(out / "weights" / "unet.safetensors")
    adapter, _ = load_run(out)
    state = adapter.model.state_dict()
    fresh = load_run(out)[0].pipe.unet.state_dict()
    for k, v in saved.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
        torch.testing.assert_close(fresh[k], v, rtol=0, atol=0)


def test_unknown_method_or_option_lists_the_valid_ones(tmp_path, capsys):
    assert main(["sd", "--concept", "vorn", "--method", "siu", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "siu" in err and "esd_x" in err and "fmn" in err
    assert main(["sd", "--concept", "vorn", "--method", "fttp", "--out", str(tmp_path / "b"), "--quiet", "gamma=1"]) == 2
    err = capsys.readouterr().err
    assert "gamma" in err and "alpha" in err and "lr" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_records_write_nothing(tiny_world_sd, tmp_path):
    forget, retain = world_sd_data("vorn", 2, 32, n_retain=0, n_surrogate=0)
    bad = {
        "missing image": ([replace(forget[0], image=tmp_path / "nope.png")], FileNotFoundError, "nope.png"),
        "prompt without the concept": ([replace(forget[0], prompt="a picture of Blip")], ValueError, "does not name"),
        "mask of the wrong size": ([replace(forget[0], mask=np.ones((8, 8), bool))], ValueError, "give a mask of the image's size"),
        "empty mask": ([replace(forget[0], mask=np.zeros((32, 32), bool))], ValueError, "empty"),
    }
    for what, (records, error, message) in bad.items():
        out = tmp_path / what.replace(" ", "_")
        with pytest.raises(error, match=message):
            run_sd("vorn", "fttp", out, steps=1, model=str(tiny_world_sd), forget=records, progress=False)
        assert not out.exists(), what
    with pytest.raises(ValueError, match="needs retain records"):
        run_sd("vorn", "salun", tmp_path / "r", steps=1, model=str(tiny_world_sd), forget=forget, retain=[], progress=False)
    assert not (tmp_path / "r").exists()


def test_fttp_on_the_world_lowers_concept_knowledge_only():
    """Cached world SD, 5 FTTP steps (lr 1e-4, full UNet) on 4 images of Vorn: K_C on the forget images falls
    clearly, K_N stays near (fixed noise and timesteps, :func:`unlearn.eval.sd.forget_knowledge`)."""
    from unlearn.eval.sd import forget_knowledge
    from unlearn.loop import TrainConfig, run_loop
    from unlearn.methods import get_method
    from unlearn.models.sd import load_sd_adapter
    from unlearn.world.concepts import BY_KEY
    from unlearn.world.source import resolve_model

    a = load_sd_adapter(resolve_model("world", "sd"))
    forget, _ = world_sd_data("vorn", 4, a.resolution)
    before = forget_knowledge(a.pipe, forget, adapter=a)
    c = BY_KEY["vorn"]
    run_loop(a, get_method("fttp", modality="sd"), forget, [], TrainConfig(steps=5, lr=1e-4, lora=False, batch_size=2),
             c.key, c.names, progress=False)
    after = forget_knowledge(a.pipe, forget, adapter=a)
    drop_c = 1 - after["K_C"] / before["K_C"]
    drop_n = 1 - after["K_N"] / before["K_N"]
    assert drop_c > 0.05 and abs(drop_n) < drop_c / 3, (before, after)


@pytest.mark.slow  # two processes start and each loads torch/diffusers: about a minute on 2 cores
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher is not on PATH")
# one method: FMN, whose attention hooks sit inside the DDP-wrapped UNet, goes through everything FTTP's
# two-process run did (DDP, the loop's gathered logs, saving, evaluation); FTTP's took 85 s more of CI's 40 min
@pytest.mark.parametrize("method", ["fmn"])
def test_two_cpu_processes(tiny_world_sd, tmp_path, method):
    out = tmp_path / "run"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "unlearn.cli", "sd", "--concept", "vorn", "--method", method, "--steps", "2",
           "--images", "2", "--model", str(tiny_world_sd), "--out", str(out), *FAST, "batch_size=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and len(manifest["history"]) == 2
    assert (out / "weights" / "unet.safetensors").exists() and "ua" in json.loads((out / "metrics.json").read_text())


def test_lora_run_saves_and_loads_the_adapter(tiny_world_sd, tmp_path):
    out = tmp_path / "lora"
    run_sd("vorn", "esd_x", out, steps=2, images=2, model=str(tiny_world_sd), eval_seeds=1, fd_seeds=2,
           retained=["blip", "korvex"], options={"lora": "true", "lr": "1e-2"}, progress=False)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert saved and all(".attn2." in k for k in saved)  # ESD-x: LoRA on the cross-attention only
    assert not (out / "weights").exists()
    adapter, manifest = load_run(out)
    assert manifest["train"]["lora"] is True
    state = adapter.model.state_dict()
    for k, v in saved.items():
        match = [s for s in state if s.replace(".default", "") == k]
        assert len(match) == 1 and torch.equal(state[match[0]], v), k
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained away from the zero init
