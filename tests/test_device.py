"""Device-correct runs, proven on a CPU: the model "lives on cuda:0" (tests/fake_device.py: the data stays on
the CPU, so everything really computes), and any tensor a method, the loop, a tracer, a capture or an
evaluation creates or passes on the CPU instead makes the op fail as CUDA would. Host reads are counted."""

from __future__ import annotations

import pytest
import torch

from tests.fake_device import DEVICE, FakeDevice
from tests.tiny_models import tiny_llava
from unlearn.loop import TrainConfig, run_loop
from unlearn.methods import METHODS, SD_METHODS, get_method
from unlearn.models import LlavaAdapter
from unlearn.run_mllm import world_data
from unlearn.world.records import world_method_options


@pytest.fixture
def device(monkeypatch):
    """The fake device, active for the test; the accelerator places models there, as on a GPU machine."""
    from accelerate.state import AcceleratorState, PartialState

    init = PartialState.__init__

    def on_device(self, *args, **kwargs):  # accelerate's process state names the device every run moves to
        init(self, *args, **kwargs)
        self.device = DEVICE

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(PartialState, "__init__", on_device)
    try:
        with FakeDevice() as dev:
            yield dev
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # later tests get the real (CPU) state


@pytest.fixture(scope="module")
def mllm_data():
    return world_data("vorn", 1, image_size=32)


class Steps:
    """A loop callback (the first) keeping the toolkit's host reads counted up to each step's end."""

    def __init__(self, dev):
        self.dev, self.toolkit = dev, []

    def on_step_end(self, step, logs, state):
        self.toolkit.append(self.dev.toolkit)


# host reads per training step by the toolkit's own code (transformers' own, e.g. LLaVA checking its image
# tokens, are not counted): the loop's one read of the step's checks and logs, plus
READS_PER_STEP = {
    "fttp": 2,  # the concept flags of a batch not seen before (cached afterwards)
    "siu": 3,  # the same for its target batch, and the KL's scored positions (nonzero: a data-dependent shape)
    "ga_kl": 2,  # the KL's scored positions
}


@pytest.mark.parametrize("method", sorted(n for n, c in METHODS.items() if c.trains_weights))
def test_mllm_methods_train_on_the_device(method, device, mllm_data):
    concept, forget, retain = mllm_data
    model, processor = tiny_llava()
    adapter = LlavaAdapter(model.to(DEVICE), processor)
    options = {k: v for k, v in world_method_options("vorn").items() if k in get_method(method).__dataclass_fields__}
    steps = Steps(device)
    out = run_loop(adapter, get_method(method, **options), forget, retain, TrainConfig(steps=2, seed=0, lr=1e-3),
                   concept.key, concept.names, callbacks=[steps], progress=False)
    assert len(out["history"]) == 2 and all(type(v) is float for k, v in out["history"][1].items() if k != "step")
    assert all(p.device == DEVICE for p in adapter.model.parameters())
    assert steps.toolkit[1] - steps.toolkit[0] == READS_PER_STEP.get(method, 1), dict(device.sites)


def test_sauce_sets_up_and_edits_on_the_device(device, mllm_data, tmp_path):
    """SAUCE's capture, SAE loading, feature choice and edit hook on the device; a forward under the edit
    makes no host read of the toolkit's. (The SAE is given: training one calls torch's embedding_bag, whose
    own code makes an index tensor on the input's device, which the fake device cannot run.)"""
    from knowtrace.sae import TopKSAE, save_sae
    from knowtrace.sae_capture import residual_module
    from unlearn.intervene import apply_method

    concept, forget, retain = mllm_data
    model, processor = tiny_llava()
    sae = TopKSAE(32, 128, 8)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    save_sae(sae, tmp_path / "sae", model_name="tiny", hook_name=residual_module(model, 0)[0], layer=0,
             positions=("image", "question", "answer"))
    adapter = LlavaAdapter(model.to(DEVICE), processor)
    method = get_method("sauce", sae=str(tmp_path / "sae"), layer=0, features=4, rule="frequency")
    steps = Steps(device)
    out = apply_method(adapter, method, forget, retain, TrainConfig(seed=0), concept.key, concept.names,
                       callbacks=[steps], progress=False)
    assert out["history"][0]["step"] == 0 and method.chosen
    batch = adapter.encode(forget[:2])
    before = device.toolkit
    with torch.no_grad():
        adapter.model(**batch)
    assert device.toolkit == before, dict(device.sites)


