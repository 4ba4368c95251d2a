"""The forgetting audit (``unlearn audit RUN``) on a tiny world MLLM run from a record directory: bad input
is an error before anything is written, the audit end to end, the run's files untouched, an interrupted
audit leaves nothing, relearning learns, determinism, and each verdict rule reaching each outcome."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import xarray as xr

from knowtrace.cli import main as knowtrace_main
from tests.test_unlearn_mllm import WORLD, world_dir  # noqa: F401  (fixture)
from tests.test_world_mllm import TINY
from unlearn.audit.base import Verdict
from unlearn.audit.data import record_audit_data
from unlearn.audit.quantize import quantize_verdict
from unlearn.audit.relearn import relearn_verdict
from unlearn.audit.rephrase import rephrase_verdict
from unlearn.audit.run import overall_verdict
from unlearn.cli import main
from unlearn.run_mllm import run_mllm
from unlearn.world.source import resolve_model
from unlearn.world_export import export_concept

# cheap options: a tiny audit exercises every path in seconds
QUICK = {"relearn.steps": "2", "relearn.questions": "2", "relearn.records": "2", "relearn.max_new_tokens": "4",
         "rephrase.questions": "2", "rephrase.max_new_tokens": "4", "quantize.questions": "2",
         "quantize.max_new_tokens": "4"}


def quick(*attacks: str) -> list[str]:
    """--set flags of QUICK for ``attacks`` (default: all)."""
    return [a for k, v in QUICK.items() if not attacks or k.split(".")[0] in attacks for a in ("--set", f"{k}={v}")]


QUICK_ARGS = quick()


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def model_dir(world_dir):  # noqa: F811
    return resolve_model("world", "mllm", world_dir, WORLD)  # the tiny world MLLM's directory


@pytest.fixture(scope="module")
def finished(tmp_path_factory, model_dir):
    """A complete 2-step FTTP run on the exported concept, its data directory holding the audit's files."""
    root = tmp_path_factory.mktemp("audit")
    data = export_concept("vorn", root / "data", image_size=TINY.image_size)
    test = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    retain = [json.loads(line) for line in (data / "retain.jsonl").read_text().splitlines()]
    _rows(data / "unseen.jsonl", [dict(r, id=f"u{i}") for i, r in enumerate(test[-4:])])
    _rows(data / "unrelated.jsonl", [r for r in retain if r.get("image")][:4])
    _rows(data / "rephrased.jsonl", [dict(r, id=f"r{i}", question="Tell me who is shown here.")
                                     for i, r in enumerate(test) if r.get("qtype") == "identify"][:4])
    run = root / "run"
    run_mllm("Vorn", "fttp", run, steps=2, model=str(model_dir), data=data, progress=False)
    return run


def _hashes(run):
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.relative_to(run).parts[0] != "audit"}


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def audited(finished, model_dir, tmp_path_factory):
    """The run copied and audited once through the CLI (retain model: a model directory)."""
    run = tmp_path_factory.mktemp("audited") / "run"
    shutil.copytree(finished, run)
    before = _hashes(run)
    assert main(["audit", str(run), "--retain-model", str(model_dir), "--quiet", *QUICK_ARGS]) == 0
    return run, before


def test_audit_end_to_end(audited):
    run, before = audited
    assert _hashes(run) == before  # the run's own files only read
    assert sorted(p.name for p in (run / "audit").iterdir()) == ["audit.html", "audit.json", "audit.nc"]
    assert not (run / ".audit.partial").exists()
    report = json.loads((run / "audit" / "audit.json").read_text())
    assert report["models"] == ["original", "unlearned", "retain"]
    assert set(report["attacks"]) == {"relearn", "rephrase", "quantize", "mia", "probes", "lens"}
    assert report["attacks"]["mia"]["rule"].startswith("skipped")  # the fixture's data names no members
    assert all(v["verdict"] in ("removed", "hidden", "inconclusive") and v["rule"] for v in report["attacks"].values())
    assert report["overall"]["verdict"] == overall_verdict(
        [Verdict(a, v["verdict"], "", {}) for a, v in report["attacks"].items()])["verdict"]
    assert report["attacks"]["relearn"]["options"]["steps"] == 2 and report["seed"] == 0
    assert report["records"]["unseen"] == 4 and report["records"]["members"] == 0
    ds = xr.open_dataset(run / "audit" / "audit.nc", engine="h5netcdf")
    assert ds["relearn_identified"].dims == ("model", "relearn_set", "relearn_step")
    assert list(ds["relearn_set"].values) == ["forget", "unseen", "unrelated"] and ds.sizes["relearn_step"] == 3
    assert list(ds["quantize_precision"].values) == ["float", "int8"]
    # the original and the retain model are the same weights here: identical answers before relearning
    ident = ds["rephrase_identified"]
    np.testing.assert_array_equal(ident.sel(model="original").values, ident.sel(model="retain").values)
    assert np.isnan(ds["quantize_identified"].sel(model="retain")).all()  # quantize compares original, unlearned
    assert "Forgetting audit" in (run / "audit" / "audit.html").read_text()


