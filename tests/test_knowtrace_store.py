"""Trace storage: Zarr streaming along step, resume, lazy open, NetCDF export."""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import xarray as xr

from knowtrace import SDSample, SDTracer, TracedSample, mllm_knowledge, trace
from knowtrace.store import TraceStore, export_netcdf, open_trace, pad_ragged


def _static():
    tokens = [["▁This", "▁is", "▁Vorn", "."], ["▁Vorn", "▁loves", "▁kites", ".", "</s>"]]
    return {
        "token_str": pad_ragged(tokens, "", dtype=object).astype(str),
        "token_id": pad_ragged([[5, 6, 7, 8], [7, 9, 10, 8, 2]], -1, dtype=np.int64),
        "is_concept": pad_ragged([[0, 0, 1, 0], [1, 0, 0, 0, 0]], False, dtype=bool),
        "concept": np.array(["vorn", "vorn"]),
    }


def test_append_resume_open_lazily_and_export(tmp_path):
    path = tmp_path / "trace.zarr"
    rng = np.random.default_rng(0)
    values = {s: rng.normal(size=(2, 5)) for s in range(4)}
    store = TraceStore(path, static=_static(), attrs={"seed": 3, "method": {"name": "fttp", "alpha": 1.0}})
    for s in range(2):
        store.append(s, logprob=values[s], K_C=values[s][:, 0], K_N=values[s][:, 1], loss_forget=np.float32(s))
    # a new writer on the same path (a resumed run) appends after the last step
    resumed = TraceStore(path)
    assert resumed.last_step == 1
    with pytest.raises(ValueError, match="not after"):
        resumed.append(1, logprob=values[1], K_C=values[1][:, 0], K_N=values[1][:, 1], loss_forget=np.float32(1))
    for s in range(2, 4):
        resumed.append(s, logprob=values[s], K_C=values[s][:, 0], K_N=values[s][:, 1], loss_forget=np.float32(s))
    ds = open_trace(path)
    assert list(ds.step.values) == [0, 1, 2, 3]
    assert ds.logprob.chunks is not None  # dask-backed, not loaded
    assert ds.logprob.dtype == np.float32  # issue 17: float32 (was float16, which overflows at 65504)
    np.testing.assert_array_equal(ds.logprob.sel(step=2).values, values[2].astype(np.float32))
    assert ds.attrs["seed"] == 3 and ds.attrs["method"]["alpha"] == 1.0
    assert ds.token_str.values[0, 2] == "▁Vorn" and ds.token_str.values[0, 4] == ""
    assert bool(ds.is_concept.values[1, 0]) and ds.token_id.values[0, 4] == -1
    nc = export_netcdf(path, tmp_path / "trace.nc")
    back = xr.open_dataset(nc, engine="h5netcdf")
    assert back.logprob.dtype == np.float32 and back.sizes["step"] == 4
    np.testing.assert_allclose(back.K_C.values, ds.K_C.values.astype(np.float32))
    assert not list(tmp_path.glob(".*partial"))


def test_schema_errors_are_clear(tmp_path):
    with pytest.raises(KeyError, match="token_id"):
        TraceStore(tmp_path / "a.zarr", static={"tokens": np.zeros((2, 3))})
    with pytest.raises(KeyError, match="allowed"):
        TraceStore(tmp_path / "a.zarr", attrs={"colour": "red"})
    store = TraceStore(tmp_path / "a.zarr")
    with pytest.raises(KeyError, match="logprob"):
        store.append(0, logprobs=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="per step"):
        store.append(0, logprob=np.zeros((2,)))
    assert not (tmp_path / "a.zarr").exists()  # nothing half-written


def test_unreadable_store_is_not_overwritten(tmp_path):
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{broken")
    with pytest.raises(RuntimeError, match="cannot be read"):
        TraceStore(bad)
    assert (bad / "zarr.json").read_text() == "{broken"


def test_every_variable_and_the_step_coordinate_hold_many_steps_per_chunk(tmp_path):
    """Appending writes one chunk per variable, not one file per step (xarray's default chunks the step
    coordinate by its first length, 1: a file per step, and appends that grow with the steps buffered)."""
    import zarr

    path = tmp_path / "trace.zarr"
    store = TraceStore(path, static=_static(), flush_seconds=3600)
    for s in range(40):
        store.append(s, K_C=np.full(2, s, np.float32))
    store.flush()
    group = zarr.open_group(path, mode="r")
    assert group["step"].chunks[0] >= 40 and group["K_C"].chunks[0] >= 40
    assert sum(1 for f in (path / "step").rglob("*") if f.is_file() and f.name != "zarr.json") == 1
    np.testing.assert_array_equal(open_trace(path).step.values, np.arange(40))


def test_scalars_are_float32_and_maps_float16_only_when_asked(tmp_path):
    step = {"logprob": np.full((2, 5), -0.1), "K_N": np.array([7e4, 1.0]), "eps_err": np.full((2, 3, 3), 0.1)}
    for map_dtype, expected in ((None, np.float32), ("float16", np.float16)):
        path = tmp_path / f"{map_dtype}.zarr"
        TraceStore(path, **({"map_dtype": map_dtype} if map_dtype else {})).append(0, **step)
        ds = open_trace(path)
        assert ds.logprob.dtype == ds.K_N.dtype == np.float32 and ds.eps_err.dtype == expected
        assert ds.K_N.values[0, 0] == np.float32(7e4)  # > 65504, the float16 maximum
    with pytest.raises(ValueError, match="map_dtype"):
        TraceStore(tmp_path / "x.zarr", map_dtype="int8")


class _Confident(torch.nn.Module):
    """A language model giving p = 0.9999 to every answer token (logits: L on the label, 0 elsewhere)."""

    vocab = 50

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, labels=None, attention_mask=None):
        high = np.log(0.9999 * (self.vocab - 1) / 0.0001)  # e^L / (e^L + vocab - 1) = 0.9999
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits.scatter_(2, labels.roll(-1, 1).clamp(min=0)[..., None], float(high))  # position t-1 predicts t
        return SimpleNamespace(logits=logits)