def test_attribution_runs_on_the_device_with_two_host_reads(device, mllm_data):
    """Integrated gradients (every token in one captum call, the image encoder once, the head on the scored
    positions) on the device, with two host reads of the toolkit's per probe batch: the answer positions (ids
    and labels) and the final copy of the maps."""
    from knowtrace import AttributionOptions, ImageAttribution

    _, forget, _ = mllm_data
    model, processor = tiny_llava()
    adapter = LlavaAdapter(model.to(DEVICE), processor)
    batch = adapter.encode(forget[:2])
    before = device.toolkit
    out = ImageAttribution(adapter.model, AttributionOptions(n_steps=3, tokens=(0, 1))).attribute(batch)
    assert device.toolkit - before == 2, dict(device.sites)
    assert all(o is not None and o[0].device.type == "cpu" and torch.isfinite(o[0][:2]).all() for o in out)


@pytest.mark.parametrize("family,dtype", [("llava", torch.bfloat16), ("qwen2_vl", torch.float32)],
                         ids=["llava-bf16", "qwen2_vl-fp32"])
def test_traced_training_of_other_families_and_dtypes(family, dtype, device, mllm_data, tmp_path):
    """Qwen2-VL (image grid, M-RoPE token types) and a bf16 model: traced FTTP steps with attention probes."""
    from knowtrace import open_probe_trace
    from tests.tiny_models import tiny_qwen2vl
    from unlearn.models import adapter_for
    from unlearn.tracing import start_tracer

    concept, forget, _ = mllm_data
    model, processor = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2vl}[family]()
    adapter = adapter_for(model.to(DEVICE, dtype), processor)
    probes = [r for r in forget if r.image is not None][:2]
    tracer = start_tracer(adapter, tmp_path / "trace.zarr", forget, concept.names, {}, probes, attention=True)
    try:
        run_loop(adapter, get_method("fttp"), forget, [], TrainConfig(steps=2, lr=1e-3), concept.key, concept.names,
                 callbacks=[tracer], progress=False)
    finally:
        tracer.__exit__(None, None, None)
    probe = open_probe_trace(tmp_path / "trace.zarr")
    assert probe.sizes["step"] == 3 and bool(probe["K_C"].notnull().all())
    assert bool(probe["xattn"].notnull().all(("token", "y", "x")).any())


def test_the_loop_moves_the_model_and_its_reference(device, mllm_data):
    """A model handed over on the CPU: the loop places it, and the frozen copy full fine-tuning compares with."""
    concept, forget, _ = mllm_data
    model, processor = tiny_llava()
    adapter = LlavaAdapter(model, processor)
    run_loop(adapter, get_method("npo"), forget, [], TrainConfig(steps=1, lora=False, train_params="lm_head"),
             concept.key, concept.names, progress=False)
    assert all(p.device == DEVICE for p in adapter.model.parameters())