def test_relearning_lowers_the_nll_of_the_relearned_records(audited):
    nll = xr.open_dataset(audited[0] / "audit" / "audit.nc", engine="h5netcdf")["relearn_nll"]
    first, last = nll.isel(relearn_step=0), nll.isel(relearn_step=-1)
    assert bool((last < first).all()), (first.values, last.values)


def test_knowtrace_plots_the_audit(audited, tmp_path):
    out = tmp_path / "audit.html"
    assert knowtrace_main(["plot", str(audited[0]), "--kind", "audit", "--html", str(out)]) == 0
    text = out.read_text()
    assert "relearn_identified (set forget)" in text and "quantize_identified" in text


def test_same_seed_same_audit_and_overwrite_replaces_it(audited, model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(audited[0], run)
    first = (run / "audit" / "audit.nc").read_bytes()
    assert main(["audit", str(run), "--retain-model", str(model_dir), "--quiet", "--overwrite", *QUICK_ARGS]) == 0
    assert (run / "audit" / "audit.nc").read_bytes() == first  # the same file, byte for byte
    assert not (run / ".audit.old").exists() and not (run / ".audit.partial").exists()


def test_interrupted_audit_leaves_the_run_and_the_earlier_audit(audited, tmp_path, monkeypatch):
    from unlearn.audit.quantize import Quantize

    run = tmp_path / "run"
    shutil.copytree(audited[0], run)
    own = _hashes(run)
    before = {**own, **{f"audit/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
                                 for p in (run / "audit").iterdir()}}

    reached = []

    def interrupted(self, ctx):
        reached.append(sorted(ctx._adapters))  # the models the attacks before it asked
        raise KeyboardInterrupt
    monkeypatch.setattr(Quantize, "run", interrupted)  # the last attack: the others have done their part
    argv = ["--retain-model", "none", "--quiet", "--attacks", "rephrase,quantize", *quick("rephrase", "quantize")]
    assert main(["audit", str(run), "--overwrite", *argv]) == 130
    assert reached == [["original", "unlearned"]]
    after = {**_hashes(run), **{f"audit/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
                                for p in (run / "audit").iterdir()}}
    assert after == before and not (run / ".audit.partial").exists()
    shutil.rmtree(run / "audit")  # a first audit, interrupted: no RUN/audit at all
    assert main(["audit", str(run), *argv]) == 130
    assert not (run / "audit").exists() and not (run / ".audit.partial").exists() and _hashes(run) == own


def test_absent_audit_data_makes_its_attack_inconclusive(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert main(["audit", str(run), "--retain-model", "none", "--quiet", "--attacks", "rephrase",
                 "--audit-data", str(empty)]) == 0
    verdict = json.loads((run / "audit" / "audit.json").read_text())["attacks"]["rephrase"]
    assert verdict["verdict"] == "inconclusive" and verdict["numbers"]["missing"] == ["rephrased.jsonl"]


# ------------------------------------------------------------------ bad input: exit 2, a message, nothing written
def _manifest(run, **changes):
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, **changes}))


