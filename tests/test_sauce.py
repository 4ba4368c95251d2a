"""SAUCE: the SAE feature edit against an independent computation (edited reconstruction + SAE error), exact
pass-through of what is not edited, the feature rules by hand, and ``unlearn mllm --method sauce`` end to end
on a tiny world: run directory, reload, re-evaluation, tracing, the audit, and bad input before anything is written."""

import json

import pytest
import torch

from knowtrace.sae import SAE_WEIGHTS_FILE, TopKSAE, load_sae, save_sae
from knowtrace.sae_edit import FeatureEdit, feature_statistics, install_feature_edit, top_features
from tests.test_models import _records
from tests.test_unlearn_mllm import WORLD
from tests.tiny_models import tiny_llava, tiny_qwen2vl
from unlearn.cli import main
from unlearn.methods import get_method
from unlearn.methods.sauce import INTERVENTION_FILE, RULES
from unlearn.models import adapter_for, load_mllm
from unlearn.run_mllm import run_mllm
from unlearn.runs import evaluate_run, reload
from unlearn.world.source import resolve_model


def random_sae(d_in, d_sae=24, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d_in, d_sae, k)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return sae.requires_grad_(False)


@pytest.mark.parametrize("intervention,value", [("clamp", 0.0), ("clamp", -2.0), ("scale", 0.5), ("scale", 3.0)])
def test_the_edit_is_the_edited_reconstruction_plus_the_sae_error(intervention, value):
    sae = random_sae(8)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    chosen = [2, 7, 11, 19]
    acts = sae.encode(x)
    edited = acts.clone()
    for f in chosen:  # the intervention, written out per feature where it is active
        on = acts[..., f] > 0
        new = torch.full_like(acts[..., f], value) if intervention == "clamp" else acts[..., f] * value
        edited[..., f] = torch.where(on, new, acts[..., f])
    want = sae.decode(edited) + (x - sae.decode(acts))
    got = FeatureEdit(sae, chosen, intervention, value).apply(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert (acts[..., chosen] > 0).any() and not torch.allclose(got, x)  # the test data does exercise the edit


def test_the_edit_is_differentiable_after_use_in_inference_mode():
    """An evaluation under inference mode first, fine-tuning through the edit afterwards (the audit's relearning)."""
    sae = random_sae(8)
    edit = FeatureEdit(sae, (2, 7), "clamp", 0.0)
    with torch.inference_mode():
        edit.apply(torch.randn(2, 3, 8))
    x = torch.randn(2, 3, 8, requires_grad=True)
    edit.apply(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("family", [tiny_llava, tiny_qwen2vl], ids=["llava", "qwen2_vl"])
def test_untouched_features_pass_through_exactly(family):
    model, processor = family()
    adapter = adapter_for(model.eval(), processor)
    batch = adapter.encode(_records())
    with torch.no_grad():
        original = model(**batch).logits
    width = model.config.text_config.hidden_size
    sae = random_sae(width, d_sae=64, k=8)
    for edit in (FeatureEdit(sae, ()), FeatureEdit(sae, tuple(range(64)), "scale", 1.0)):
        handle = install_feature_edit(model, 0, edit)
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, original)  # bit for bit
        handle.remove()
    handle = install_feature_edit(model, 0, FeatureEdit(sae, tuple(range(64)), "clamp", 0.0))
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, original)
    handle.remove()
    with pytest.raises(ValueError, match="does not exist"):
        install_feature_edit(model, 5, FeatureEdit(sae, (1,)))
    with pytest.raises(ValueError, match="width"):
        install_feature_edit(model, 0, FeatureEdit(random_sae(width + 1), (1,)))
    with pytest.raises(ValueError, match="unknown intervention"):
        FeatureEdit(sae, (1,), "zero")
    with pytest.raises(ValueError, match="distinct indices"):
        FeatureEdit(sae, (1, 64))


