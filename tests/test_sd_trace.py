"""`unlearn sd --trace` and `unlearn eval` of SD runs, on the cached world SD: the trace's steps, its K
values against :func:`unlearn.eval.sd.forget_knowledge` (same noise), FTTP lowering K_C more than K_N
over a few steps, a trace for a method without a pixel error of the forget images (ESD-x) that
leaves training unchanged, and re-evaluation reproducing the run's metrics."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from knowtrace import open_trace
from unlearn.cli import main
from unlearn.eval.sd import forget_knowledge
from unlearn.loop import TrainConfig, run_loop
from unlearn.methods import get_method
from unlearn.models.sd import load_sd_adapter
from unlearn.run_sd import run_sd
from unlearn.sd_tracing import SDTraceCallback
from unlearn.world.concepts import BY_KEY
from unlearn.world.records import world_sd_data
from unlearn.world.source import resolve_model

STEPS = 4


@pytest.fixture(scope="module")
def fttp_run(tmp_path_factory):
    """A traced FTTP run on the cached world SD: 4 steps, 2 images of Vorn, lr 1e-4 (full UNet)."""
    out = tmp_path_factory.mktemp("sd") / "run"
    metrics = run_sd("vorn", "fttp", out, steps=STEPS, images=2, eval_seeds=2, fd_seeds=2, retained=["blip", "korvex"],
                     options={"lr": "1e-4"}, progress=False, trace=True)
    return out, metrics


def test_trace_steps_and_knowledge_match_the_evaluation(fttp_run):
    out, metrics = fttp_run
    ds = open_trace(out / "trace.zarr")
    assert ds.step.values.tolist() == list(range(-1, STEPS))
    assert ds.eps_err.dims == ("step", "sample", "y", "x") and ds.eps_err.shape == (STEPS + 1, 2, 16, 16)
    assert list(ds.sample_id.values) == json.loads((out / "manifest.json").read_text())["records"]["forget"]
    assert not np.isnan(ds.K_C.values).any() and not np.isnan(ds.loss_forget.values[1:]).any()
    assert np.isnan(ds.loss_forget.values[0])  # step -1 is before any training step
    # step -1 is the starting model at forget_knowledge's noise: K per record equals the evaluation's
    a = load_sd_adapter(resolve_model("world", "sd"))
    forget, _ = world_sd_data("vorn", 2, a.resolution)
    fresh = forget_knowledge(a.pipe, forget, adapter=a)["per_record"]
    for first, last, which in ((0, -1, "original"), (-1, None, "unlearned")):
        per = (metrics["original"] if which == "original" else metrics)["knowledge"]["per_record"]
        for i, rid in enumerate(ds.sample_id.values):
            kc, kn = float(ds.K_C.values[first, i]), float(ds.K_N.values[first, i])
            np.testing.assert_allclose([kc, kn], [per[rid]["K_C"], per[rid]["K_N"]], rtol=2e-3)  # float16 storage
            if which == "original":
                np.testing.assert_allclose([kc, kn], [fresh[rid]["K_C"], fresh[rid]["K_N"]], rtol=2e-3)
    # FTTP: K_C falls clearly over the steps, K_N much less
    drop_c = 1 - ds.K_C.values[-1].mean() / ds.K_C.values[0].mean()
    drop_n = 1 - ds.K_N.values[-1].mean() / ds.K_N.values[0].mean()
    assert drop_c > 0.03 and drop_c > 3 * abs(drop_n), (drop_c, drop_n)
    attrs = ds.attrs["capture"]  # open_trace decodes the JSON attrs
    assert attrs["timesteps"] == metrics["knowledge"]["settings"]["timesteps"] and attrs["noise_seed"] == 0


def test_eval_command_reproduces_the_run_metrics(fttp_run, capsys):
    out, metrics = fttp_run
    assert main(["eval", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    for key in ("ua", "fd", "K_C", "K_N", "retained"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-5), key
    assert again["steps"] == STEPS and again["method"] == "fttp"
    assert main(["eval", str(out / "nope")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_method_without_pixel_error_is_traced_and_trains_the_same(tmp_path):
    """ESD-x regresses onto a guided target (no per-pixel error of the forget images): the probe traces
    it, and the probe's own noise leaves training untouched (same weights as untraced)."""
    c = BY_KEY["vorn"]
    cfg = TrainConfig(steps=2, lr=1e-3, lora=False, batch_size=2)
    weights = {}
    for traced in (False, True):
        a = load_sd_adapter(resolve_model("world", "sd"))
        forget, _ = world_sd_data("vorn", 2, a.resolution)
        cb = SDTraceCallback(a, forget, tmp_path / "esd.zarr") if traced else None
        try:
            run_loop(a, get_method("esd_x", modality="sd"), forget, [], cfg, c.key, c.names,
                     callbacks=[cb] if cb else [], progress=False)
        finally:
            if cb:
                cb.flush()
        weights[traced] = {n: p.detach().clone() for n, p in a.model.named_parameters() if ".attn2." in n}
    for n, w in weights[False].items():
        torch.testing.assert_close(weights[True][n], w, rtol=0, atol=0)
    ds = open_trace(tmp_path / "esd.zarr")
    assert ds.step.values.tolist() == [-1, 0, 1] and not np.isnan(ds.eps_err.values).any()
    assert not np.array_equal(ds.eps_err.values[0], ds.eps_err.values[-1])  # the model moved, the probe saw it