@pytest.mark.parametrize("snapshots", [True, False])
def test_a_broken_gradient_stops_the_run_with_good_parameters(snapshots, device, mllm_data, monkeypatch):
    """With the loop's copy of the parameters, the step's one read finds the broken gradient after the update
    and restores the copy; without one (large full fine-tuning), a read before each update keeps it out."""
    from dataclasses import replace

    import unlearn.loop
    from unlearn.loop import NonFiniteError

    if not snapshots:
        monkeypatch.setattr(unlearn.loop, "SNAPSHOT_LIMIT", 0)
    concept, forget, _ = mllm_data
    model, processor = tiny_llava()
    adapter = LlavaAdapter(model.to(DEVICE), processor)

    class BadGrad(type(get_method("ga"))):
        def loss(self, ctx, records):
            out = super().loss(ctx, records)
            if ctx.step == 1:  # a finite loss (sqrt(0) = 0) whose gradient is not (0 * 1/sqrt(0) = nan)
                p = next(p for p in ctx.adapter.model.parameters() if p.requires_grad)
                out = replace(out, loss=out.loss + torch.sqrt((p * 0).sum()))
            return out

    steps = Steps(device)
    with pytest.raises(NonFiniteError, match="gradients are non-finite at step 1"):
        run_loop(adapter, BadGrad(), forget, [], TrainConfig(steps=3), concept.key, concept.names,
                 callbacks=[steps], progress=False)
    assert all(torch.isfinite(p).all() for p in adapter.model.parameters())
    # the loop's reads: one per step (steps 0 and 1); without the copy, one more before each update (step 1's
    # finds the broken gradient)
    assert sum(n for (_, site), n in device.sites.items() if site.startswith("unlearn/loop.py")) == \
        (2 if snapshots else 3)


def test_a_batch_left_on_the_cpu_fails(device, mllm_data, monkeypatch):
    """The harness can fail: without encode's move to the model's device, the first forward stops."""
    concept, forget, _ = mllm_data
    model, processor = tiny_llava()
    adapter = LlavaAdapter(model.to(DEVICE), processor)
    monkeypatch.setattr(LlavaAdapter, "_to_model_device", lambda self, batch: dict(batch))
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        run_loop(adapter, get_method("ga"), forget, [], TrainConfig(steps=1), concept.key, concept.names,
                 progress=False)


def test_traced_mllm_training_and_evaluation_on_the_device(device, mllm_data, tmp_path):
    """The tracer (log-prob hook, attention probes before training and after every step) and the evaluation
    (generation, K_C / K_N) on the device; the steady training step reads the device once (the loop's read)."""
    from knowtrace import open_probe_trace, open_trace
    from unlearn.eval.mllm import MLLMEvalSet, evaluate
    from unlearn.tracing import start_tracer
    from unlearn.world.records import world_eval_set

    concept, forget, retain = mllm_data
    model, processor = tiny_llava()
    adapter = LlavaAdapter(model.to(DEVICE), processor)
    full = world_eval_set("vorn", 32, n_images=1)
    evalset = MLLMEvalSet(full.efficacy[:2], full.test[:2], full.retain[:2], forget[:2])
    probes = [r for r in full.efficacy if r.image is not None][:2]
    tracer = start_tracer(adapter, tmp_path / "trace.zarr", forget, concept.names, {}, probes, attention=True)
    steps = Steps(device)
    try:  # (start_tracer entered it)
        run_loop(adapter, get_method("fttp"), forget, [], TrainConfig(steps=4, lr=1e-3), concept.key, concept.names,
                 callbacks=[steps, tracer], progress=False)
    finally:
        tracer.__exit__(None, None, None)
    metrics = evaluate(adapter, evalset, concept.names, max_new_tokens=4)
    # a traced step: the loop's read; the step's forward (log-probs: scored positions, one copy to the host);
    # the probe's forward (the same two, attention targets, attention maps); a new batch's concept flags
    assert steps.toolkit[3] - steps.toolkit[2] <= 8, dict(device.sites)
    ds, probe = open_trace(tmp_path / "trace.zarr"), open_probe_trace(tmp_path / "trace.zarr")
    assert ds.sizes["step"] == 4 and probe.sizes["step"] == 5  # probes: before training and after each step
    assert bool(ds["K_C"].notnull().any()) and bool(probe["xattn"].notnull().all(("token", "y", "x")).any())
    assert all(isinstance(metrics[k], float) for k in ("K_C", "K_N", "efficacy"))


# ----------------------------------------------------------------------------- Stable Diffusion

SD_OPTIONS = {  # the cheapest settings of each method (the tiny UNet, one or two steps)
    "sa": {"replay_per_prompt": 1, "replay_inference_steps": 2, "fisher_samples": 1, "fisher_timesteps": 2},
    "esd_x": {"latents": "sampled", "sample_steps": 2},
}


@pytest.fixture(scope="module")
def sd_data():
    from unlearn.world.records import world_sd_data

    return world_sd_data("vorn", 2, 32, n_retain=1, n_surrogate=2)


