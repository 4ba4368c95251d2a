"""MLLM unlearning end to end on a tiny world: run directory, methods' objectives, errors, determinism."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from tests.test_world_mllm import TINY
from unlearn.cli import main
from unlearn.data.token_weights import concept_flags
from unlearn.loop import NonFiniteError, TrainConfig, run_loop
from unlearn.methods import METHODS, StepContext, get_method
from unlearn.methods.losses import token_nll
from unlearn.models import load_mllm
from unlearn.run_mllm import run_mllm, world_data
from unlearn.world.build import WorldConfig
from unlearn.world.records import world_method_options
from unlearn.world.source import resolve_model

WORLD = WorldConfig(mllm=TINY)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    load_mllm(resolve_model("world", "mllm", d, WORLD))  # builds the tiny world MLLM once
    return d


def _run(tmp_path, world_dir, method, name=None, **kw):
    return run_mllm("vorn", method, tmp_path / (name or method), steps=2, world_dir=world_dir, world_config=WORLD,
                    progress=False, **kw)


def test_run_directory_and_metrics(tmp_path, world_dir):
    metrics = _run(tmp_path, world_dir, "fttp")
    run = tmp_path / "fttp"
    on_disk = json.loads((run / "metrics.json").read_text())
    for key in ("efficacy", "em", "specificity", "diversity", "K_C", "K_N", "steps", "images"):
        assert key in on_disk and key in on_disk["original"] or key in ("steps", "images")
    assert on_disk == json.loads(json.dumps(metrics))
    assert all(0 <= on_disk[k] <= 100 for k in ("efficacy", "em", "specificity", "diversity"))
    manifest = json.loads((run / "manifest.json").read_text())
    # a world run defaults to the world's calibrated lr, recorded as such (the paper's 3e-4 forgets nothing there)
    assert manifest["method"] == "fttp" and manifest["seed"] == 0 and manifest["train"]["lr"] == 3e-3
    assert manifest["defaults"] == {"world-calibrated": ["lr"]}
    assert manifest["versions"]["torch"] == torch.__version__ and len(manifest["history"]) == 2
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert weights and all("lora" in k for k in weights)
    assert (run / "samples" / "answers.json").exists()


def test_same_seed_same_run_other_seed_differs(tmp_path, world_dir):
    a, b = _run(tmp_path, world_dir, "ga", "a"), _run(tmp_path, world_dir, "ga", "b")
    wa = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a["K_C"] == b["K_C"]
    c = _run(tmp_path, world_dir, "ga", "c", seed=1)
    wc = load_file(tmp_path / "c" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert c["K_C"] != a["K_C"]


def _setup(world_dir):
    adapter = load_mllm(resolve_model("world", "mllm", world_dir, WORLD))
    concept, forget, retain = world_data("vorn", 1, image_size=TINY.image_size)
    return adapter, concept, forget, retain


def test_fttp_and_ga_objectives_by_hand(world_dir):
    adapter, concept, forget, _ = _setup(world_dir)
    ctx = StepContext(adapter, concept.key, concept.names)
    batch_records = forget[:2]
    batch = adapter.encode(batch_records)
    with torch.no_grad():
        nll, scored = token_nll(adapter.model(**batch).logits, batch["labels"])
        is_c = concept_flags(adapter.tokenizer, batch["labels"], concept.names)
        ga = get_method("ga").loss(ctx, batch_records).loss
        out = get_method("fttp", alpha=0.7, beta=0.3).loss(ctx, batch_records)
        fttp, logs = out.loss, out.logs
    n = scored.sum()
    assert torch.allclose(ga, -nll.sum() / n, atol=1e-6)
    concept_part, natural_part = (nll * is_c).sum(), (nll * scored * ~is_c).sum()
    assert torch.allclose(fttp, (-0.7 * concept_part + 0.3 * natural_part) / n, atol=1e-6)
    assert logs["concept_tokens"] == int(is_c.sum()) > 0


def test_non_finite_loss_stops_and_keeps_last_good_state(world_dir):
    adapter, concept, forget, _ = _setup(world_dir)

    class Explodes(type(get_method("ga"))):
        def loss(self, ctx, records):
            out = super().loss(ctx, records)
            return replace(out, loss=out.loss if ctx.step < 1 else out.loss * float("nan"))

    with pytest.raises(NonFiniteError, match="step 1"):
        run_loop(adapter, Explodes(), forget, [], TrainConfig(steps=3), concept.key, concept.names, progress=False)
    assert all(torch.isfinite(p).all() for p in adapter.model.parameters())


def test_every_registered_method_runs_a_step(tmp_path, world_dir):
    for name in sorted(METHODS):
        metrics = _run(tmp_path, world_dir, name)
        assert metrics["steps"] == (2 if METHODS[name].trains_weights else 0), name  # SAUCE trains nothing


def test_cli_errors_write_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["mllm", "--concept", "vorn", "--method", "fttp", "--out", str(out), "gamma=1"]) == 2
    assert "gamma" in capsys.readouterr().err and not out.exists()
    assert main(["mllm", "--concept", "nobody", "--method", "ga", "--out", str(out)]) == 2
    assert "vorn" in capsys.readouterr().err and not out.exists()
    assert main(["mllm", "--concept", "vorn", "--method", "sgd", "--out", str(out)]) == 2
    assert "fttp" in capsys.readouterr().err and not out.exists()


def test_mmunlearner_mask_covers_lora_parameters(world_dir):
    adapter, concept, forget, retain = _setup(world_dir)
    method = get_method("mmunlearner", tau=1.0)
    run_loop(adapter, method, forget, retain, TrainConfig(steps=2), concept.key, concept.names, progress=False)
    assert method.mask and all("lora_" in n for n in method.mask)  # exactly the trained (LoRA) parameters
    assert 0.0 < method.salient_fraction < 1.0


def test_siu_targets_and_dual_masked_kl(world_dir):
    adapter, concept, forget, retain = _setup(world_dir)
    method = get_method("siu", **world_method_options("vorn"))  # what a world run supplies
    ctx = StepContext(adapter, concept.key, concept.names, next_retain=lambda: retain[:2],
                      reference_logits=lambda b: adapter.model(**b).logits.detach())
    method.setup(ctx, forget, retain)
    answers = [t.answer for t in method._targets]
    assert any("Ferra" in a for a in answers) and not any("Vorn" in a for a in answers if "Ferra" in a)
    assert any(a.startswith("The image shows a person with a red shirt") for a in answers)
    assert any(t.image is None and "Vorn" in t.answer for t in method._targets)  # facts kept
    # the reference equals the model here: the masked KL is 0
    t = adapter.encode(method._targets[:2])
    with torch.no_grad():
        logits = adapter.model(**t).logits
        assert method.dual_masked_kl(ctx, logits, logits, t["labels"]).abs() < 1e-6
        assert method.dual_masked_kl(ctx, logits, logits + torch.randn_like(logits), t["labels"]) > 0


def test_eval_reproduces_the_runs_metrics(tmp_path, world_dir):
    from unlearn.run_mllm import evaluate_run

    metrics = _run(tmp_path, world_dir, "fttp")
    again = evaluate_run(tmp_path / "fttp", world_dir=world_dir, world_config=WORLD)
    for key in ("efficacy", "em", "specificity", "diversity"):
        assert again[key] == metrics[key], key
    assert abs(again["K_C"] - metrics["K_C"]) < 1e-4 * max(1.0, abs(metrics["K_C"]))
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        evaluate_run(tmp_path)


def test_traced_run_writes_a_trace(tmp_path, world_dir):
    from knowtrace.store import open_trace

    _run(tmp_path, world_dir, "ga", trace=True)
    ds = open_trace(tmp_path / "ga" / "trace.zarr")
    assert ds.sizes["step"] == 2 and ds.attrs["method"]["name"] == "ga" and ds.attrs["seed"] == 0
    assert ds.sizes["sample"] == 6  # every forget record is a traced sample


def test_non_finite_gradients_stop_before_the_update(world_dir):
    adapter, concept, forget, _ = _setup(world_dir)

    class BadGrad(type(get_method("ga"))):
        def loss(self, ctx, records):
            out = super().loss(ctx, records)
            loss = out.loss
            if ctx.step == 1:  # a finite loss (sqrt(0) = 0) whose gradient is not (0 * 1/sqrt(0) = nan)
                p = next(p for p in ctx.adapter.model.parameters() if p.requires_grad)
                loss = loss + torch.sqrt((p * 0).sum())
            return replace(out, loss=loss)

    with pytest.raises(NonFiniteError, match="gradients are non-finite at step 1"):
        run_loop(adapter, BadGrad(), forget, [], TrainConfig(steps=3), concept.key, concept.names, progress=False)
    assert all(torch.isfinite(p).all() for p in adapter.model.parameters())


def test_fttp_only_the_ratio_of_alpha_to_beta_matters_under_adam(tmp_path, world_dir):
    """Why the documented defaults are a ratio: Adam's update ignores a common scale of the loss."""
    def adapter_weights(name, alpha, beta):
        _run(tmp_path, world_dir, "fttp", name, options={"alpha": alpha, "beta": beta, "lr": 3e-3})
        return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

    a, b, c = adapter_weights("a", 1.0, 1.0), adapter_weights("b", 2.0, 2.0), adapter_weights("c", 2.0, 0.5)

    def distance(x, y):
        return sum(float((x[k] - y[k]).norm() ** 2) for k in x) ** 0.5

    # equal up to Adam's epsilon (1e-8), which matters a little for LoRA-A's tiny second-step gradients
    assert distance(a, b) < 0.05 * distance(a, c)
