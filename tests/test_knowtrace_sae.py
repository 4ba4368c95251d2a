"""Sparse autoencoders in knowtrace: the TopK encoding against a hand computation, training on data with a
known sparse dictionary, the quality figures, SAELens' layout and its errors, and the residual capture at
image / question / answer positions against the forward's own hidden states (LLaVA and Qwen2-VL)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from knowtrace import ProbeSet, open_probe_trace, open_trace, trace
from knowtrace.sae import SAE_CFG_FILE, SAE_WEIGHTS_FILE, TopKSAE, load_sae, sae_quality, save_sae, train_sae
from knowtrace.sae_capture import SAEOptions, capture_residuals, residual_module
from tests.test_models import _records
from tests.tiny_models import tiny_llava, tiny_qwen2vl
from unlearn.models import adapter_for
from unlearn.tracing import traced_samples

FAMILIES = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2vl}


def random_sae(d_in=6, d_sae=10, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d_in, d_sae, k)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return sae


def sparse_data(n=4096, d=32, atoms=64, active=3, seed=0):
    """Rows that are sums of ``active`` of ``atoms`` unit directions with positive weights, scaled and shifted
    (so that a trainer that forgets the input normalisation or the decoder bias shows)."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    which = torch.rand(n, atoms, generator=g).argsort(1)[:, :active]
    weights = torch.rand(n, active, generator=g) * 2 + 0.5
    return (weights[..., None] * dictionary[which]).sum(1) * 5 + 3