def sd_adapter():
    from tests.test_sd_unlearn import tiny_adapter

    a = tiny_adapter()
    a.pipe.to(DEVICE)
    return a


@pytest.mark.parametrize("method", sorted(SD_METHODS))
def test_sd_methods_train_on_the_device(method, device, sd_data, tmp_path):
    from unlearn.sd_tracing import SDStepErrorCallback
    from unlearn.world.concepts import BY_KEY

    forget, retain = sd_data
    a, algo = sd_adapter(), get_method(method, modality="sd", **SD_OPTIONS.get(method, {}))
    callbacks = [Steps(device)]
    if SD_METHODS[method].has_step_errors:  # the per-pixel error capture of the step's own forwards
        callbacks.append(SDStepErrorCallback(a, algo, forget, tmp_path / "trace.zarr"))
    run_loop(a, algo, forget, retain, TrainConfig(steps=1, lr=1e-3, batch_size=2), "vorn", BY_KEY["vorn"].names,
             callbacks=callbacks, progress=False)
    for cb in callbacks[1:]:
        cb.flush()
    assert all(p.device == DEVICE for p in a.model.parameters())


def test_a_run_resumed_on_the_device_trains_as_one_that_never_stopped(device, sd_data, tmp_path):
    """A checkpoint written from the device (parameters, Adam moments, random streams) and resumed there:
    the resumed run ends with the weights of an uninterrupted one, every parameter on the device."""
    from unlearn.checkpoints import find_checkpoint, load_checkpoint
    from unlearn.world.concepts import BY_KEY

    class Stop(Exception):
        pass

    def stop(step):
        raise Stop

    def loop(a, **kw):  # accelerate's state, made afresh per run as in a new process (it names the fake device)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        run_loop(a, get_method("fttp", modality="sd"), forget, [], cfg, "vorn", names, callbacks=[], progress=False,
                 checkpoint_dir=tmp_path / run, **kw)

    forget, retain = sd_data
    cfg = TrainConfig(steps=3, lr=1e-3, batch_size=1, lora=True)
    names = BY_KEY["vorn"].names
    trained = {}
    for run in ("whole", "resumed"):
        torch.manual_seed(0)
        a, resume = sd_adapter(), None
        if run == "resumed":
            with pytest.raises(Stop):  # stopped right after the checkpoint of step 1
                loop(a, checkpoint_every=2, on_checkpoint=stop)
            torch.manual_seed(0)
            a = sd_adapter()
            resume = load_checkpoint(find_checkpoint(tmp_path / run), "cpu")  # as a run reads it (runs.py)
            assert resume.step == 1
        loop(a, resume=resume)
        assert all(p.device == DEVICE for p in a.model.parameters())
        trained[run] = {n: p.detach().clone() for n, p in a.model.named_parameters() if p.requires_grad}
    assert trained["whole"].keys() == trained["resumed"].keys() and trained["whole"]
    for n, w in trained["whole"].items():
        torch.testing.assert_close(trained["resumed"][n], w, rtol=0, atol=0)


def test_sd_step_attention_on_the_device(device, sd_data, tmp_path):
    """--trace-attention --trace-source step: the step's own attn2 maps reduced on the device and read
    with its errors in one transfer."""
    from knowtrace import open_trace
    from unlearn.sd_tracing import SDStepErrorCallback
    from unlearn.world.concepts import BY_KEY

    forget, _ = sd_data
    a, algo = sd_adapter(), get_method("fttp", modality="sd")
    trace = SDStepErrorCallback(a, algo, forget, tmp_path / "trace.zarr", attention=True, names=BY_KEY["vorn"].names)
    steps = Steps(device)
    try:
        run_loop(a, algo, forget, [], TrainConfig(steps=2, lr=1e-3, batch_size=2), "vorn", BY_KEY["vorn"].names,
                 callbacks=[steps, trace], progress=False)
    finally:
        trace.close()
    assert bool(open_trace(tmp_path / "trace.zarr")["xattn"].notnull().all())
    # a step: the loop's read; the trace's errors and maps together
    assert steps.toolkit[1] - steps.toolkit[0] == 1 + 1, dict(device.sites)


