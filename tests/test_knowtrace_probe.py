"""Probe mode: a fixed probe set every k steps under inference mode, into the trace's probe group."""

import numpy as np
import torch

from knowtrace import AttentionOptions, ProbeSet, open_probe_trace, open_trace, trace
from tests.test_models import _records
from tests.test_unlearn_mllm import _setup, world_dir  # noqa: F401  (fixture)
from tests.tiny_models import tiny_llava
from unlearn.loop import TrainConfig, run_loop
from unlearn.methods import get_method
from unlearn.models import adapter_for
from unlearn.tracing import traced_samples


def _run(path, world_dir):  # noqa: F811
    adapter, concept, forget, _ = _setup(world_dir)
    probe_records = forget[:3]
    probes = ProbeSet([adapter.encode(probe_records[:2]), adapter.encode(probe_records[2:])],
                      traced_samples(adapter, probe_records, concept.names), every=2)
    options = AttentionOptions(layers=(0, -1), on_steps=False)  # attention on probes only
    with trace(adapter.model, path, traced_samples(adapter, forget, concept.names), probes=probes,
               attention=options) as tr:
        run_loop(adapter, get_method("fttp"), forget, [], TrainConfig(steps=3), concept.key, concept.names,
                 callbacks=[tr], progress=False)
    return adapter, probes


def test_probes_every_k_steps_deterministic_and_equal_to_an_independent_forward(tmp_path, world_dir):  # noqa: F811
    adapter, probes = _run(tmp_path / "a.zarr", world_dir)
    main, probe = open_trace(tmp_path / "a.zarr"), open_probe_trace(tmp_path / "a.zarr")
    assert list(main.step.values) == [0, 1, 2] and "xattn" not in main  # the root group is intact
    assert list(probe.step.values) == [0, 2] and probe.sizes["sample"] == 3
    lengths = [len(s.token_ids) for s in probes.samples]
    for i, n in enumerate(lengths):  # every probe sample at every probe step
        assert np.isfinite(probe.logprob.values[:, i, :n]).all() and np.isnan(probe.logprob.values[:, i, n:]).all()
        assert np.isfinite(probe.xattn.values[:, i, :, :n]).all()
    assert not np.array_equal(probe.logprob.values[0], probe.logprob.values[1])  # training moved them
    # the probe after the last step (2) saw the final parameters: equal to a forward now, in eval mode
    model = adapter.model.eval()
    batch = probes.batches[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(**batch).logits.double(), -1)
    for row in range(2):
        lab = batch["labels"][row]
        pos = (lab != -100).nonzero().squeeze(1)
        np.testing.assert_allclose(probe.logprob.sel(step=2).values[row, : len(pos)], logp[row, pos - 1, lab[pos]],
                                   atol=1e-5)
    # same seed, same probe values
    _run(tmp_path / "b.zarr", world_dir)
    again = open_probe_trace(tmp_path / "b.zarr")
    np.testing.assert_array_equal(again.logprob.values, probe.logprob.values)
    np.testing.assert_array_equal(again.xattn.values, probe.xattn.values)


def test_probe_restores_each_module_mode_and_keeps_the_step_captures_apart(tmp_path):
    model, processor = tiny_llava()
    adapter = adapter_for(model, processor)
    records = _records()
    samples = traced_samples(adapter, records, ("Vorn",))
    probes = ProbeSet([adapter.encode(records[:1])], samples[:1], every=1)
    model.train()
    model.get_decoder().layers[0].eval()  # a module deliberately kept in eval mode
    batch = adapter.encode(records[1:])
    with trace(model, tmp_path / "t.zarr", samples, probes=probes) as tr:
        model(**batch)  # the training step's forward, before the probe
        assert tr.record(0, [r.id for r in records[1:]])
    assert model.training and model.get_decoder().layers[1].training and not model.get_decoder().layers[0].training
    main, probe = open_trace(tmp_path / "t.zarr"), open_probe_trace(tmp_path / "t.zarr")
    assert np.isnan(main.logprob.values[0, 0]).all() and np.isfinite(main.logprob.values[0, 1, 0])
    assert np.isfinite(probe.logprob.values[0, 0, 0])


def test_probe_set_errors():
    import pytest

    model, processor = tiny_llava()
    adapter = adapter_for(model, processor)
    records = _records()
    samples = traced_samples(adapter, records, ("Vorn",))
    with pytest.raises(ValueError, match="3 rows but 2 probe samples"):
        ProbeSet([adapter.encode(records)], samples[:2])
    with pytest.raises(ValueError, match="every must be"):
        ProbeSet([adapter.encode(records)], samples, every=0)


def test_probe_only_attention_switches_in_for_the_probe_forward_alone(tmp_path):
    """With ``on_steps=False`` training forwards run the original attention function (they pay nothing
    for the capture); the probe forward runs the capturing one and records maps."""
    model, processor = tiny_llava()
    adapter = adapter_for(model, processor)
    records = _records()
    samples = traced_samples(adapter, records, ("Vorn",))
    probes = ProbeSet([adapter.encode(records[:1])], samples[:1], every=1)
    attn = model.get_decoder().layers[-1].self_attn
    original = attn.config._attn_implementation
    seen = []
    handle = attn.register_forward_pre_hook(lambda m, args: seen.append(m.config._attn_implementation))
    try:
        with trace(model, tmp_path / "t.zarr", samples, probes=probes,
                   attention=AttentionOptions(on_steps=False)) as tr:
            model(**adapter.encode(records[1:]))  # a training step's forward
            tr.record(0, [r.id for r in records[1:]])  # then the probe
            model(**adapter.encode(records[1:]))
    finally:
        handle.remove()
    assert seen == [original, "knowtrace_" + original, original]
    assert attn.config._attn_implementation == original
    assert np.isfinite(open_probe_trace(tmp_path / "t.zarr").xattn.values).any()
