"""knowtrace's tracer on the unlearn loop: log-probs from the step's own forward, K_C/K_N, hooks."""

import numpy as np
import pytest
import torch

from knowtrace.store import open_trace
from knowtrace.tracer import MLLMTracer
from tests.test_unlearn_mllm import _setup, world_dir  # noqa: F401  (fixture)
from unlearn.loop import TrainConfig, run_loop
from unlearn.methods import get_method
from unlearn.tracing import traced_samples


def test_trace_matches_an_independent_forward_and_hooks_are_removed(tmp_path, world_dir):  # noqa: F811
    adapter, concept, forget, _ = _setup(world_dir)
    model = adapter.model
    samples = traced_samples(adapter, forget, concept.names)
    first = forget[:2]  # the loop's first batch
    batch = adapter.encode(first)
    with torch.no_grad():  # independent: a separate forward on the starting model, full log_softmax
        logp = torch.log_softmax(model(**batch).logits.double(), -1)
    expected = []
    for row in range(2):
        lab = batch["labels"][row]
        pos = (lab != -100).nonzero().squeeze(1)
        expected.append(logp[row, pos - 1, lab[pos]].numpy())
    with MLLMTracer(model, tmp_path / "trace.zarr", samples) as tracer:
        with pytest.raises(RuntimeError, match="already attached"):
            MLLMTracer(model, tmp_path / "other.zarr", samples).__enter__()
        run_loop(adapter, get_method("fttp"), forget, [], TrainConfig(steps=3), concept.key, concept.names,
                 callbacks=[tracer], progress=False)
    assert not model._forward_hooks  # removed on exit
    ds = open_trace(tmp_path / "trace.zarr")
    assert list(ds.step.values) == [0, 1, 2]
    for row in range(2):
        got = ds.logprob.sel(step=0).values[row][: len(expected[row])]
        np.testing.assert_allclose(got, expected[row], atol=1e-5)
    assert np.isnan(ds.logprob.sel(step=0).values[2]).all()  # not in step 0's batch
    assert not np.isnan(ds.logprob.sel(step=1).values[2]).all()
    flags = ds.is_concept.values[0]
    assert flags.any() and [s.lstrip("▁") for s, f in zip(ds.token_str.values[0], flags) if f] == ["Vorn"]
    assert np.isfinite(ds.K_C.sel(step=0).values[:2]).all() and np.isfinite(ds.loss_forget.values).all()


def test_hooks_removed_after_an_exception(tmp_path, world_dir):  # noqa: F811
    adapter, concept, forget, _ = _setup(world_dir)
    samples = traced_samples(adapter, forget, concept.names)
    with pytest.raises(ValueError, match="boom"):
        with MLLMTracer(adapter.model, tmp_path / "t.zarr", samples):
            raise ValueError("boom")
    assert not adapter.model._forward_hooks
    with MLLMTracer(adapter.model, tmp_path / "t2.zarr", samples):  # attachable again
        pass
