"""Integrated-gradients attribution to image patches (knowtrace.attribution, captum's LayerIntegratedGradients):
against a hand computation of the Riemann sum with torch.autograd, the completeness property against forwards
at the input and at the baseline, the patch grid, probe mode's ``attr`` / ``attr_delta``, determinism and the
errors (LLaVA and Qwen2-VL tiny models)."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from knowtrace import plots
from knowtrace import AttributionOptions, ImageAttribution, ProbeSet, open_probe_trace, open_trace, trace
from knowtrace.mllm_attention import language_model
from tests.test_models import _records
from tests.tiny_models import tiny_llava, tiny_qwen2vl
from unlearn.models import adapter_for
from unlearn.tracing import traced_samples

FAMILIES = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2vl}
GRIDS = {"llava": (4, 4), "qwen2_vl": (2, 2)}  # 32 px / patch 8; 56 px / patch 14 / merge 2


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    model, processor = FAMILIES[request.param]()
    adapter = adapter_for(model, processor)
    records = _records()  # two with an image, one text-only
    return request.param, model, adapter, records, adapter.encode(records)


def first_layer_input(model, batch):
    """(rows, seq, d): what the first decoder layer receives in a forward of ``batch``."""
    seen = {}
    layer = language_model(model).layers[0]
    handle = layer.register_forward_pre_hook(lambda m, args: seen.setdefault("h", args[0].detach().clone()))
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    return seen["h"]


def logprob_with_first_layer_input(model, batch, hidden, positions, tokens):
    """(rows,) log p(token | prefix) scored at ``positions`` when the first decoder layer receives ``hidden``."""
    layer = language_model(model).layers[0]
    handle = layer.register_forward_pre_hook(lambda m, args: (hidden, *args[1:]))
    try:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    finally:
        handle.remove()
    rows = torch.arange(logits.shape[0])
    return logits[rows, positions].float().log_softmax(-1)[rows, tokens]


def answer_token(batch, t):
    """Per row: the position predicting answer token ``t`` and its id (rows with an answer that long)."""
    positions, tokens = [], []
    for lab in batch["labels"]:
        p = int((lab != -100).nonzero()[t])
        positions.append(p - 1)
        tokens.append(int(lab[p]))
    return torch.tensor(positions), torch.tensor(tokens)


def image_rows(model, batch):
    return [r for r in range(batch["input_ids"].shape[0]) if (batch["input_ids"][r] == model.config.image_token_id).any()]


def to_grid(values, ids, image_id, grid):
    """Row-major patch grid of per-position values at a row's image-token positions."""
    return values[ids == image_id].reshape(grid)


def test_attribution_equals_a_hand_riemann_sum_of_autograd_gradients(family):
    name, model, _, _, batch = family
    n, t = 6, 1
    got = ImageAttribution(model, AttributionOptions(n_steps=n, method="riemann_middle", tokens=(t,))).attribute(batch)
    x = first_layer_input(model, batch)
    image = batch["input_ids"] == model.config.image_token_id
    base = torch.where(image[..., None], torch.zeros_like(x), x)  # zeros at the image positions, text untouched
    positions, tokens = answer_token(batch, t)
    grads = torch.zeros_like(x)
    for k in range(n):  # midpoints of n equal steps along the straight path from base to x
        h = (base + (k + 0.5) / n * (x - base)).requires_grad_()
        logp = logprob_with_first_layer_input(model, batch, h, positions, tokens)
        grads += torch.autograd.grad(logp.sum(), h)[0]  # rows are independent: row r's gradient is its own
    attr = ((x - base) * grads / n).sum(-1)  # (rows, seq)
    for r in image_rows(model, batch):
        maps, delta = got[r]
        expected = to_grid(attr[r], batch["input_ids"][r], model.config.image_token_id, GRIDS[name])
        assert maps.shape[1:] == GRIDS[name]
        torch.testing.assert_close(maps[t], expected, rtol=1e-4, atol=1e-7)
        assert expected.abs().max() > 1e-5  # not a trivially zero map
        assert torch.isnan(maps[:t]).all() and torch.isnan(maps[t + 1:]).all() and torch.isnan(delta[:t]).all()
    assert [r for r, o in enumerate(got) if o is None] == [r for r in range(len(got)) if r not in image_rows(model, batch)]
    rows = batch["input_ids"].shape[0]  # the path in chunks of 2 points (captum's internal batches): the same maps
    chunked = ImageAttribution(model, AttributionOptions(n_steps=n, method="riemann_middle", tokens=(t,),
                                                         internal_batch_size=2 * rows)).attribute(batch)
    for r in image_rows(model, batch):
        torch.testing.assert_close(chunked[r][0][t], got[r][0][t], rtol=1e-5, atol=1e-8)


def attribute_counting_calls(model, batch, module, options):
    """(attribute's output, how many forwards of ``module`` it ran)."""
    calls = []
    handle = module.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        return ImageAttribution(model, options).attribute(batch), len(calls)
    finally:
        handle.remove()