def test_feature_rules_and_the_choice_by_hand():
    forget = torch.tensor([[0.0, 2.0, 1.0, 0.0], [0.0, 4.0, 0.0, 0.0], [3.0, 0.0, 1.0, 0.0]])
    retain = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0]])
    f, r = feature_statistics(forget), feature_statistics(retain)
    assert torch.allclose(f[0], torch.tensor([1 / 3, 2 / 3, 2 / 3, 0])) and torch.allclose(r[1], torch.tensor([1.0, 0, 1, 0]))
    freq = RULES["frequency"](f, r)
    assert torch.allclose(freq, torch.tensor([1 / 3 - 1, 2 / 3, 2 / 3 - 1 / 2, 0]))
    assert torch.allclose(RULES["mean"](f, r), torch.tensor([1 - 1, 2, 2 / 3 - 1, 0]))
    ratio = RULES["ratio"](f, r)
    assert ratio[1] > 10 and ratio[0] == 0 and ratio[2] < 0
    assert top_features(freq, 3) == [1, 2]  # only positive scores, best first
    with pytest.raises(ValueError, match="unknown feature rule"):
        get_method("sauce", rule="best")
    with pytest.raises(ValueError, match="intervention"):
        get_method("sauce", intervention="zero")
    with pytest.raises(ValueError, match="positions"):
        get_method("sauce", positions="image,pixels")


# ---------------------------------------------------------------------------------------------- runs
FAST = {"layer": "0", "sae_steps": "300", "features": "4"}


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    load_mllm(resolve_model("world", "mllm", d, WORLD))
    return d