def test_records_without_masks_are_a_clear_error(tmp_path):
    a = load_sd_adapter(resolve_model("world", "sd"))
    forget, _ = world_sd_data("vorn", 2, a.resolution)
    with pytest.raises(ValueError, match="needs a concept mask"):
        SDTraceCallback(a, [replace(forget[0], mask=None)], tmp_path / "t.zarr")
    assert not (tmp_path / "t.zarr").exists()


def test_trace_attention_records_the_probe_maps_over_prompt_tokens(tmp_path):
    """`--trace-attention`: xattn over the prompt's tokens with the concept's marked, equal to a direct
    capture of the same probe forwards, and the K values unchanged by recording it."""
    from knowtrace.sd_attention import capture_cross_attention
    from unlearn.sd_tracing import SDProbe

    a = load_sd_adapter(resolve_model("world", "sd"))
    forget, _ = world_sd_data("vorn", 2, a.resolution)
    names = BY_KEY["vorn"].names
    with_maps = SDTraceCallback(a, forget, tmp_path / "a.zarr", attention=True, names=names)
    without = SDTraceCallback(a, forget, tmp_path / "b.zarr")
    with_maps.flush(), without.flush()
    ds, plain = open_trace(tmp_path / "a.zarr"), open_trace(tmp_path / "b.zarr")
    assert ds.xattn.dims == ("step", "sample", "layer", "token", "y", "x") and "xattn" not in plain
    strs = [str(t) for t in ds.token_str.values[0]]
    concept = ds.is_concept.values[0]
    assert strs[0] == "<|startoftext|>" and strs[-1] == "<|endoftext|>"
    assert [s for s, c in zip(strs, concept) if c] == ["vorn</w>"]
    np.testing.assert_allclose(ds.K_C.values, plain.K_C.values)
    # the same inputs captured directly, one forward per timestep (the probe batches the timesteps):
    # mean over layers and timesteps on the latent grid
    probe, unet = SDProbe(a, forget), a.pipe.unet.eval()
    with capture_cross_attention(unet, mean_heads=True, to_cpu=True) as cap, torch.no_grad():
        for eps, t in zip(probe.noise, probe.timesteps):
            tt = torch.full((len(forget),), t)
            unet(a.noise_scheduler.add_noise(probe.latents, eps, tt), tt, encoder_hidden_states=probe.cond.text)
        direct = cap.maps(size=(16, 16))[:, :len(strs)]
    np.testing.assert_allclose(ds.xattn.values[0, :, 0], direct.numpy(), atol=2e-3)  # float16 storage