def test_topk_encode_keeps_the_k_largest_and_equals_a_hand_computation():
    sae = random_sae()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().numpy().astype(np.float64)
                                  for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    pre = (x.numpy() - b_dec) @ W_enc + b_enc
    acts = np.zeros_like(pre)
    for r in range(5):
        top = np.argsort(-pre[r])[:3]
        acts[r, top] = np.maximum(pre[r, top], 0)
    recon, z = sae(x)
    np.testing.assert_allclose(z.detach().numpy(), acts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(recon.detach().numpy(), acts @ W_dec + b_dec, rtol=1e-5, atol=1e-5)
    # rows whose top 3 pre-activations are all positive keep exactly 3 features
    positive = np.sort(pre, 1)[:, -3] > 0
    assert positive.any() and ((z != 0).sum(1).numpy()[positive] == 3).all()
    assert ((z != 0).sum(1) <= 3).all()
    with torch.no_grad():
        sae.b_enc -= 1e3  # every pre-activation negative: ReLU leaves nothing
    assert not sae.encode(x).any()
    with pytest.raises(ValueError, match="k must be in 1..d_sae=10"):
        TopKSAE(6, 10, 11)


def test_training_reaches_high_explained_variance_on_a_known_sparse_dictionary_and_is_seeded():
    x = sparse_data()
    untrained = TopKSAE(32, 128, 4)  # zero weights: reconstructs b_dec = 0 only
    assert sae_quality(untrained, x)["explained_variance"] < 0
    sae = train_sae(x, 128, 4, steps=300, lr=3e-3, batch_size=256, seed=0, progress=False)
    quality = sae_quality(sae, x)
    assert quality["explained_variance"] > 0.9, quality  # one step (steps=1) gives ~0.55 on this data
    assert quality["l0"] <= 4
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))  # unit decoder rows
    again = train_sae(x, 128, 4, steps=300, lr=3e-3, batch_size=256, seed=0, progress=False)
    assert all(torch.equal(getattr(sae, n), getattr(again, n)) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    other = train_sae(x, 128, 4, steps=5, lr=3e-3, batch_size=256, seed=1, progress=False)
    assert not torch.equal(other.W_dec, train_sae(x, 128, 4, steps=5, lr=3e-3, batch_size=256, seed=0,
                                                  progress=False).W_dec)
    with pytest.raises(ValueError, match="NaN"):
        train_sae(torch.full((4, 3), float("nan")), 8, 2, progress=False)


def test_one_training_step_by_hand_and_the_scale_fold():
    """Step 1 of Adam moves each parameter by lr * g / (|g| + eps); the decoder's gradient loses its component
    along each row before, and the rows are renormalised after. Computed here with a dense decode."""
    x = sparse_data(n=64, d=8, atoms=12, active=2, seed=5)
    lr, seed, n_batch = 1e-2, 7, 32
    sae = train_sae(x, 16, 3, steps=1, lr=lr, batch_size=n_batch, seed=seed, progress=False)
    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(16, 8, generator=gen)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    scale = 8 ** 0.5 / x.pow(2).sum(1).mean().sqrt()
    batch = x[torch.randint(64, (n_batch,), generator=gen)] * scale
    params = {"W_enc": w_dec.T.clone(), "b_enc": torch.zeros(16), "W_dec": w_dec.clone(), "b_dec": x.mean(0) * scale}
    for p in params.values():
        p.requires_grad_(True)
    pre = (batch - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    top, index = pre.topk(3, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, index, top.relu())
    ((z @ params["W_dec"] + params["b_dec"] - batch).pow(2).sum(1).mean() / 8).backward()
    g = params["W_dec"].grad
    g = g - (g * w_dec).sum(1, keepdim=True) * w_dec
    step = {name: p.grad for name, p in params.items()} | {"W_dec": g}
    new = {name: (params[name] - lr * step[name] / (step[name].abs() + 1e-8)).detach() for name in params}
    new["W_dec"] = new["W_dec"] / new["W_dec"].norm(dim=1, keepdim=True)
    torch.testing.assert_close(sae.W_dec, new["W_dec"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sae.W_enc, new["W_enc"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sae.b_enc, new["b_enc"] / scale, rtol=1e-4, atol=1e-6)  # folded back
    torch.testing.assert_close(sae.b_dec, new["b_dec"] / scale, rtol=1e-4, atol=1e-6)


def test_quality_figures_equal_a_hand_computation():
    sae = random_sae(d_in=4, d_sae=8, k=2, seed=3)
    with torch.no_grad():
        sae.b_enc[5] = -1e6  # feature 5 never fires: dead
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(2))
    recon, z = (t.detach().double().numpy() for t in sae(x))
    xn = x.double().numpy()
    q = sae_quality(sae, x, batch_size=7)  # several batches
    err = ((xn - recon) ** 2).sum()
    assert q["explained_variance"] == pytest.approx(1 - err / ((xn - xn.mean(0)) ** 2).sum(), rel=1e-6)
    assert q["mse"] == pytest.approx(err / xn.size, rel=1e-6)
    assert q["l0"] == pytest.approx((z != 0).sum() / 50)
    assert q["dead_fraction"] == pytest.approx((~(z != 0).any(0)).mean()) and q["dead_fraction"] >= 1 / 8
    assert q["rows"] == 50


def test_save_load_round_trip_in_saelens_layout_and_wrong_model_or_layer(tmp_path):
    sae = random_sae(d_in=6, d_sae=10, k=3)
    out = save_sae(sae, tmp_path / "sae", model_name="world", hook_name="model.language_model.layers.1", layer=1,
                   positions=("image", "answer"), context_size=40, dataset_path="world:grom",
                   extra={"quality": {"l0": 3.0}})
    assert sorted(p.name for p in out.iterdir()) == [SAE_CFG_FILE, SAE_WEIGHTS_FILE]
    cfg = json.loads((out / SAE_CFG_FILE).read_text())
    # what SAELens 5.x's SAEConfig and 6.x's pre-6.0 conversion read (knowtrace/sae.py names the commits)
    assert {k: cfg[k] for k in ("architecture", "d_in", "d_sae", "k", "activation_fn_str", "activation_fn_kwargs",
                                "apply_b_dec_to_input", "normalize_activations", "model_name", "hook_name",
                                "hook_layer", "context_size", "dtype", "dataset_path", "finetuning_scaling_factor",
                                "hook_head_index", "prepend_bos")} == {
        "architecture": "topk", "d_in": 6, "d_sae": 10, "k": 3, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": True, "normalize_activations": "none",
        "model_name": "world", "hook_name": "model.language_model.layers.1", "hook_layer": 1, "context_size": 40,
        "dtype": "float32", "dataset_path": "world:grom", "finetuning_scaling_factor": False,
        "hook_head_index": None, "prepend_bos": True}
    assert "sae_lens_version" not in cfg and cfg["knowtrace"]["positions"] == ["image", "answer"]
    weights = load_file(out / SAE_WEIGHTS_FILE)
    assert {n: tuple(w.shape) for n, w in weights.items()} == {"W_enc": (6, 10), "b_enc": (10,), "W_dec": (10, 6),
                                                                "b_dec": (6,)}
    loaded, read = load_sae(out, model_name="world", hook_name="model.language_model.layers.1", layer=1)
    assert loaded.k == 3 and read["knowtrace"]["quality"] == {"l0": 3.0}
    assert all(torch.equal(getattr(loaded, n), getattr(sae, n)) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    with pytest.raises(ValueError, match="model_name 'world', not 'llava-hf/llava-1.5-7b-hf'"):
        load_sae(out, model_name="llava-hf/llava-1.5-7b-hf")
    with pytest.raises(ValueError, match=r"hook_name 'model.language_model.layers.1', not '.*layers.2'"):
        load_sae(out, hook_name="model.language_model.layers.2")
    with pytest.raises(ValueError, match="hook_layer 1, not 3"):
        load_sae(out, layer=3)
    with pytest.raises(ValueError, match="model_name and hook_name"):
        save_sae(sae, tmp_path / "none", model_name="", hook_name="h", layer=0, positions=("answer",))
    assert not (tmp_path / "none").exists()


def test_a_directory_that_is_not_an_sae_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_sae(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no cfg.json"):
        load_sae(tmp_path)
    out = save_sae(random_sae(), tmp_path / "sae", model_name="m", hook_name="h", layer=0, positions=("answer",))
    weights = load_file(out / SAE_WEIGHTS_FILE)
    save_file({**weights, "W_dec": torch.zeros(10, 5)}, out / SAE_WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"'W_dec': \(10, 5\)"):
        load_sae(out)
    cfg = json.loads((out / SAE_CFG_FILE).read_text())
    (out / SAE_CFG_FILE).write_text(json.dumps({**cfg, "architecture": "standard", "activation_fn_str": "relu"}))
    with pytest.raises(ValueError, match="not a TopK SAE"):
        load_sae(out)
    (out / SAE_CFG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sae(out)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    model, processor = FAMILIES[request.param]()
    adapter = adapter_for(model, processor)
    records = _records()  # two with an image, one text-only
    return model, adapter, records, adapter.encode(records)


def test_residual_module_output_is_the_layers_hidden_state(family):
    model, _, _, batch = family
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    for layer in range(model.config.text_config.num_hidden_layers):  # the last one: after the final norm
        seen = {}
        _, module = residual_module(model, layer)
        handle = module.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
        with torch.no_grad():
            model(**batch)
        handle.remove()
        assert torch.equal(seen["out"], hidden[layer + 1])


def test_capture_gives_the_hidden_states_at_image_question_and_answer_positions(family):
    model, adapter, records, _ = family
    tok = adapter.tokenizer
    batches = [adapter.encode(records[:2]), adapter.encode(records[2:])]  # two batches, padded apart
    with torch.no_grad():
        hidden = [model(**b, output_hidden_states=True).hidden_states for b in batches]
    at = [(b, r) for b, batch in enumerate(batches) for r in range(batch["input_ids"].shape[0])]  # record -> row
    res = capture_residuals(model, batches, layer=0, positions=("answer", "image", "question"), progress=False)
    assert res.acts.dtype == torch.float32 and res.acts.shape[1] == hidden[0][1].shape[-1]
    assert res.context_size == max(b["input_ids"].shape[1] for b in batches)
    for i, record in enumerate(records):
        b, r = at[i]
        ids = batches[b]["input_ids"][r]
        for kind in ("image", "question", "answer"):
            rows = (res.record == i) & (res.kind == kind)
            pos = res.position[rows]
            assert torch.equal(res.acts[torch.from_numpy(rows)], hidden[b][1][r, torch.from_numpy(pos)])
            if kind == "image":  # the image placeholder tokens, all of them
                assert (ids[pos] == model.config.image_token_id).all()
                assert len(pos) == int((ids == model.config.image_token_id).sum())
                assert (len(pos) > 0) == (record.image is not None)
            elif kind == "answer":
                assert tok.decode(ids[pos], skip_special_tokens=True).strip() == record.answer
            else:  # the prompt: the question is in it, the answer starts right after
                assert record.question in tok.decode(ids[pos], skip_special_tokens=True)
                assert not (ids[pos] == model.config.image_token_id).any() and pos.min() == 0
                assert pos.max() + 1 == res.position[(res.record == i) & (res.kind == "answer")].min()
    question = capture_residuals(model, batches, layer=0, positions="question", progress=False)
    for i in range(len(records)):
        b, r = at[i]
        assert not (batches[b]["input_ids"][r, question.position[question.record == i]]
                    == model.config.image_token_id).any()
    only = capture_residuals(model, batches, layer=-1, positions="answer", progress=False)
    assert set(only.kind) == {"answer"}
    assert len(only.kind) == sum(int((b["labels"] != -100).sum()) for b in batches)
    first = only.record == 0
    assert torch.equal(only.acts[torch.from_numpy(first)], hidden[0][-1][0, torch.from_numpy(only.position[first])])


def test_capture_errors(family):
    model, _, _, batch = family
    with pytest.raises(ValueError, match="positions must be some of"):
        capture_residuals(model, [batch], 0, positions=("answers",), progress=False)
    with pytest.raises(ValueError, match="layer 2 does not exist: the language model has 2 decoder layers"):
        capture_residuals(model, [batch], 2, progress=False)
    with pytest.raises(ValueError, match="needs input_ids and labels"):
        capture_residuals(model, [{"input_ids": batch["input_ids"]}], 0, progress=False)


def test_a_text_model_captures_question_and_answer_but_has_no_image_positions():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[0, 4:], labels[1, 5:] = ids[0, 4:], ids[1, 5:]
    res = capture_residuals(model, [{"input_ids": ids, "labels": labels}], 1, ("question", "answer"), progress=False)
    assert res.kind.tolist() == ["question"] * 4 + ["answer"] * 3 + ["question"] * 5 + ["answer"] * 2
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    assert torch.equal(res.acts, hidden.reshape(14, 16))
    with pytest.raises(ValueError, match="no image_token_id / image_token_index"):
        capture_residuals(model, [{"input_ids": ids, "labels": labels}], 1, "image", progress=False)


def test_probes_record_sae_feature_activations_at_the_answer_predicting_positions(family, tmp_path):
    model, adapter, records, batch = family
    d = model.config.text_config.hidden_size
    sae = random_sae(d_in=d, d_sae=24, k=6, seed=4)
    features = (3, 0, 17, 9)
    samples = traced_samples(adapter, records, ("Vorn",))
    probes = ProbeSet([adapter.encode(records[:2]), adapter.encode(records[2:])], samples, every=1)
    with trace(model, tmp_path / "t.zarr", samples, probes=probes, sae=SAEOptions(sae, 1, features)) as tr:
        with torch.no_grad():
            model(**batch)
        assert tr.record(0, [r.id for r in records])
    main, probe = open_trace(tmp_path / "t.zarr"), open_probe_trace(tmp_path / "t.zarr")
    assert "sae_act" not in main and probe.sae_act.dims == ("step", "sample", "token", "feature")
    assert probe.feature.values.tolist() == list(features)
    for b, (start, sub) in enumerate(((0, probes.batches[0]), (2, probes.batches[1]))):
        with torch.no_grad():  # layer 1 is the last: its residual is the state after the final norm
            state = model(**sub, output_hidden_states=True).hidden_states[2]
        for r in range(sub["input_ids"].shape[0]):
            answer = (sub["labels"][r] != -100).nonzero().squeeze(1)
            expected = sae.encode(state[r, answer - 1])[:, list(features)].detach()
            got = probe.sae_act.values[0, start + r]
            np.testing.assert_allclose(got[: len(answer)], expected.numpy(), rtol=1e-5, atol=1e-6)
            assert np.isnan(got[len(answer):]).all() and (got[: len(answer)] != 0).any()
    with pytest.raises(ValueError, match="give probes= with sae="):
        trace(model, tmp_path / "u.zarr", samples, sae=SAEOptions(sae, 1, features))
    with pytest.raises(ValueError, match=r"distinct indices in 0..23"):
        SAEOptions(sae, 1, (24,))
    with pytest.raises(ValueError, match="another model"):
        trace(model, tmp_path / "v.zarr", samples, probes=probes, sae=SAEOptions(random_sae(d_in=d + 1), 0, (1,)))
