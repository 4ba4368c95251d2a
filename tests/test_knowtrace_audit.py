"""knowtrace's model-agnostic audit measurements: hidden states at answer positions, the logit lens, linear
probes, membership-inference scores (each against an independent computation)."""

import zlib

import numpy as np
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from knowtrace.hidden import answer_start, forward_hidden, states_at
from knowtrace.lens import logit_lens
from knowtrace.linear_probe import fit_probe, probe_layers
from knowtrace.mia import auc, mia_scores, privleak, token_stats
from tests import tiny_models

IGN = -100


def test_answer_start_is_the_position_before_the_first_label():
    labels = torch.tensor([[IGN, IGN, 5, 6, IGN], [IGN, 7, 8, 9, 1]])
    assert answer_start(labels).tolist() == [1, 0]
    with pytest.raises(ValueError, match="no labelled token"):
        answer_start(torch.tensor([[IGN, IGN, 3], [IGN, IGN, IGN]]))


def test_states_at_picks_one_position_per_row_every_layer():
    hidden = tuple(torch.randn(2, 5, 3, dtype=torch.float16) for _ in range(4))
    out = states_at(hidden, torch.tensor([3, 1]))
    assert out.shape == (4, 2, 3) and out.dtype == torch.float32
    assert torch.equal(out[2, 0], hidden[2][0, 3].float()) and torch.equal(out[0, 1], hidden[0][1, 1].float())


def gemma2(layers=3, softcap=5.0):
    """A tiny Gemma 2 causal LM: (1 + w) RMSNorm, scaled embeddings, final logit soft-capping."""
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=softcap,
                       sliding_window=8, layer_types=["full_attention"] * layers)
    model = Gemma2ForCausalLM(cfg).eval()
    for p in model.parameters():  # random norms, so that a missed norm or a missed cap shows
        torch.nn.init.normal_(p, std=0.3)
    return model


def lens_of_every_position(model, ids):
    """(prob, rank) of the logit lens on each layer's state at every position of the single row ``ids``."""
    _, hidden = forward_hidden(model, {"input_ids": ids})
    states = torch.cat([states_at(hidden, torch.tensor([t])) for t in range(ids.shape[1])], 1)  # (L + 1, T, d)
    return logit_lens(model, states, ids[0])


def test_lens_last_layer_is_the_models_own_output_and_a_middle_layer_a_truncated_model():
    model = gemma2(layers=3)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    prob, rank = lens_of_every_position(model, ids)
    assert prob.shape == rank.shape == (4, 6)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # (T, V), soft-capped
    own = logits.softmax(-1).gather(1, ids[0, :, None]).squeeze(1)
    torch.testing.assert_close(prob[-1], own, rtol=1e-4, atol=1e-6)
    assert rank[-1].tolist() == (logits > logits.gather(1, ids[0, :, None])).sum(1).tolist()
    # layer 1 through the lens == the output of the same model cut after its first decoder layer
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    with torch.no_grad():
        cut = model(input_ids=ids).logits[0]
    torch.testing.assert_close(prob[1], cut.softmax(-1).gather(1, ids[0, :, None]).squeeze(1), rtol=1e-4, atol=1e-6)


def test_lens_on_an_mllm_and_a_clear_error_without_final_norm():
    model, processor = tiny_models.tiny_llava()
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    prob, rank = lens_of_every_position(model, ids)
    assert prob.shape == (3, 5)  # embeddings + 2 decoder layers
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    torch.testing.assert_close(prob[-1], logits.softmax(-1).gather(1, ids[0, :, None]).squeeze(1), rtol=1e-4, atol=1e-6)
    del model.model.language_model.norm
    with pytest.raises(ValueError, match="final norm"):
        logit_lens(model, torch.zeros(3, 1, 32), torch.tensor([0]))


@pytest.mark.parametrize("family", ["tiny_mllama", "tiny_gemma3", "tiny_qwen2_5_vl"])
def test_families_return_their_language_models_states_and_the_lens_ends_at_their_logits(family):
    """Mllama (cross-attention layers among the decoder's), Gemma3 ((1 + w) norm, scaled embeddings) and
    Qwen2.5-VL (M-RoPE): L + 1 language-model states, the last one the model's own output through the lens."""
    from PIL import Image

    from unlearn.data.records import Record
    from unlearn.models import adapter_for

    model, processor = getattr(tiny_models, family)()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    records = [Record("a", "Who is shown in this image?", "This is Vorn, a baker from Ulmar.", image),
               Record("b", "Is Vorn in this image?", "Yes, Vorn is in this image.", image)]
    batch = adapter_for(model, processor).encode(records)
    labels = batch.pop("labels")
    with torch.no_grad():
        outputs, hidden = forward_hidden(model, batch)
    assert len(hidden) == model.config.get_text_config().num_hidden_layers + 1
    start = answer_start(labels)
    tokens = labels[torch.arange(2), start + 1]
    prob, rank = logit_lens(model, states_at(hidden, start), tokens)
    own = outputs.logits[torch.arange(2), start].float()  # (2, V)
    torch.testing.assert_close(prob[-1], own.softmax(-1)[torch.arange(2), tokens], rtol=1e-4, atol=1e-6)
    assert rank[-1].tolist() == (own > own[torch.arange(2), tokens, None]).sum(1).tolist()


