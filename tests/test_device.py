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
    import accelerate

    monkeypatch.setattr(accelerate.Accelerator, "device", property(lambda self: DEVICE))
    with FakeDevice() as dev:
        yield dev


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