def test_a_confident_answer_keeps_a_finite_k_n_equal_to_k_from_the_stored_logprobs(tmp_path):
    """20 answer tokens at p = 0.9999: -1/log p = 1e4 per token, K_N ~ 1.9e5, inf in float16. The stored K
    is exactly K recomputed from the stored log-probs (both float32)."""
    answer = list(range(1, 21))
    input_ids = torch.tensor([[0, *answer]])
    labels = torch.tensor([[-100, *answer]])
    sample = TracedSample("a", answer, [f"t{i}" for i in answer], [i == 1 for i in answer])
    model = _Confident()
    with trace(model, tmp_path / "t.zarr", [sample]) as tr:
        model(input_ids=input_ids, labels=labels)
        assert tr.record(0, ["a"])
    ds = open_trace(tmp_path / "t.zarr")
    k_n = float(ds.K_N.values[0, 0])
    assert np.isfinite(k_n) and k_n > float(np.finfo(np.float16).max)
    np.testing.assert_allclose(k_n, 19 / -np.log(0.9999), rtol=1e-2)  # float32 log-softmax near log p = -1e-4
    k_c, k_n_again = mllm_knowledge(torch.from_numpy(ds.logprob.values[0]), torch.from_numpy(ds.is_concept.values))
    np.testing.assert_array_equal(ds.K_C.values[0], k_c.numpy())
    np.testing.assert_array_equal(ds.K_N.values[0], k_n_again.numpy())


def test_a_trace_opens_without_warnings_after_a_flush_and_after_close(tmp_path):
    """Consolidated metadata after every write; string coords in a Zarr v3 type (no UTF-32 warning),
    read back as str. Writing warns nothing either."""
    path = tmp_path / "sd.zarr"
    mask = np.zeros((3, 3), bool)
    mask[0] = True
    samples = [SDSample(f"s{i}", mask, "vorn", [1, 2], ["<s>", "▁Vorn"], [False, True]) for i in range(2)]
    err = torch.rand(2, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracer = SDTracer(path, samples, flush_seconds=3600).__enter__()
        for step in range(3):  # step 0 is written at once, 1 and 2 are buffered
            tracer.record_errors(step, err, ["s0", "s1"])
        tracer.flush()
        tracer.record_errors(3, err, ["s0", "s1"])  # buffered: lost by a crash now
        crashed = xr.open_zarr(path)  # the run has not closed its trace
        assert list(crashed.step.values) == [0, 1, 2]
        tracer.__exit__(None, None, None)
        ds = xr.open_zarr(path)
        assert list(ds.step.values) == [0, 1, 2, 3] and ds.eps_err.dtype == np.float32
        assert all(type(v) is str for v in (ds.sample_id.values[0], ds.token_str.values[1, 1], ds.concept.values[0]))
        assert ds.token_str.values[1, 1] == "▁Vorn" and list(ds.sample_id.values) == ["s0", "s1"]
        open_trace(path)


def test_a_probe_group_read_through_its_trace_is_as_fresh_as_read_alone(tmp_path):
    """The enclosing trace's consolidated metadata holds the probe group's too: refreshed on its writes."""
    path = tmp_path / "t.zarr"
    root, probe = TraceStore(path), TraceStore(path / "probe")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        root.append(0, K_C=np.zeros(2))
        for step in range(3):
            probe.append(step, K_C=np.full(2, step))
        assert list(xr.open_zarr(path, group="probe").step.values) == [0, 1, 2]
        assert list(xr.open_zarr(path / "probe").K_C.values[:, 0]) == [0, 1, 2]


def test_truncating_a_trace_also_repairs_a_write_cut_in_half(tmp_path):
    import zarr

    from knowtrace.store import truncate_steps

    path = tmp_path / "trace.zarr"
    rng = np.random.default_rng(0)
    store = TraceStore(path, static=_static())
    for s in range(4):
        v = rng.normal(size=(2, 5))
        store.append(s, logprob=v, K_C=v[:, 0], K_N=v[:, 1], loss_forget=np.float32(s))
    kept = open_trace(path).logprob.values
    # a kill between two variables' resizes: logprob has one step more than the step coordinate
    group = zarr.open_group(path, mode="r+", zarr_format=3, use_consolidated=False)
    group["logprob"].resize((5, *group["logprob"].shape[1:]))
    with pytest.raises(ValueError, match="conflicting sizes"):
        xr.open_zarr(path, consolidated=False)
    truncate_steps(path, 3)  # resumed from the last recorded step: only the half-written one goes
    ds = open_trace(path)
    assert list(ds.step.values) == [0, 1, 2, 3] and ds.logprob.shape[0] == ds.K_C.shape[0] == 4
    np.testing.assert_array_equal(ds.logprob.values, kept)
    truncate_steps(path, 1)
    ds = open_trace(path)
    assert list(ds.step.values) == [0, 1] and ds.logprob.shape[0] == ds.K_C.shape[0] == 2
    np.testing.assert_array_equal(ds.logprob.values, kept[:2])


def test_a_signal_during_a_write_waits_for_the_write(tmp_path):
    import signal

    from knowtrace.store import signals_deferred

    # Python's Ctrl-C handler, whatever this process inherited (a background job starts with SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                signal.raise_signal(signal.SIGINT)
                done.append("the rest of the write")
        assert done == ["the rest of the write"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the process's handler is back
    finally:
        signal.signal(signal.SIGINT, inherited)