def test_the_image_encoder_runs_once_and_the_maps_are_those_of_encoding_every_path_point(family):
    name, model, _, _, batch = family
    encoder = model.model.visual if name == "qwen2_vl" else model.model.vision_tower
    maps, calls = {}, {}
    for reuse in (True, False):
        options = AttributionOptions(n_steps=5, tokens=(0, 1), internal_batch_size=6, reuse_image_features=reuse)
        maps[reuse], calls[reuse] = attribute_counting_calls(model, batch, encoder, options)
    assert calls[True] == 1  # the input end point; the baseline and every chunk of the path reuse it
    assert calls[False] > 3  # both end points and every path chunk encode the images
    for r in image_rows(model, batch):
        for part in (0, 1):  # the maps and the deltas
            torch.testing.assert_close(maps[True][r][part], maps[False][r][part], rtol=1e-5, atol=1e-7, equal_nan=True)


def test_without_the_delta_the_end_points_stop_at_the_layer_and_the_maps_are_unchanged(family):
    name, model, _, _, batch = family
    last = language_model(model).layers[-1]
    got, calls = {}, {}
    for delta in (True, False):
        options = AttributionOptions(n_steps=4, tokens=(0, 1), delta=delta)
        got[delta], calls[delta] = attribute_counting_calls(model, batch, last, options)
    assert calls[True] == calls[False] + 2  # the two end-point forwards end at the first layer
    for r in image_rows(model, batch):
        torch.testing.assert_close(got[False][r][0], got[True][r][0], rtol=1e-6, atol=1e-8, equal_nan=True)
        assert torch.isnan(got[False][r][1]).all() and not torch.isnan(got[True][r][1][:2]).any()


@pytest.mark.parametrize("baseline", ["zeros", "mean"])
def test_a_map_sums_to_the_logprob_change_from_the_baseline_within_the_delta(family, baseline):
    name, model, _, _, batch = family
    got = ImageAttribution(model, AttributionOptions(n_steps=24, tokens=(0, 2), baseline=baseline)).attribute(batch)
    x = first_layer_input(model, batch)
    image = batch["input_ids"] == model.config.image_token_id
    if baseline == "zeros":
        b = torch.zeros_like(x)
    else:  # every image position holds the row's mean image-position representation
        w = image[..., None].float()
        b = ((x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)).expand_as(x)
    base = torch.where(image[..., None], b, x)
    largest = 0.0
    for t in (0, 2):
        positions, tokens = answer_token(batch, t)
        with torch.no_grad():
            change = (logprob_with_first_layer_input(model, batch, x, positions, tokens)
                      - logprob_with_first_layer_input(model, batch, base, positions, tokens))
        for r in image_rows(model, batch):
            maps, delta = got[r]
            total = maps[t].sum()
            largest = max(largest, abs(float(change[r])))
            # the delta is captum's completeness gap, f(input) - f(baseline) taken from captum's own end-point
            # forwards: it equals the gap measured here with independent forwards
            assert abs(float(total - change[r]) - float(delta[t])) < 1e-6
            assert abs(delta[t]) < 1e-3 * abs(change[r]) + 1e-6  # and the path integral has converged
    assert largest > 3e-4  # the image matters to these tokens (far above the tolerances)


def test_probe_mode_writes_attr_on_the_patch_grid_at_its_steps_and_is_deterministic(family, tmp_path):
    name, model, adapter, records, batch = family
    samples = traced_samples(adapter, records, ("Vorn",))
    probes = ProbeSet([adapter.encode(records[:2]), adapter.encode(records[2:])], samples, every=1)
    options = AttributionOptions(every=2, n_steps=4, tokens=(0, 1))
    paths = [tmp_path / "a.zarr", tmp_path / "b.zarr"]
    for path in paths:
        with trace(model, path, samples, probes=probes, attribution=options, attention=True) as tr:
            for step in range(3):
                with torch.no_grad():
                    model(**batch)
                assert tr.record(step, [r.id for r in records])
    main, probe = open_trace(paths[0]), open_probe_trace(paths[0])
    assert "attr" not in main and "attr_delta" not in main
    assert probe.attr.dims == ("step", "sample", "token", "y", "x")
    assert probe.attr_delta.dims == ("step", "sample", "token")
    assert probe.step.values.tolist() == [0, 1, 2]
    assert probe.attr.shape[-2:] == GRIDS[name] == probe.xattn.shape[-2:]
    assert probe.sample_id.values.tolist() == [r.id for r in records]
    attr = probe.attr.values
    assert np.isnan(attr[1]).all()  # step 1: no attribution (every=2)
    np.testing.assert_array_equal(attr[0], attr[2])  # the model did not change between the probes
    np.testing.assert_array_equal(attr, open_probe_trace(paths[1]).attr.values)  # same inputs, same maps
    direct = ImageAttribution(model, options)
    for start, sub in ((0, probes.batches[0]), (2, probes.batches[1])):
        for r, out in enumerate(direct.attribute(sub)):
            got = attr[0, start + r]
            if out is None:  # the text-only record
                assert np.isnan(got).all()
                continue
            maps, delta = out
            np.testing.assert_allclose(got[:2], maps[:2].numpy(), rtol=1e-5, atol=1e-8)
            np.testing.assert_allclose(probe.attr_delta.values[0, start + r, :2], delta[:2].numpy(), rtol=1e-4,
                                       atol=1e-9)
            assert np.isnan(got[2:]).all() and np.isfinite(got[:2]).all()
    # the Plotly view: one frame per step with attribution, the sum over the chosen tokens, a symmetric scale
    fig = plots.attribution_slider(probe, sample=0, tokens=[0, 1])
    assert [f.name for f in fig.frames] == ["0", "2"]
    np.testing.assert_allclose(np.asarray(fig.frames[1].data[0].z), attr[2, 0, :2].sum(0), rtol=1e-6)
    heat = fig.data[0]
    assert heat.zmin == -heat.zmax and heat.zmax == pytest.approx(np.abs(attr[[0, 2], 0, :2].sum(1)).max())
    with pytest.raises(ValueError, match="no answer token of sample 1"):
        plots.attribution_slider(probe, sample=1)  # the text-only record
    with pytest.raises(plots.MissingVariableError, match="this trace has no attr: trace with probes and attribution"):
        plots.attribution_slider(main)