def test_fixed_noise_errors_are_the_same_in_any_batching_and_equal_one_forward_per_timestep():
    """The probe's (timestep, image) pairs may go through the UNet in any batch size: the errors equal
    the plain computation, one forward per timestep, and the UNet's modes are restored."""
    from unlearn.eval.sd import fixed_noise_errors
    from unlearn.sd_tracing import SDProbe

    a = load_sd_adapter(resolve_model("world", "sd"))
    forget, _ = world_sd_data("vorn", 3, a.resolution)
    probe, unet = SDProbe(a, forget), a.pipe.unet.eval()
    with torch.no_grad():
        plain = torch.stack([(eps - unet(a.noise_scheduler.add_noise(probe.latents, eps, torch.full((3,), t)),
                                         torch.full((3,), t), encoder_hidden_states=probe.cond.text).sample
                              ).pow(2).mean(1) for eps, t in zip(probe.noise, probe.timesteps)]).mean(0)
    unet.train()
    unet.down_blocks[0].eval()  # a submodule deliberately in eval mode
    for batch in (1, 4, 15, 64):
        err = fixed_noise_errors(a, unet, probe.latents, probe.cond, probe.noise, probe.timesteps, batch)
        assert err.shape == (3, 16, 16)
        torch.testing.assert_close(err, plain, atol=1e-5, rtol=1e-4)
    assert unet.training and unet.up_blocks[0].training and not unet.down_blocks[0].training
    with pytest.raises(ValueError, match="noise must be"):
        fixed_noise_errors(a, unet, probe.latents, probe.cond, probe.noise[:2], probe.timesteps)


def test_trace_every_k_steps_probes_those_steps_and_the_last(tmp_path):
    """every=3 over 7 steps probes steps -1, 2, 5 and 6 (the last), with the same K there as a trace
    of every step: fewer probes leave training and the probe's values unchanged."""
    c = BY_KEY["vorn"]
    cfg = TrainConfig(steps=7, lr=1e-4, lora=False, batch_size=2)
    traces = {}
    for every in (1, 3):
        a = load_sd_adapter(resolve_model("world", "sd"))
        forget, _ = world_sd_data("vorn", 2, a.resolution)
        cb = SDTraceCallback(a, forget, tmp_path / f"every{every}.zarr", every=every, steps=cfg.steps)
        try:
            run_loop(a, get_method("fttp", modality="sd"), forget, [], cfg, c.key, c.names, callbacks=[cb],
                     progress=False)
        finally:
            cb.flush()
        traces[every] = open_trace(tmp_path / f"every{every}.zarr")
    sparse, full = traces[3], traces[1]
    assert sparse.step.values.tolist() == [-1, 2, 5, 6] and full.step.values.tolist() == list(range(-1, 7))
    np.testing.assert_array_equal(sparse.K_C.values, full.K_C.sel(step=[-1, 2, 5, 6]).values)
    assert "every 3 steps and after the last" in sparse.attrs["capture"]["eps_err"]
    with pytest.raises(ValueError, match=">= 1"):
        SDTraceCallback(a, forget, tmp_path / "bad.zarr", every=0)
    assert not (tmp_path / "bad.zarr").exists()


@pytest.mark.parametrize("every,trace", [(0, True), (5, False)])
def test_bad_trace_every_is_a_clear_error_before_any_write(tmp_path, every, trace):
    with pytest.raises(ValueError, match="--trace-every K needs --trace"):
        run_sd("vorn", "fttp", tmp_path / "run", steps=2, trace=trace, trace_every=every, progress=False)
    assert not (tmp_path / "run").exists()