def test_sd_probe_trace_and_evaluation_on_the_device(device, sd_data, tmp_path):
    """The SD probe (fixed-noise errors and the attn2 attention capture) before training and after each step,
    and the evaluation (sampling, a CLIP classifier, the FD, K_C / K_N) on the device."""
    from knowtrace import open_trace
    from tests.tiny_models import tiny_clip
    from unlearn.eval.sd import ClipZeroShotClassifier, SDEvalSettings, evaluate_sd_run
    from unlearn.sd_tracing import SDTraceCallback
    from unlearn.world.concepts import BY_KEY

    forget, retain = sd_data
    a = sd_adapter()
    trace = SDTraceCallback(a, forget, tmp_path / "trace.zarr", attention=True, names=BY_KEY["vorn"].names,
                            timesteps=(100, 700))
    steps = Steps(device)
    run_loop(a, get_method("fttp", modality="sd"), forget, [], TrainConfig(steps=2, lr=1e-3, batch_size=2), "vorn",
             BY_KEY["vorn"].names, callbacks=[steps, trace], progress=False)
    trace.flush()
    ds = open_trace(tmp_path / "trace.zarr")
    assert ds.sizes["step"] == 3 and bool(ds["K_C"].notnull().all()) and bool(ds["xattn"].notnull().any())
    clip, tok = tiny_clip()
    classifier = ClipZeroShotClassifier(clip.to(DEVICE), tok, ["vorn", "blip"])
    images = a.generate(["a photo of blip"] * 2, [0, 1], num_inference_steps=2)
    metrics = evaluate_sd_run(a.pipe, "vorn", classifier=classifier, n_seeds=2, forget_records=forget,
                              retained={"blip": "a photo of blip"}, prompts="a photo of vorn", reference_images=images,
                              settings=SDEvalSettings(num_inference_steps=2, fd_seeds=2, timesteps=(100, 700)),
                              adapter=a)
    assert 0 <= metrics["ua"] <= 100 and metrics["fd"] >= 0 and isinstance(metrics["K_C"], float)
    # a step: the loop's read; the probe's errors (one copy) and attention maps (one per attn2 layer and forward)
    assert steps.toolkit[1] - steps.toolkit[0] == 1 + 1 + 4, dict(device.sites)


def test_sd_prediction_hook_on_the_device(device, sd_data, tmp_path):
    """knowtrace's own SD hook: the UNet's prediction kept by a forward hook, compared with the step's noise."""
    from knowtrace import open_trace
    from knowtrace.sd_tracer import SDSample, SDTracer
    from unlearn.data.sd_masks import MaskOptions

    forget, _ = sd_data
    a = sd_adapter()
    batch = a.encode(forget[:2], masks=MaskOptions())
    samples = [SDSample(r.id, m) for r, m in zip(forget[:2], batch.mask)]
    with SDTracer(tmp_path / "sd.zarr", samples, unet=a.model) as tracer:
        eps, t, z_t = a.noise(batch.latents, None)
        (a.predict(z_t, t, batch.cond) - eps).pow(2).mean().backward()
        tracer.record_target(0, eps, [r.id for r in forget[:2]])
    assert bool(open_trace(tmp_path / "sd.zarr")["eps_err"].notnull().all())


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
@pytest.mark.parametrize("method", ["fttp", "esd_u", "salun"])
def test_sd_kinds_train_on_the_device(kind, method, device, sd_data):
    """SD 2.x (v-prediction: the velocity target) and SDXL (added conditioning: pooled text and time ids)
    on the device: every conditioning tensor and target follows the model there."""
    from tests.tiny_models import tiny_sd_pipeline
    from unlearn.models.sd import make_adapter
    from unlearn.world.concepts import BY_KEY

    forget, retain = sd_data
    a = make_adapter(tiny_sd_pipeline(kind))
    a.pipe.to(DEVICE)
    algo = get_method(method, modality="sd", **SD_OPTIONS.get(method, {}))
    run_loop(a, algo, forget, retain, TrainConfig(steps=1, lr=1e-3, batch_size=2), "vorn", BY_KEY["vorn"].names,
             callbacks=[Steps(device)], progress=False)
    assert all(p.device == DEVICE for p in a.model.parameters())