def test_errors_come_before_anything_is_written(family, tmp_path):
    _, model, adapter, records, batch = family
    samples = traced_samples(adapter, records, ("Vorn",))
    probes = ProbeSet([batch], samples, every=2)
    shortest = min(len(s.token_ids) for s in samples)
    with pytest.raises(ValueError, match=rf"tokens \[{shortest}\] are outside the answer of sample"):
        trace(model, tmp_path / "t.zarr", samples, probes=probes, attribution=AttributionOptions(tokens=(0, shortest)))
    with pytest.raises(ValueError, match="give probes= with attribution="):
        trace(model, tmp_path / "t.zarr", samples, attribution=AttributionOptions())
    with pytest.raises(ValueError, match="must be a multiple of the probes' every=2"):
        trace(model, tmp_path / "t.zarr", samples, probes=probes, attribution=AttributionOptions(every=3))
    assert not (tmp_path / "t.zarr").exists()
    for bad, match in ((dict(n_steps=0), "n_steps must be an integer >= 1"),
                       (dict(n_steps=1, method="riemann_middle"), "Riemann sums need n_steps >= 2"),
                       (dict(tokens=(-1,)), "distinct answer-token indices"), (dict(baseline="blur"), "baseline must"),
                       (dict(method="euler"), "method must be one of"), (dict(every=0), "every must be >= 1")):
        with pytest.raises(ValueError, match=match):
            AttributionOptions(**bad)


def test_a_model_without_an_image_token_is_an_error():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    with pytest.raises(ValueError, match="no image_token_id / image_token_index"):
        ImageAttribution(model)


@pytest.mark.parametrize("family,match", [("tiny_idefics2", "perceiver resampler's latents"),
                                          ("tiny_mllama", "enters through cross-attention layers")])
def test_image_positions_with_no_patch_grid_are_an_error(family, match):
    """Attribution maps need image-token positions that are the image's patches: Idefics2's perceiver latents and
    Mllama's cross-attention keys are refused, saying why."""
    from tests import tiny_models

    model, _ = getattr(tiny_models, family)()
    with pytest.raises(ValueError, match=match):
        ImageAttribution(model)


@pytest.mark.parametrize("name", ["aya_vision", "gemma3", "idefics3", "internvl", "llava_next", "llava_onevision",
                                  "paligemma", "qwen2_5_vl", "qwen3_vl"])
def test_every_family_attributes_with_its_encoder_run_once(name, tmp_path):
    """On each image-token family: finite maps on the family's grid, the vision tower run once per call when its
    output is reused (Qwen3-VL's per-image deepstack features tiled too), and the same maps as without reuse."""
    from tests.test_families import FAMILIES as ALL, load_records, record_dir

    model, processor = ALL[name][0]()
    adapter = adapter_for(model, processor)
    batch = adapter.encode(load_records(record_dir(tmp_path / "data"))[:3])
    tower = next(getattr(model.model, n) for n in ("visual", "vision_tower", "vision_model") if hasattr(model.model, n))
    maps, calls = {}, {}
    for reuse in (True, False):
        options = AttributionOptions(n_steps=4, tokens=(0,), internal_batch_size=8, reuse_image_features=reuse)
        maps[reuse], calls[reuse] = attribute_counting_calls(model, batch, tower, options)
    assert calls[True] == 1 and calls[False] > 1
    rows = [r for r, o in enumerate(maps[True]) if o is not None]
    assert rows and [r for r, o in enumerate(maps[False]) if o is not None] == rows
    for r in rows:
        assert tuple(maps[True][r][0].shape[1:]) == ALL[name][1] and torch.isfinite(maps[True][r][0][0]).all()
        torch.testing.assert_close(maps[True][r][0], maps[False][r][0], rtol=1e-4, atol=1e-6, equal_nan=True)