@pytest.fixture(scope="module")
def sauce_run(world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sauce"
    metrics = run_mllm("vorn", "sauce", out, world_dir=world_dir, world_config=WORLD, progress=False, options=FAST,
                       trace=True, trace_attention=True)
    return out, metrics


def test_a_sauce_run_holds_its_intervention_not_weights_and_reloads_exactly(sauce_run, world_dir):
    run, metrics = sauce_run
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["state"] == "complete" and manifest["trains_weights"] is False and metrics["steps"] == 0
    assert not (run / "adapter").exists() and not (run / "weights").exists()
    saved = json.loads((run / INTERVENTION_FILE).read_text())
    assert saved["sae"] == "sae" and len(saved["features"]) == 4 and saved["layer"] == 0
    assert all(s > 0 for s in saved["scores"]) and saved["scores"] == sorted(saved["scores"], reverse=True)
    sae, cfg = load_sae(run / "sae", model_name="world", layer=0)  # SAELens layout, for this model and layer
    assert cfg["knowtrace"]["quality"]["explained_variance"] > 0.5
    # the reloaded run is the original model with the hook: its forward differs from the original's, and
    # evaluating it again gives the run's own metrics
    adapter, _ = reload(run, world_dir, WORLD)
    plain = load_mllm(resolve_model("world", "mllm", world_dir, WORLD))
    batch = adapter.encode(plain_records(run))
    with torch.no_grad():
        assert not torch.allclose(adapter.model(**batch).logits, plain.model(**batch).logits)
    again = evaluate_run(run, world_dir, world_config=WORLD)
    assert {k: again[k] for k in ("efficacy", "K_C", "K_N")} == {k: metrics[k] for k in ("efficacy", "K_C", "K_N")}


def plain_records(run):
    from unlearn.run_mllm import world_data

    return world_data("vorn", 1, image_size=32)[1][:2]


def test_a_sauce_run_is_traced_before_and_after_its_edit(sauce_run):
    from knowtrace import open_probe_trace, open_trace

    run, _ = sauce_run
    steps = open_trace(run / "trace.zarr")
    assert list(steps["step"].values) == [0] and bool(steps["K_C"].notnull().any())
    probe = open_probe_trace(run / "trace.zarr")
    assert list(probe["step"].values) == [-1, 0]
    assert not bool((probe["logprob"].sel(step=-1) == probe["logprob"].sel(step=0)).all())


def test_a_scale_by_one_run_changes_nothing(world_dir, tmp_path, sauce_run):
    metrics = run_mllm("vorn", "sauce", tmp_path / "one", world_dir=world_dir, world_config=WORLD, progress=False,
                       options={**FAST, "sae": str(sauce_run[0] / "sae"), "intervention": "scale", "value": "1"})
    for key in ("efficacy", "em", "specificity", "K_C", "K_N"):
        assert metrics[key] == metrics["original"][key], key
    saved = json.loads((tmp_path / "one" / INTERVENTION_FILE).read_text())
    assert saved["sae"] == str((sauce_run[0] / "sae").resolve()) and not (tmp_path / "one" / "sae").exists()


def test_the_audit_applies_to_a_sauce_run(sauce_run, tmp_path, world_dir):
    import shutil

    from unlearn.audit.run import run_audit

    run = tmp_path / "sauce"
    shutil.copytree(sauce_run[0], run)
    audit = {"retain_model": "none", "progress": False, "world_dir": world_dir, "world_config": WORLD}
    (run / "sae").rename(tmp_path / "moved")  # a run whose SAE is gone is refused, naming it, before any model loads
    with pytest.raises(FileNotFoundError, match="sae"):
        run_audit(run, ["lens"], **audit)
    assert not (run / "audit").exists()
    (tmp_path / "moved").rename(run / "sae")
    # relearning fine-tunes the model under its hook (LoRA beside an SAE edit)
    report = run_audit(run, ["lens", "quantize", "relearn"], {"relearn.steps": 2}, **audit)
    assert set(report["attacks"]) == {"lens", "quantize", "relearn"}
    assert json.loads((run / "audit" / "audit.json").read_text())["attacks"].keys() == report["attacks"].keys()


def test_bad_input_is_a_clear_error_before_anything_is_written(world_dir, tmp_path, sauce_run):
    sae_dir = sauce_run[0] / "sae"

    def refused(error, match, **options):
        out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        with pytest.raises(error, match=match):
            run_mllm("vorn", "sauce", out, world_dir=world_dir, world_config=WORLD, progress=False, options=options)
        assert not out.exists()

    refused(ValueError, "unknown feature rule", rule="best")
    with pytest.raises(ValueError, match="no checkpoints"):
        run_mllm("vorn", "sauce", tmp_path / "ck", world_dir=world_dir, world_config=WORLD, checkpoint_every=2)
    assert not (tmp_path / "ck").exists()
    refused(ValueError, "unknown intervention", intervention="zero")
    refused(ValueError, "does not exist", layer="7")
    sae, cfg = load_sae(sae_dir)
    deeper = tmp_path / "other-layer"  # as if trained on layer 5 of a deeper model of the same name
    save_sae(sae, deeper, model_name="world", hook_name="model.language_model.layers.5", layer=5,
             positions=("answer",))
    refused(ValueError, "was trained for hook_", sae=str(deeper), layer="0")
    other = tmp_path / "other-model"
    save_sae(sae, other, model_name="llava-hf/llava-1.5-7b-hf", hook_name=cfg["hook_name"], layer=0,
             positions=("answer",))
    refused(ValueError, "model_name", sae=str(other), layer="0")
    refused(FileNotFoundError, "not a directory", sae=str(tmp_path / "nowhere"), layer="0")
    assert main(["mllm", "--concept", "vorn", "--method", "sauce", "--out", str(tmp_path / "cli"), "rule=best"]) == 2
    assert not (tmp_path / "cli").exists()


def test_a_changed_sae_is_refused_on_reevaluation(sauce_run, tmp_path, world_dir):
    import shutil

    run = tmp_path / "sauce"
    shutil.copytree(sauce_run[0], run)
    weights = run / "sae" / SAE_WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="not the one"):
        evaluate_run(run, world_dir, world_config=WORLD)