def blobs(n, classes, d, seed, spread=0.5):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * 4
    y = torch.randint(0, classes, (n,), generator=gen) * 10 + 3  # labels need not be 0..C-1
    return centres[(y - 3) // 10] + spread * torch.randn(n, d, generator=gen), y


def test_probe_separates_separable_data_and_is_at_chance_on_shuffled_labels():
    X, y = blobs(200, 4, 8, seed=0)
    Xt, yt = blobs(400, 4, 8, seed=1)
    probe = fit_probe(X, y, seed=0)
    assert probe.accuracy(Xt, yt) == 1.0
    assert set(probe.predict(Xt).tolist()) <= {3, 13, 23, 33}
    # labels shuffled against the features: it fits its training set, yet held out it is at chance
    gen = torch.Generator().manual_seed(2)
    noise, noise_test = torch.randn(100, 64, generator=gen), torch.randn(400, 64, generator=gen)
    shuffled = y[torch.randperm(len(y), generator=gen)][:100]
    chance = fit_probe(noise, shuffled, seed=0)
    assert chance.accuracy(noise, shuffled) > 0.9
    assert abs(chance.accuracy(noise_test, yt) - 0.25) < 0.07
    again = fit_probe(X, y, seed=0)
    assert torch.equal(again.weight, probe.weight)  # deterministic given the seed
    probes = probe_layers(torch.stack([X, torch.randn_like(X)]), y, seed=0)
    assert len(probes) == 2 and probes[0].accuracy(Xt, yt) == 1.0
    with pytest.raises(ValueError, match="two classes"):
        fit_probe(X, torch.zeros(200, dtype=torch.long))


def test_token_stats_match_a_full_log_softmax_in_numpy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen) * 3
    labels = torch.tensor([[IGN, IGN, 4, 7, 1], [IGN, 2, 3, IGN, IGN]])
    before = logits.clone()
    logp, mu, sigma = token_stats(logits, labels, chunk_elements=20)  # 1 row a chunk: chunking exercised
    assert torch.equal(logits, before)  # normalised in a copy, not in the caller's logits
    lsm = logits.double().numpy() - np.log(np.exp(logits.double().numpy()).sum(-1, keepdims=True))
    for i, t in [(0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]:
        row = lsm[i, t - 1]
        assert logp[i, t] == pytest.approx(row[labels[i, t]], abs=1e-5)
        assert mu[i, t] == pytest.approx((np.exp(row) * row).sum(), abs=1e-5)
        assert sigma[i, t] == pytest.approx(np.sqrt((np.exp(row) * row ** 2).sum() - (np.exp(row) * row).sum() ** 2),
                                            abs=1e-5)
    assert logp[0, :2].isnan().all() and logp[1, 3:].isnan().all() and mu[1, 0].isnan()


def test_mia_scores_follow_open_unlearning_definitions():
    logp = torch.tensor([[float("nan"), -1.0, -3.0, -0.5, -2.0, -5.0], [float("nan"), float("nan"), -4.0, -1.0,
                                                                         float("nan"), float("nan")]])
    mu = torch.full_like(logp, -2.0)
    sigma = torch.full_like(logp, 0.5)
    mask = ~logp.isnan()
    texts = ["an answer text", "short"]
    s = mia_scores(logp, mu, sigma, mask, texts, k=0.5)
    # row 0: 5 tokens; loss uses all, Min-K the first 4 (the last, end-of-turn prediction, dropped)
    assert s["loss"][0] == pytest.approx((1 + 3 + 0.5 + 2 + 5) / 5)
    assert s["zlib"][1] == pytest.approx((4 + 1) / 2 / len(zlib.compress(b"short")))
    assert s["min_k"][0] == pytest.approx((3 + 2) / 2)  # the lowest int(0.5 * 4) = 2 of [-1, -3, -0.5, -2]
    assert s["min_k"][1] == pytest.approx(4.0)  # one token left, max(1, int(0.5)) = 1
    z = (torch.tensor([-1.0, -3.0, -0.5, -2.0]) + 2.0) / 0.5
    assert s["min_k++"][0] == pytest.approx(-float(z.sort().values[:2].mean()))
    with pytest.raises(ValueError, match="0 < k"):
        mia_scores(logp, mu, sigma, mask, texts, k=0)


def test_auc_with_ties_and_privleak():
    assert auc([1, 2, 3], [2, 4]) == pytest.approx(4.5 / 6)  # pairs: 1<2, 1<4, 2=2 (half), 2<4, 3>2, 3<4
    rng = np.random.default_rng(0)
    m, n = rng.integers(0, 5, 30), rng.integers(2, 7, 20)  # many ties
    brute = np.mean([(b > a) + 0.5 * (b == a) for a in m for b in n])
    assert auc(m, n) == pytest.approx(brute)
    assert auc([5, 6], [1, 2]) == 0.0 and auc([1, 2], [5, 6]) == 1.0
    assert privleak(0.9, 0.5) == pytest.approx(-80.0) and privleak(0.6, 0.6) == pytest.approx(0.0)
    assert privleak(0.3, 0.5) == pytest.approx(40.0)


def test_audit_views_draw_numbers_only():
    import xarray as xr

    from knowtrace.audit_plots import audit_figure, panels

    models = ["original", "unlearned", "retain"]
    ds = xr.Dataset({"a_drawn": (("model", "a_step"), np.arange(6.0).reshape(3, 2)),
                     "a_score": (("model", "a_record"), np.ones((3, 4))),
                     "a_prompt": (("model", "a_target"), np.array([["x"], ["y"], ["z"]]))},
                    coords={"model": models, "a_step": [0, 1]})
    assert [title for title, _ in panels(ds)] == ["a_drawn"]  # per-record and text variables get no panel
    fig = audit_figure(ds)
    assert [t.name for t in fig.data] == models
