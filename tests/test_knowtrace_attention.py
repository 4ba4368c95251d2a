"""MLLM cross-attention capture: maps equal eager attention weights; outputs and gradients unchanged;
the original attention implementation restored on exit and after an exception."""

import copy

import numpy as np
import pytest
import torch

from knowtrace import AttentionOptions, trace
from knowtrace.mllm_attention import _CAPTURES
from knowtrace.store import open_trace
from tests.test_models import _records
from tests.tiny_models import tiny_llava, tiny_qwen2vl
from unlearn.models import adapter_for
from unlearn.tracing import traced_samples

FAMILIES = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2vl}


def _setup(family, kv_heads=None, impl="sdpa"):
    model, processor = FAMILIES[family]()
    if kv_heads is not None:  # grouped-query attention: fewer key/value heads than query heads
        cfg = copy.deepcopy(model.config)
        cfg.text_config.num_key_value_heads = kv_heads
        torch.manual_seed(0)
        model = type(model)(cfg).eval()
    model.set_attn_implementation(impl)
    adapter = adapter_for(model, processor)
    return model, adapter


def _eager_maps(model, batch, layers):
    """Expected maps from an independent eager run: (row -> (layer, heads, n_answer, gy*gx)) or None."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(**batch, output_attentions=True).attentions  # per layer (batch, heads, seq, seq)
    out = []
    for b in range(batch["input_ids"].shape[0]):
        cols = (batch["input_ids"][b] == model.config.image_token_id).nonzero().squeeze(1)
        rows = (batch["labels"][b] != -100).nonzero().squeeze(1) - 1  # the position predicting each answer token
        out.append(torch.stack([att[i][b][:, rows][:, :, cols] for i in layers]).numpy() if len(cols) else None)
    return out


@pytest.mark.parametrize("family,n_records,kv_heads,impl", [
    ("llava", 3, None, "sdpa"),  # right-padded batch: boolean mask
    ("llava", 1, None, "sdpa"),  # one sample, no padding: SDPA gets no mask (causal path)
    ("llava", 3, 1, "sdpa"),  # GQA
    ("llava", 3, None, "eager"),  # float additive mask
    ("qwen2_vl", 3, None, "sdpa"),
    ("qwen2_vl", 3, 1, "sdpa"),
])
def test_maps_equal_eager_weights_and_outputs_unchanged(tmp_path, family, n_records, kv_heads, impl):
    model, adapter = _setup(family, kv_heads, impl)
    records = _records()[:n_records] if n_records > 1 else _records()[2:]
    batch = adapter.encode(records)
    samples = traced_samples(adapter, records, ("Vorn",))
    model.train()  # outputs and gradients must be unchanged in training, not only in eval
    param = model.get_decoder().layers[0].self_attn.q_proj.weight
    ref = model(**batch)
    (ref_grad,) = torch.autograd.grad(ref.loss, param)
    options = AttentionOptions(layers=(0, -1), heads="all")
    with trace(model, tmp_path / "t.zarr", samples, attention=options) as tr:
        assert model.config.get_text_config()._attn_implementation == f"knowtrace_{impl}"
        got = model(**batch)
        (got_grad,) = torch.autograd.grad(got.loss, param)
        assert tr.record(0, [r.id for r in records])
    assert model.config.get_text_config()._attn_implementation == impl
    assert torch.equal(ref.logits, got.logits) and torch.equal(ref_grad, got_grad)
    model.eval()
    expected = _eager_maps(model, batch, [0, model.config.get_text_config().num_hidden_layers - 1])
    ds = open_trace(tmp_path / "t.zarr")
    assert list(ds.layer.values) == [0, 1] and ds.xattn_head.sizes["head"] == 2
    for b, exp in enumerate(expected):
        heads = ds.xattn_head.sel(step=0).values[b]  # (layer, head, token, y, x)
        if exp is None:  # a text-only record has no image columns
            assert np.isnan(heads).all()
            continue
        n = exp.shape[2]
        got_maps = heads[:, :, :n].reshape(*exp.shape)
        np.testing.assert_allclose(got_maps, exp, atol=1e-5)
        np.testing.assert_allclose(ds.xattn.sel(step=0).values[b][:, :n].reshape(exp.shape[0], n, -1),
                                   exp.mean(1), atol=1e-5)
        assert np.isnan(heads[:, :, n:]).all()  # answer padding
        assert exp.sum(-1).max() <= 1 + 1e-5 and exp.min() >= 0


def test_head_mean_and_grid_of_llava(tmp_path):
    model, adapter = _setup("llava")
    records = _records()
    samples = traced_samples(adapter, records, ("Vorn",))
    with trace(model, tmp_path / "t.zarr", samples, attention=True) as tr:  # last layer, head mean
        with torch.no_grad():
            model(**adapter.encode(records))
        tr.record(0, [r.id for r in records])
    ds = open_trace(tmp_path / "t.zarr")
    assert ds.xattn.dims == ("step", "sample", "layer", "token", "y", "x") and "xattn_head" not in ds
    assert (ds.sizes["y"], ds.sizes["x"]) == (4, 4) and list(ds.layer.values) == [1]  # 32 px / patch 8


def test_restored_after_an_exception_and_attaching_twice_is_an_error(tmp_path):
    model, adapter = _setup("llava")
    records = _records()
    samples = traced_samples(adapter, records, ("Vorn",))
    with pytest.raises(ValueError, match="boom"):
        with trace(model, tmp_path / "a.zarr", samples, attention=AttentionOptions(layers=(0,))):
            with pytest.raises(RuntimeError, match="already attached"):
                trace(model, tmp_path / "b.zarr", samples, attention=True).__enter__()
            assert model.config.get_text_config()._attn_implementation == "knowtrace_sdpa"  # first one intact
            raise ValueError("boom")
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert not model._forward_hooks and not model._forward_pre_hooks and not _CAPTURES
    with trace(model, tmp_path / "c.zarr", samples, attention=True) as tr:  # attachable again
        with tr.paused():  # detached for a while: original implementation, no hooks
            assert model.config.get_text_config()._attn_implementation == "sdpa" and not model._forward_hooks
            with torch.no_grad():
                model(**adapter.encode(records))
        assert model.config.get_text_config()._attn_implementation == "knowtrace_sdpa" and model._forward_hooks
        assert not tr.forwards.read()  # the paused forward was not captured


def test_bad_options_are_clear_errors(tmp_path):
    model, adapter = _setup("llava")
    samples = traced_samples(adapter, _records(), ("Vorn",))
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        trace(model, tmp_path / "t.zarr", samples, attention=AttentionOptions(layers=(5,)))
    with pytest.raises(ValueError, match="heads must be"):
        AttentionOptions(heads="max")
    model.config.get_text_config()._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        trace(model, tmp_path / "t.zarr", samples, attention=True).__enter__()
    assert not model._forward_hooks and not _CAPTURES
