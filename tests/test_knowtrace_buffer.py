"""Buffered trace writing: steps kept in memory until a flush, written in one append; nothing lost on
exit or after an exception; appends after the first write go straight to zarr and read back equal."""

import numpy as np
import pytest
import torch
import zarr

from knowtrace import trace
from knowtrace.store import TraceStore, open_trace
from tests.test_models import _records
from tests.tiny_models import tiny_llava
from unlearn.models import adapter_for
from unlearn.tracing import traced_samples


def _values(rng, nan_row=False):
    lp = rng.standard_normal((3, 4)).astype(np.float32)
    if nan_row:
        lp[1] = np.nan
    return {"logprob": lp, "K_C": rng.random(3), "K_N": rng.random(3), "loss_forget": np.float32(rng.random())}


def test_buffered_appends_equal_what_was_given_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    given = [_values(rng, nan_row=i % 2 == 1) for i in range(7)]
    path = tmp_path / "t.zarr"
    store = TraceStore(path, static={"token_id": np.arange(12).reshape(3, 4)}, flush_seconds=1e9)
    store.append(0, **given[0])  # the first step creates the store at once
    assert list(open_trace(path).step.values) == [0]
    for i in range(1, 3):
        store.append(i, **given[i])
    assert list(open_trace(path).step.values) == [0]  # buffered
    store.flush()
    for i in range(3, 5):
        store.append(i, **given[i])
    store.flush()  # appended with zarr directly
    again = TraceStore(path, flush_seconds=0)  # resume: appends after the last stored step
    assert again.last_step == 4
    with pytest.raises(ValueError, match="not after the last stored step"):
        again.append(4, **given[5])
    again.append(5, **given[5])
    again.append(6, **given[6])
    ds = open_trace(path)
    assert list(ds.step.values) == list(range(7))
    for name in ("logprob", "K_C", "K_N", "loss_forget"):
        np.testing.assert_array_equal(ds[name].values, np.stack([g[name] for g in given]).astype(np.float32))
    assert zarr.open_group(path, mode="r")["logprob"].chunks[0] > 1  # many steps per chunk


def test_a_bad_step_is_rejected_before_it_reaches_the_buffer_or_disk(tmp_path):
    rng = np.random.default_rng(1)
    store = TraceStore(tmp_path / "t.zarr", flush_seconds=1e9)
    store.append(0, **_values(rng))
    store.flush()
    store.append(1, **_values(rng))
    with pytest.raises(ValueError, match="same variables"):
        store.append(2, logprob=np.zeros((3, 4)))
    bad = _values(rng)
    bad["logprob"] = np.zeros((3, 5))
    with pytest.raises(ValueError, match="shape"):
        store.append(2, **bad)
    assert list(open_trace(tmp_path / "t.zarr").step.values) == [0]  # nothing half-written
    store.flush()  # the good buffered step is still written
    assert list(open_trace(tmp_path / "t.zarr").step.values) == [0, 1]
    resumed = TraceStore(tmp_path / "t.zarr")
    with pytest.raises(ValueError, match="shape"):  # checked against the stored steps too
        resumed.append(2, **bad)


def test_tracer_flushes_on_exit_after_an_exception(tmp_path):
    model, processor = tiny_llava()
    adapter = adapter_for(model, processor)
    records = _records()
    with pytest.raises(ValueError, match="boom"):
        with trace(model, tmp_path / "t.zarr", traced_samples(adapter, records, ("Vorn",))) as tr:
            with torch.no_grad():
                model(**adapter.encode(records))
            tr.record(0, [r.id for r in records])
            with torch.no_grad():
                model(**adapter.encode(records))
            tr.record(1, [r.id for r in records])
            assert list(open_trace(tmp_path / "t.zarr").step.values) == [0]  # step 1 buffered (flush_seconds=5)
            raise ValueError("boom")
    ds = open_trace(tmp_path / "t.zarr")
    assert list(ds.step.values) == [0, 1] and np.isfinite(ds.logprob.values[1, 0, 0])


def test_background_writes_keep_order_and_everything_is_there_after_flush(tmp_path):
    rng = np.random.default_rng(2)
    given = [_values(rng) for _ in range(30)]
    store = TraceStore(tmp_path / "t.zarr", flush_seconds=1e-9)  # a background write per step
    for i, g in enumerate(given):
        store.append(i, **g)
    store.flush()
    ds = open_trace(tmp_path / "t.zarr")
    assert list(ds.step.values) == list(range(30))
    np.testing.assert_array_equal(ds.logprob.values, np.stack([g["logprob"] for g in given]))


def test_a_failed_background_write_is_raised(tmp_path):
    import shutil

    rng = np.random.default_rng(3)
    store = TraceStore(tmp_path / "t.zarr", flush_seconds=1e-9)
    store.append(0, **_values(rng))
    shutil.rmtree(tmp_path / "t.zarr")  # the store vanishes under the writer
    store.append(1, **_values(rng))
    with pytest.raises(RuntimeError, match="writing buffered steps .* failed"):
        store.flush()
