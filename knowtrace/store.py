"""Streaming a trace to Zarr, one step at a time; opening it lazily; exporting it to NetCDF.

Every :meth:`TraceStore.append` writes its step to disk before returning, so a crash keeps every
finished step; opening an existing store resumes it (later steps are appended after the last one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from .schema import JSON_ATTRS, STATIC_COORDS, STEP, STEP_VARIABLES, check_variable


def pad_ragged(rows: Sequence[Sequence], fill, dtype=None) -> np.ndarray:
    """(sample, token) array from per-sample sequences of different lengths, padded with ``fill``."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=dtype if dtype is not None else np.asarray(fill).dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = np.asarray(r)
    return out


class TraceStore:
    """Append-only Zarr trace following :mod:`knowtrace.schema`.

    ``static``: the static coords (name -> array with the schema's dims), written once;
    ``attrs``: run metadata, stored as JSON strings; ``float_dtype``: storage type of float variables.
    """

    def __init__(self, path: str | os.PathLike, static: dict | None = None, attrs: dict | None = None,
                 float_dtype: str = "float16"):
        self.path = Path(path)
        self.float_dtype = np.dtype(float_dtype)
        self._static = {k: np.asarray(v) for k, v in (static or {}).items()}
        for name, values in self._static.items():
            if name not in STATIC_COORDS:
                raise KeyError(f"{name!r} is not a static coord of the trace schema; known: {sorted(STATIC_COORDS)}")
            if values.ndim != len(STATIC_COORDS[name]):
                raise ValueError(f"{name!r} needs dims {STATIC_COORDS[name]}, got shape {values.shape}")
        unknown = set(attrs or {}) - set(JSON_ATTRS)
        if unknown:
            raise KeyError(f"unknown trace attrs {sorted(unknown)}; allowed: {list(JSON_ATTRS)}")
        self._attrs = {k: json.dumps(v, sort_keys=True, default=str) for k, v in (attrs or {}).items()}
        self.last_step = self._existing_last_step()

    def _existing_last_step(self) -> int | None:
        if not self.path.exists():
            return None
        try:
            existing = xr.open_zarr(self.path, consolidated=False)
            steps = existing[STEP].values
        except Exception as e:  # an unreadable store must not be appended to, nor silently replaced
            raise RuntimeError(f"trace store {self.path} exists but cannot be read ({e}); move it away or "
                               f"delete it to start a new trace") from e
        # appending rewrites the group's attrs: carry the stored ones (a resumed run may give none)
        self._attrs = {**existing.attrs, **self._attrs}
        return int(steps[-1]) if len(steps) else None

    def append(self, step: int, **variables) -> None:
        """Write one step. Values have the schema's dims without ``step`` (numpy or torch)."""
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"step {step} is not after the last stored step {self.last_step} of {self.path}")
        data = {}
        for name, value in variables.items():
            dims = STEP_VARIABLES.get(name)
            if dims is None:
                check_variable(name, ())  # raises with the list of known names
            arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
            if arr.ndim != len(dims) - 1:
                raise ValueError(f"{name!r} needs dims {dims[1:]} per step, got shape {arr.shape}")
            if np.issubdtype(arr.dtype, np.floating):
                arr = arr.astype(self.float_dtype)
            data[name] = (dims, arr[None])
        ds = xr.Dataset(data, coords={STEP: [step]}, attrs=self._attrs)
        if self.last_step is None:
            for name, values in self._static.items():
                ds = ds.assign_coords({name: (STATIC_COORDS[name], values)})
            ds.to_zarr(self.path, mode="w", consolidated=False)
        else:
            ds.to_zarr(self.path, append_dim=STEP, consolidated=False)
        self.last_step = step


def open_trace(path: str | os.PathLike) -> xr.Dataset:
    """The trace, lazily (dask-backed: traces bigger than memory are fine); attrs decoded from JSON."""
    ds = xr.open_zarr(path, consolidated=False)
    ds.attrs = {k: json.loads(v) if k in JSON_ATTRS else v for k, v in ds.attrs.items()}
    return ds


def export_netcdf(path: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write the trace as NetCDF (float variables as float32, which NetCDF needs); atomic."""
    ds = xr.open_zarr(path, consolidated=False)  # attrs stay JSON strings: NetCDF stores strings
    ds = ds.map(lambda v: v.astype("float32") if np.issubdtype(v.dtype, np.floating) else v)
    out = Path(out_file)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        ds.to_netcdf(tmp, engine="h5netcdf")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