def test_probes_run_in_the_training_precision(sd_data, mllm_data, tmp_path):
    """With mixed precision (bf16 on a GPU by default) the SD probe and the MLLM attention probes run under the
    training steps' autocast (step -1 and every later probe in one precision, at the steps' cost); without it,
    in the model's own dtype."""
    from tests.test_sd_unlearn import tiny_adapter
    from unlearn.loop import precision
    from unlearn.sd_tracing import SDProbe
    from unlearn.tracing import start_tracer

    bf16, none = (precision(TrainConfig(mixed_precision=m), "cpu") for m in ("bf16", "no"))
    seen = []

    def watch(module):
        module.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))

    a = tiny_adapter()
    watch(a.model)
    for mode, expected in ((bf16, True), (none, False)):
        seen.clear()
        SDProbe(a, sd_data[0], timesteps=(100,), precision=mode).errors(a.model)
        assert seen and all(s is expected for s in seen)

    concept, forget, _ = mllm_data
    model, processor = tiny_llava()
    adapter = LlavaAdapter(model, processor)
    watch(model)
    seen.clear()
    tracer = start_tracer(adapter, tmp_path / "trace.zarr", forget, concept.names, {}, forget[:1], attention=True,
                          precision=bf16)  # runs the step -1 probe
    tracer.__exit__(None, None, None)
    assert seen == [True]


def _trains_under_bf16_autocast(adapter, model, algo, forget, retain, concept, names, cfg):
    """One run of the loop with bf16 mixed precision (a GPU's default): the model's forwards in the steps run
    under autocast, and the logs are finite numbers."""
    import math

    seen = []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    out = run_loop(adapter, algo, forget, retain, cfg, concept, names, progress=False)
    assert out["mixed_precision"] == "bf16" and seen and any(seen)
    logs = out["history"][-1]
    assert all(math.isfinite(v) for k, v in logs.items() if k != "step"), (algo.name, logs)


@pytest.mark.parametrize("method", sorted(SD_METHODS))
def test_sd_methods_train_under_bf16_autocast(method, sd_data):
    from tests.test_sd_unlearn import tiny_adapter
    from unlearn.world.concepts import BY_KEY

    forget, retain = sd_data
    a = tiny_adapter()
    _trains_under_bf16_autocast(a, a.model, get_method(method, modality="sd", **SD_OPTIONS.get(method, {})), forget,
                                retain, "vorn", BY_KEY["vorn"].names,
                                TrainConfig(steps=2, lr=1e-3, batch_size=2, mixed_precision="bf16"))


@pytest.mark.parametrize("method", sorted(n for n, c in METHODS.items() if c.trains_weights))
def test_mllm_methods_train_under_bf16_autocast(method, mllm_data):
    concept, forget, retain = mllm_data
    model, processor = tiny_llava()
    options = {k: v for k, v in world_method_options("vorn").items() if k in get_method(method).__dataclass_fields__}
    _trains_under_bf16_autocast(LlavaAdapter(model, processor), model, get_method(method, **options), forget, retain,
                                concept.key, concept.names,
                                TrainConfig(steps=2, seed=0, lr=1e-3, mixed_precision="bf16"))


def test_runs_of_another_precision_follow_in_one_process(mllm_data):
    """A notebook's second run in another precision trains (accelerate keeps one precision per process)."""
    concept, forget, retain = mllm_data
    for mixed, autocast in (("bf16", True), ("no", False), ("bf16", True)):
        model, processor = tiny_llava()
        seen = []
        model.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        out = run_loop(LlavaAdapter(model, processor), get_method("fttp"), forget, retain,
                       TrainConfig(steps=1, seed=0, lr=1e-3, mixed_precision=mixed), concept.key, concept.names,
                       progress=False)
        assert out["mixed_precision"] == mixed and any(seen) is autocast
