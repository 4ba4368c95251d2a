"""Trace storage: Zarr streaming along step, resume, lazy open, NetCDF export."""

import numpy as np
import pytest
import xarray as xr

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
    assert ds.logprob.dtype == np.float16
    np.testing.assert_allclose(ds.logprob.sel(step=2).values, values[2].astype(np.float16))
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
