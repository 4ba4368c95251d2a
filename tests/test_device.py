"""Device-correct runs, proven on a CPU: the model "lives on cuda:0" (tests/fake_device.py: the data stays on
the CPU, so everything really computes), and any tensor a method, the loop, a tracer, a capture or an
evaluation creates or passes on the CPU instead makes the op fail as CUDA would. Host reads are counted."""

from __future__ import annotations

import pytest
import torch

from tests.fake_device import DEVICE, FakeDevice
from tests.tiny_models import tiny_llava
from unlearn.loop import TrainConfig, run_loop
from unlearn.methods import METHODS, get_method
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
    """A loop callback keeping the host reads counted up to each step's end."""

    def __init__(self, dev):
        self.dev, self.total, self.toolkit = dev, [], []

    def on_step_end(self, step, logs, state):
        self.total.append(self.dev.total)
        self.toolkit.append(self.dev.toolkit)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_mllm_methods_train_on_the_device(method, device, mllm_data):
    concept, forget, retain = mllm_data
    model, processor = tiny_llava()
    adapter = LlavaAdapter(model.to(DEVICE), processor)
    options = {k: v for k, v in world_method_options("vorn").items() if k in get_method(method).__dataclass_fields__}
    steps = Steps(device)
    out = run_loop(adapter, get_method(method, **options), forget, retain, TrainConfig(steps=3, seed=0, lr=1e-3),
                   concept.key, concept.names, callbacks=[steps], progress=False)
    assert all(p.device == DEVICE for p in adapter.model.parameters())
    assert len(out["history"]) == 3
    print(method, steps.total, steps.toolkit, dict(device.sites))


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
    print(steps.total, steps.toolkit, dict(device.sites))
    ds, probe = open_trace(tmp_path / "trace.zarr"), open_probe_trace(tmp_path / "trace.zarr")
    assert ds.sizes["step"] == 4 and probe.sizes["step"] == 5  # probes: before training and after each step
    assert bool(ds["K_C"].notnull().any()) and bool(probe["xattn"].notnull().all(("token", "y", "x")).any())
    assert all(isinstance(metrics[k], float) for k in ("K_C", "K_N", "efficacy"))