def test_trace_batch_sets_the_probe_batch_and_a_bad_one_is_a_clear_error(tmp_path, capsys):
    assert main(["sd", "--concept", "vorn", "--method", "fttp", "--steps", "1", "--trace", "--trace-batch", "0",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "trace_batch=0" in capsys.readouterr().err and not (tmp_path / "run").exists()
    a = load_sd_adapter(resolve_model("world", "sd"))
    forget, _ = world_sd_data("vorn", 2, a.resolution)
    small, default = (SDTraceCallback(a, forget, tmp_path / f"{n}.zarr", **kw) for n, kw in
                      (("small", {"batch_size": 3}), ("default", {})))
    small.flush(), default.flush()
    assert small.probe.batch_size == 3 and default.probe.batch_size == 16
    np.testing.assert_allclose(open_trace(tmp_path / "small.zarr").K_C.values,
                               open_trace(tmp_path / "default.zarr").K_C.values, rtol=1e-3)


def test_step_source_records_each_steps_own_errors_and_trains_the_same(tmp_path):
    """--trace-source step: the step's own errors of its batch (the other records NaN), K from them,
    no step -1, and training unchanged; a method without such errors is a clear error."""
    from knowtrace.knowledge import sd_knowledge
    from unlearn.sd_tracing import SDStepErrorCallback

    c = BY_KEY["vorn"]
    cfg = TrainConfig(steps=3, lr=1e-4, lora=False, batch_size=2)
    weights, seen = {}, []
    for traced in (False, True):
        a = load_sd_adapter(resolve_model("world", "sd"))
        forget, _ = world_sd_data("vorn", 4, a.resolution)
        method = get_method("fttp", modality="sd")
        cb = SDStepErrorCallback(a, method, forget, tmp_path / "step.zarr") if traced else None

        class Spy:  # the errors the method returned at each step, before the trace reads them
            def on_step_end(self, step, logs, state):
                seen.append((list(state.output.ids), state.output.per_element.clone()))

        try:
            run_loop(a, method, forget, [], cfg, c.key, c.names, callbacks=[Spy(), *([cb] if cb else [])],
                     progress=False)
        finally:
            if cb:
                cb.flush()
        weights[traced] = {n: p.detach().clone() for n, p in a.model.named_parameters()}
    for n, w in weights[False].items():
        torch.testing.assert_close(weights[True][n], w, rtol=0, atol=0)
    ds = open_trace(tmp_path / "step.zarr")
    assert ds.step.values.tolist() == [0, 1, 2]
    ids = list(ds.sample_id.values)
    masks = torch.from_numpy(ds.mask.values)
    for step, (batch_ids, err) in enumerate(seen[3:]):
        rows = [ids.index(i) for i in batch_ids]
        others = [r for r in range(len(ids)) if r not in rows]
        np.testing.assert_allclose(ds.eps_err.values[step, rows], err.numpy(), rtol=2e-3, atol=1e-6)  # float16
        assert np.isnan(ds.eps_err.values[step, others]).all() and np.isnan(ds.K_C.values[step, others]).all()
        kc, _ = sd_knowledge(err, masks[rows])
        np.testing.assert_allclose(ds.K_C.values[step, rows], kc.numpy(), rtol=2e-3)
    with pytest.raises(ValueError, match="computes none"):
        SDStepErrorCallback(a, get_method("esd_x", modality="sd"), forget, tmp_path / "esd.zarr")
    assert not (tmp_path / "esd.zarr").exists()
    with pytest.raises(ValueError, match="--trace-source step"):
        run_sd("vorn", "esd_x", tmp_path / "run", steps=2, trace=True, trace_source="step", progress=False)
    with pytest.raises(ValueError, match="no --trace-every"):
        run_sd("vorn", "fttp", tmp_path / "run", steps=2, trace_attention=True, trace_source="step", trace_every=2,
               progress=False)
    assert not (tmp_path / "run").exists()


def _eager_attn2_maps(unet, args, kwargs, size, width):
    """(B, tokens, h, w): the attn2 probabilities of one UNet call, computed apart from knowtrace by
    diffusers' classic processor (``get_attention_scores``), head mean, bilinear to ``size``, mean over
    layers, the first ``width`` text tokens."""
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())
    maps = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            def scores(query, key, mask=None, attn=module, score=module.get_attention_scores):
                probs = score(query, key, mask)  # (B * heads, h*w, tokens)
                b = probs.shape[0] // attn.heads
                p = probs.view(b, attn.heads, *probs.shape[1:]).mean(1)  # (B, h*w, tokens)
                side = int(p.shape[1] ** 0.5)
                grid = p.transpose(1, 2).reshape(b, -1, side, side)
                maps.append(torch.nn.functional.interpolate(grid.float(), size=size, mode="bilinear",
                                                            align_corners=False))
                return probs
            module.get_attention_scores = scores
    with torch.no_grad():
        unet(*args, **kwargs)
    return torch.stack(maps).mean(0)[:, :width]


def test_step_source_attention_is_the_steps_own_forward(tmp_path):
    """--trace-attention --trace-source step: each step's xattn rows are the maps of that step's own
    training forward (recomputed apart from knowtrace, with the step's parameters and inputs), the other
    rows NaN; training is bit-identical to an untraced run, and the processors are restored after."""
    import copy

    from unlearn.sd_tracing import SDStepErrorCallback

    c = BY_KEY["vorn"]
    cfg = TrainConfig(steps=2, lr=1e-4, lora=False, batch_size=2)
    weights, calls = {}, []
    for traced in (False, True):
        a = load_sd_adapter(resolve_model("world", "sd"))
        forget, _ = world_sd_data("vorn", 3, a.resolution)
        method = get_method("fttp", modality="sd")
        originals = {n: type(p) for n, p in a.model.attn_processors.items()}
        cb = SDStepErrorCallback(a, method, forget, tmp_path / "step.zarr", attention=True,
                                 names=c.names) if traced else None

        def keep(module, args, kwargs):  # the step's parameters and inputs, as its forward gets them
            calls.append((copy.deepcopy(module.state_dict()), [x.detach().clone() for x in args],
                          {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}))

        hook = a.model.register_forward_pre_hook(keep, with_kwargs=True) if traced else None
        try:
            run_loop(a, method, forget, [], cfg, c.key, c.names, callbacks=[cb] if cb else [], progress=False)
        finally:
            if cb:
                hook.remove()
                cb.close()
        weights[traced] = {n: p.detach().clone() for n, p in a.model.named_parameters()}
    for n, w in weights[False].items():
        torch.testing.assert_close(weights[True][n], w, rtol=0, atol=0)
    assert {n: type(p) for n, p in a.model.attn_processors.items()} == originals
    ds = open_trace(tmp_path / "step.zarr")
    assert ds.step.values.tolist() == [0, 1] and len(calls) == 2  # one forward per step
    assert ds.xattn.shape[:3] == (2, 3, 1)
    ids = list(ds.sample_id.values)
    size = tuple(ds.mask.shape[1:])
    for step, (state, args, kwargs) in enumerate(calls):
        unet = copy.deepcopy(a.model)
        unet.load_state_dict(state)
        width = ds.xattn.shape[3]
        expected = _eager_attn2_maps(unet, args, kwargs, size, width)  # (2, width, h, w)
        rows = [ids.index(r.id) for r in [forget[(2 * step + i) % 3] for i in range(2)]]
        for row, want in zip(rows, expected):
            n = int((ds.token_id.values[row] >= 0).sum())  # the prompt's own tokens
            np.testing.assert_allclose(ds.xattn.values[step, row, 0, :n], want[:n].numpy(), rtol=2e-3, atol=1e-5)
        others = [r for r in range(len(ids)) if r not in rows]
        assert np.isnan(ds.xattn.values[step, others]).all()
        assert not np.isnan(ds.xattn.values[step, rows, 0, 0]).any()