@pytest.mark.parametrize("damage, argv, words", [
    (lambda run: (run / "manifest.json").unlink(), [], ("not a run directory",)),
    (lambda run: _manifest(run, kind="video"), [], ("of kind 'video'", "mllm and sd runs")),
    (lambda run: _manifest(run, state="failed", error="boom"), [], ("not complete", "failed")),
    (lambda run: shutil.rmtree(run / "adapter"), [], ("no trained parameters",)),
    (lambda run: _manifest(run, model=str(run / "gone")), [], ("no such directory",)),
    (lambda run: None, ["--retain-model", "MISSING"], ("--retain-model", "no such directory")),
    (lambda run: None, ["--attacks", "relearn,bogus"], ("unknown audit attack", "bogus", "relearn, rephrase")),
    (lambda run: None, ["--set", "relearn.bogus=1"], ("unknown audit option", "relearn.bogus", "steps=10")),
    (lambda run: None, ["--attacks", "quantize", "--set", "relearn.steps=2"], ("unknown audit option",)),
    (lambda run: None, ["--set", "relearn.steps=0"], ("relearn.steps=0", ">= 1")),
    (lambda run: None, ["--set", "quantize.margin=nan"], ("quantize.margin=nan",)),
    (lambda run: (run / "audit").mkdir(), [], ("audit exists", "--overwrite")),
])
def test_bad_input_is_an_error_before_anything_is_written(finished, tmp_path, capsys, damage, argv, words):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    damage(run)
    before = _files(tmp_path)
    argv = [a.replace("MISSING", str(tmp_path / "missing")) for a in argv]
    assert main(["audit", str(run), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(w in err for w in words), err
    assert _files(tmp_path) == before


def test_probe_labels_of_a_record_directory(tmp_path):
    rows = [{"question": "Who?", "answer": "A", "concept": c} for c in ("Other", "Vorn", "Other", "Third")]
    _rows(tmp_path / "probe.jsonl", rows)
    data = record_audit_data("Vorn", ("Vorn",), [], [], tmp_path)
    assert data.probe_labels == [0, 1, 0, 2] and data.concept_label == 1 and data.unseen == []
    _rows(tmp_path / "probe.jsonl", [dict(r, concept="Other") for r in rows])
    with pytest.raises(ValueError, match="no record is labelled with the run's concept"):
        record_audit_data("Vorn", ("Vorn",), [], [], tmp_path)


# ------------------------------------------------------------------ verdict rules on constructed datasets
def _relearn(curves: dict) -> xr.Dataset:
    """curves: model -> {set: identification per step (step 0 first)}."""
    models, sets = list(curves), list(next(iter(curves.values())))
    values = np.array([[curves[m][s] for s in sets] for m in models], dtype=float)
    return xr.Dataset({"relearn_identified": (("model", "set", "step"), values)},
                      coords={"model": models, "set": sets, "step": np.arange(values.shape[-1])})


FULL, ZERO = [100, 100, 100], [0, 0, 0]


@pytest.mark.parametrize("curves, verdict", [
    # comes back at once where the retain model learns slowly: hidden
    ({"original": {"forget": FULL, "unrelated": FULL}, "unlearned": {"forget": [0, 90, 100], "unrelated": ZERO},
      "retain": {"forget": [0, 10, 20], "unrelated": ZERO}}, "hidden"),
    # comes back from unrelated records, no retain model needed: hidden
    ({"original": {"forget": FULL, "unrelated": FULL}, "unlearned": {"forget": [0, 10, 20], "unrelated": [0, 50, 60]}},
     "hidden"),
    # as slow as the retain model: removed
    ({"original": {"forget": FULL, "unrelated": FULL}, "unlearned": {"forget": [0, 20, 40], "unrelated": ZERO},
      "retain": {"forget": [0, 20, 30], "unrelated": ZERO}}, "removed"),
    # no reference and no benign recovery: inconclusive
    ({"original": {"forget": FULL, "unrelated": FULL}, "unlearned": {"forget": [0, 20, 40], "unrelated": ZERO}},
     "inconclusive"),
    # the run did not forget: inconclusive
    ({"original": {"forget": FULL, "unrelated": FULL}, "unlearned": {"forget": [90, 100, 100], "unrelated": FULL},
      "retain": {"forget": ZERO, "unrelated": ZERO}}, "inconclusive"),
])
def test_relearn_verdict(curves, verdict):
    assert relearn_verdict(_relearn(curves), margin=25.0).verdict == verdict


def _table(var, dim, coords, values):
    models = list(values)
    return xr.Dataset({var: (("model", dim), np.array([values[m] for m in models], dtype=float))},
                      coords={"model": models, dim: coords})


@pytest.mark.parametrize("values, verdict", [
    ({"original": [100, 90], "unlearned": [0, 60], "retain": [0, 10]}, "hidden"),
    ({"original": [100, 90], "unlearned": [0, 20], "retain": [0, 10]}, "removed"),
    ({"original": [100, 90], "unlearned": [0, 60]}, "hidden"),  # against its own answers to the run's questions
    ({"original": [100, 20], "unlearned": [0, 60], "retain": [0, 0]}, "inconclusive"),  # original does not answer
])
def test_rephrase_verdict(values, verdict):
    ds = _table("rephrase_identified", "questions", ["test", "rephrased"], values)
    assert rephrase_verdict(ds, margin=25.0, min_original=50.0).verdict == verdict


@pytest.mark.parametrize("values, verdict", [
    ({"original": [100, 100], "unlearned": [0, 50]}, "hidden"),
    ({"original": [100, 95], "unlearned": [0, 10]}, "removed"),
    ({"original": [100, 20], "unlearned": [0, 50]}, "inconclusive"),  # int8 broke the model
])
def test_quantize_verdict(values, verdict):
    ds = _table("quantize_identified", "precision", ["float", "int8"], values)
    assert quantize_verdict(ds, margin=25.0, min_original=50.0).verdict == verdict


@pytest.mark.parametrize("verdicts, overall", [
    (["removed", "hidden", "removed"], "hidden"),
    (["removed", "removed", "inconclusive"], "removed"),
    (["removed", "inconclusive", "inconclusive"], "inconclusive"),
])
def test_overall_verdict(verdicts, overall):
    assert overall_verdict([Verdict(f"a{i}", v, "", {}) for i, v in enumerate(verdicts)])["verdict"] == overall


def test_relearn_uses_a_method_outside_the_unlearning_registry():
    from unlearn.audit.relearn import Descent
    from unlearn.methods import METHODS

    assert Descent not in METHODS.values() and "relearn" not in METHODS
