"""The `unlearn` console script."""

import shutil
import subprocess
import sys

import pytest

from unlearn.cli import main


def test_console_script_help():
    exe = shutil.which("unlearn")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "unlearn.cli", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "world" in out and "usage: unlearn" in out


def test_world_help_lists_actions(capsys):
    with pytest.raises(SystemExit) as e:
        main(["world", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(a in out for a in ("build", "check", "concepts"))


def test_concepts_listing(capsys):
    assert main(["world", "concepts"]) == 0
    out = capsys.readouterr().out
    assert "Oskel Brin Tavo" in out and "3 tokens" in out and len(out.splitlines()) == 24


def test_unknown_component_is_a_clear_error(capsys, tmp_path):
    assert main(["world", "build", "--out", str(tmp_path), "--only", "mllm", "vae"]) == 2
    err = capsys.readouterr().err
    assert "vae" in err and "mllm" in err and "classifier" in err and "sd" in err
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_unknown_command_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["unlearnify"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-3"], "steps=-3 (must be >= 1)"),
    (["--images", "0"], "images=0"),
    (["batch_size=0"], "batch_size=0 (must be >= 1)"),
    (["lr=-1e-3"], "lr=-0.001 (must be > 0)"),
    (["lora=maybe"], "must be true or false"),
    (["mixed_precision=fp7"], "mixed_precision='fp7' (one of auto, no, fp16, bf16)"),
    (["lora_targets=(["], "lora_targets='([' (not a regular expression"),
    (["train_params=(["], "train_params='([' (not a regular expression"),
    (["--seed", "-1"], "seed=-1 (must be 0 .. 2**32-1)"),
    (["--checkpoint-every", "-2"], "checkpoint_every=-2"),
])
def test_bad_run_settings_fail_before_anything_is_loaded(argv, message, capsys, tmp_path):
    for kind in ("mllm", "sd"):
        assert main([kind, "--concept", "vorn", "--method", "fttp", "--out", str(tmp_path / kind), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_npo_settings_are_checked_and_its_retain_term_gets_retain_data(capsys, tmp_path):
    from unlearn.methods import get_method

    assert main(["mllm", "--concept", "vorn", "--method", "npo", "--out", str(tmp_path / "r"), "beta=0"]) == 2
    assert "npo.beta must be > 0" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert get_method("npo", retain_weight=1.0).needs_retain and not get_method("npo").needs_retain
