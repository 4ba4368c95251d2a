"""``unlearn audit RUN`` on a Stable Diffusion run: the same command, checks, output layout and plots as the
MLLM audit, through the SD attacks (tiny budgets); bad input is an error before anything is written; the
record-directory audit files are read and checked."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import xarray as xr
from PIL import Image

from knowtrace.cli import main as knowtrace_main
from unlearn.audit.run import attacks
from unlearn.audit.sd_data import record_sd_audit_data
from unlearn.cli import main
from unlearn.data.sd_records import SDRecord, load_image
from unlearn.world.source import resolve_model

# tiny budgets: every SD attack exercised in seconds
QUICK = {"sampling.seeds": "1", "sampling.guidances": "7.5", "sampling.scenes": "1", "sampling.scene_seeds": "1",
         "relearn.steps": "1", "relearn.images": "1", "relearn.seeds": "1", "relearn.original": "false",
         "inversion.steps": "2", "inversion.images": "1", "inversion.batch": "1", "inversion.seeds": "1",
         "adversarial.steps": "2", "adversarial.per_timestep": "1", "adversarial.seeds": "1",
         "adversarial.original": "false", "knowledge.images": "2"}
QUICK_ARGS = [a for k, v in QUICK.items() for a in ("--set", f"{k}={v}")]


def _hashes(run):
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and "audit" not in p.relative_to(run).parts[0]}


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def audited(finished_sd_run, tmp_path_factory):
    """The SD run copied and audited once through the CLI (the world SD standing in for the retain model)."""
    run = tmp_path_factory.mktemp("sd-audited") / "run"
    shutil.copytree(finished_sd_run, run)
    before = _hashes(run)
    assert main(["audit", str(run), "--retain-model", str(resolve_model("world", "sd")), "--quiet",
                 *QUICK_ARGS]) == 0
    return run, before


def test_sd_audit_end_to_end(audited, tmp_path):
    run, before = audited
    assert _hashes(run) == before  # the run's own files only read
    assert sorted(p.name for p in (run / "audit").iterdir()) == ["audit.html", "audit.json", "audit.nc"]
    report = json.loads((run / "audit" / "audit.json").read_text())
    assert report["kind"] == "sd" and report["models"] == ["original", "unlearned", "retain"]
    assert list(attacks("sd")) == ["knowledge", "sampling", "relearn", "inversion", "adversarial"]  # run order
    assert set(report["attacks"]) == set(attacks("sd"))
    assert all(v["verdict"] in ("removed", "hidden", "inconclusive") and v["rule"] for v in report["attacks"].values())
    assert report["records"]["unseen"] == 20 and report["records"]["scenes"] > 0
    ds = xr.open_dataset(run / "audit" / "audit.nc", engine="h5netcdf")
    assert ds.attrs["concept"] == "grom" and list(ds["model"].values) == ["original", "unlearned", "retain"]
    assert {"sampling_drawn", "relearn_drawn", "inversion_drawn", "adversarial_drawn", "knowledge_K_C"} <= set(ds)
    drawn = ds["sampling_drawn"].values
    assert np.isfinite(drawn).all() and ((0 <= drawn) & (drawn <= 100)).all()
    out = tmp_path / "audit.html"
    assert knowtrace_main(["plot", str(run), "--kind", "audit", "--html", str(out)]) == 0
    assert "sampling_drawn" in out.read_text()


@pytest.mark.parametrize("argv, words", [
    (["--attacks", "rephrase"], ("unknown audit attack", "for sd runs", "knowledge, sampling")),
    (["--set", "sampling.bogus=1"], ("unknown audit option", "sampling.bogus", "seeds=16")),
    (["--retain-model", "MLLM"], ("--retain-model", "model_index.json")),
    (["--audit-data", "RUN"], ("--audit-data is for runs on a record directory",)),
])
def test_sd_bad_input_is_an_error_before_anything_is_written(finished_sd_run, tmp_path, capsys, argv, words):
    run = tmp_path / "run"
    shutil.copytree(finished_sd_run, run)
    mllm = resolve_model("world", "mllm")
    argv = [str(mllm) if a == "MLLM" else str(run) if a == "RUN" else a for a in argv]
    before = _files(tmp_path)
    assert main(["audit", str(run), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(w in err for w in words), err
    assert _files(tmp_path) == before


def test_record_directory_audit_files(tmp_path):
    forget = [SDRecord("f0", "a photo of Zorp", np.zeros((8, 8, 3), np.uint8), "Zorp")]
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "images" / "u0.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    Image.fromarray(mask).save(tmp_path / "images" / "u0-mask.png")
    unseen = {"id": "u0", "image": "images/u0.png", "prompt": "Zorp on a table"}
    (tmp_path / "unseen.jsonl").write_text(json.dumps(unseen) + "\n")
    with pytest.raises(ValueError, match=r"unseen.jsonl:1: an unseen image needs its concept mask"):
        record_sd_audit_data("Zorp", ("Zorp",), "Zorp", [], forget, {}, None, tmp_path)
    (tmp_path / "unseen.jsonl").write_text(json.dumps({**unseen, "mask": "images/u0-mask.png"}) + "\n")
    (tmp_path / "scenes.txt").write_text("Zorp beside a cat\n\nZorp and a dog\n")
    data = record_sd_audit_data("Zorp", ("Zorp",), "Zorp", ["a photo of Zorp"], forget, {"cat": "a cat"}, None,
                                tmp_path)
    assert [r.id for r in data.unseen] == ["u0"] and load_image(data.unseen[0]).shape == (8, 8, 3)
    assert data.scenes == ["Zorp beside a cat", "Zorp and a dog"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert record_sd_audit_data("Zorp", ("Zorp",), "Zorp", [], forget, {}, None, empty).unseen == []
    (tmp_path / "scenes.txt").write_text("a dog alone\n")
    with pytest.raises(ValueError, match=r"scenes.txt:1: .*names none of Zorp"):
        record_sd_audit_data("Zorp", ("Zorp",), "Zorp", [], forget, {}, None, tmp_path)
    (tmp_path / "scenes.txt").unlink()
    (tmp_path / "unseen.jsonl").write_text(json.dumps({**unseen, "mask": "images/u0-mask.png",
                                                       "prompt": "a table"}) + "\n")
    with pytest.raises(ValueError, match="Zorp"):  # an unseen image's prompt must name the concept
        record_sd_audit_data("Zorp", ("Zorp",), "Zorp", [], forget, {}, None, tmp_path)
