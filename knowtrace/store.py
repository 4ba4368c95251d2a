"""Streaming a trace to Zarr, one step at a time; opening it lazily; exporting it to NetCDF.

With ``flush_seconds=0`` (the default) every :meth:`TraceStore.append` writes its step before returning,
so a crash keeps every finished step. An xarray append costs tens of milliseconds (it reopens the
metadata): with ``flush_seconds=s > 0`` steps are buffered and written in order by a background thread
once the oldest is ``s`` seconds old, and on :meth:`TraceStore.flush` (tracers call it on exit). A
failed background write raises at the next append or flush; the first write is always synchronous.
Opening an existing store resumes it.

Storage types: log-probs, K_C / K_N and losses are float32 (float16 overflows at 65504: a confident
model's K_N is 1e4 per token). The large maps (``xattn``, ``xattn_head``, ``eps_err``) are float16 only
with ``map_dtype="float16"``. String coords are variable-length UTF-8 (Zarr v3 ``string``). Metadata is
consolidated after every write, so ``xr.open_zarr`` opens a trace without a warning, also after a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xarray as xr

from .schema import JSON_ATTRS, MAP_VARIABLES, PROBE_GROUP, STATIC_COORDS, STEP, STEP_VARIABLES


def index_samples(samples: Sequence) -> dict[str, int]:
    """Sample id -> row of the trace; an empty or non-unique sample list is an error."""
    if not samples:
        raise ValueError("nothing to trace: give at least one sample")
    index = {s.id: i for i, s in enumerate(samples)}
    if len(index) != len(samples):
        raise ValueError("traced sample ids must be unique")
    return index


def pad_ragged(rows: Sequence[Sequence], fill, dtype=None) -> np.ndarray:
    """(sample, token) array from per-sample sequences of different lengths, padded with ``fill``."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=dtype if dtype is not None else np.asarray(fill).dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = np.asarray(r)
    return out


def token_coords(samples: Sequence) -> dict[str, np.ndarray]:
    """The static coords ``token_id``, ``token_str``, ``is_concept`` (sample, token) of samples that carry
    ``token_ids``, ``token_strs`` and ``is_concept``, padded per the schema."""
    return {"token_id": pad_ragged([list(s.token_ids) for s in samples], -1, dtype=np.int64),
            "token_str": pad_ragged([list(s.token_strs) for s in samples], "", dtype=object),
            "is_concept": pad_ragged([list(map(bool, s.is_concept)) for s in samples], False, dtype=bool)}


class TraceStore:
    """Append-only Zarr trace following :mod:`knowtrace.schema`: ``static`` coords (name -> array with the
    schema's dims) written once, ``attrs`` stored as JSON strings, the map variables stored as ``map_dtype``
    and every other float variable as float32."""

    def __init__(self, path: str | os.PathLike, static: dict | None = None, attrs: dict | None = None,
                 map_dtype: str = "float32", flush_seconds: float = 0.0):
        self.path = Path(path)
        self.flush_seconds = float(flush_seconds)
        self._buffer: list[tuple[int, dict]] = []
        self._shapes: dict[str, tuple[int, ...]] = {}  # variable -> shape per step, fixed by the first step
        self._buffered_since = 0.0
        self._last_appended: int | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None  # the background write in flight
        self._arrays: dict | None = None  # name -> zarr array, for appends (one writer at a time)
        self.map_dtype = np.dtype(map_dtype)
        if self.map_dtype.kind != "f":
            raise ValueError(f"map_dtype must be a float type (float32, float16), got {map_dtype!r}")
        # str -> object: xarray writes object strings as Zarr v3 variable-length UTF-8
        self._static = {k: np.asarray(v).astype(object) if np.asarray(v).dtype.kind == "U" else np.asarray(v)
                        for k, v in (static or {}).items()}
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
        self._last_appended = self.last_step

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
        self._shapes = {name: tuple(v.shape[1:]) for name, v in existing.data_vars.items() if v.dims[:1] == (STEP,)}
        return int(steps[-1]) if len(steps) else None

    def append(self, step: int, **variables) -> None:
        """Write one step (or buffer it, see ``flush_seconds``). Values have the schema's dims without
        ``step`` (numpy or torch); they are checked now, so a bad step never reaches the buffer."""
        self._raise_failed_write()
        last = self._last_appended
        if last is not None and step <= last:
            raise ValueError(f"step {step} is not after the last stored step {last} of {self.path}")
        if self._shapes and set(variables) != set(self._shapes):
            raise ValueError(f"step {step} has variables {sorted(variables)}, the trace {sorted(self._shapes)}: every "
                             f"step of a trace has the same variables")
        data = {}
        for name, value in variables.items():
            dims = STEP_VARIABLES.get(name)
            if dims is None:
                raise KeyError(f"{name!r} is not a per-step variable of the trace schema; known: {sorted(STEP_VARIABLES)}")
            arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
            if arr.ndim != len(dims) - 1:
                raise ValueError(f"{name!r} needs dims {dims[1:]} per step, got shape {arr.shape}")
            if name in self._shapes and arr.shape != self._shapes[name]:
                raise ValueError(f"{name!r} has shape {arr.shape} per step, the trace's earlier steps {self._shapes[name]}")
            if np.issubdtype(arr.dtype, np.floating):
                arr = arr.astype(self.map_dtype if name in MAP_VARIABLES else np.float32)
            data[name] = (dims, arr)
        if not self._shapes:
            self._shapes = {name: arr.shape for name, (_, arr) in data.items()}
        if not self._buffer:
            self._buffered_since = time.monotonic()
        self._buffer.append((step, data))
        self._last_appended = step
        if self.last_step is None and self._pending is None:
            self.flush()  # the first write creates the store: made now, in this thread
        elif time.monotonic() - self._buffered_since >= self.flush_seconds:
            if self.flush_seconds <= 0:
                self.flush()
            elif self._pending is None or self._pending.done():  # else: keep buffering until it is done
                self._raise_failed_write()
                steps, data = self._take_buffer()
                if self._writer is None:
                    self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="knowtrace-writer")
                self._pending = self._writer.submit(self._write, steps, data)

    def flush(self) -> None:
        """Write every appended step now: waits for a background write, then writes the buffer."""
        if self._pending is not None:
            self._pending.exception()  # waits for it
            self._raise_failed_write()
            self._pending = None
        if self._buffer:
            self._write(*self._take_buffer())

    def _raise_failed_write(self) -> None:
        if self._pending is not None and self._pending.done() and self._pending.exception() is not None:
            error, self._pending = self._pending.exception(), None
            raise RuntimeError(f"writing buffered steps to {self.path} failed: {error}; the trace holds the steps "
                               f"up to {self.last_step}") from error

    def _take_buffer(self) -> tuple[list[int], dict]:
        steps = [s for s, _ in self._buffer]
        first = self._buffer[0][1]
        data = {name: (dims, np.stack([d[name][1] for _, d in self._buffer])) for name, (dims, _) in first.items()}
        self._buffer = []
        return steps, data

    def _write(self, steps: list[int], data: dict) -> None:
        with signals_deferred():
            self._write_steps(steps, data)

    def _write_steps(self, steps: list[int], data: dict) -> None:
        if self.last_step is None:
            ds = xr.Dataset(data, coords={STEP: steps}, attrs=self._attrs)
            for name, values in self._static.items():
                ds = ds.assign_coords({name: (STATIC_COORDS[name], values)})
            # chunks of many steps: appending then writes one file per variable and flush, not one per step
            encoding = {name: {"chunks": (_step_chunk(v[1][0].nbytes),) + v[1].shape[1:]} for name, v in data.items()}
            # the coordinate too: xarray's default chunks it by its first length (1), a file per step
            encoding[STEP] = {"chunks": (MAX_STEP_CHUNK,)}
            # the path held no trace when this store was opened; anything there now is a child group
            # written since (a probe group whose first step came first), which "w" would delete
            ds.to_zarr(self.path, mode="a" if self.path.exists() else "w", consolidated=False, encoding=encoding)
        else:
            self._append_direct(steps, data)
        consolidate(self.path)
        self.last_step = steps[-1]

    def _append_direct(self, steps: list[int], data: dict) -> None:
        """Append along ``step`` with zarr itself: xarray's append re-reads and re-validates the whole
        store (~100 ms here); resizing the arrays xarray created and writing the new rows is what it
        does in the end. Every variable is checked first, so a mismatch writes nothing."""
        if self._arrays is None:  # opened once: reopening the group and its arrays was a third of an append
            import zarr

            group = zarr.open_group(self.path, mode="r+", zarr_format=3, use_consolidated=False)
            self._arrays = {name: group[name] for name in (*data, STEP) if name in group}
        arrays = self._arrays
        missing = set(data) - set(arrays)
        if missing or STEP not in arrays:
            raise ValueError(f"variables {sorted(missing)} are not in the existing trace {self.path}; a trace keeps "
                             f"the variables of its first step")
        n, k = arrays[STEP].shape[0], len(steps)
        for name, (dims, values) in data.items():
            a = arrays[name]
            if a.shape[1:] != values.shape[1:]:
                raise ValueError(f"{name!r} has shape {values.shape[1:]} per step, the trace {a.shape[1:]}")
            if a.shape[0] != n:
                raise RuntimeError(f"{self.path}: {name!r} has {a.shape[0]} steps but the step coordinate {n}; "
                                   f"the store is inconsistent")
        for name, (dims, values) in data.items():
            a = arrays[name]
            a.resize((n + k, *a.shape[1:]))
            a[n:] = values.astype(a.dtype)
        arrays[STEP].resize((n + k,))  # last: readers see the new steps only once every value is there
        arrays[STEP][n:] = np.asarray(steps, dtype=arrays[STEP].dtype)


STEP_CHUNK_BYTES = 4 * 2**20  # target size of one chunk along ``step``
MAX_STEP_CHUNK = 256


def _step_chunk(step_nbytes: int) -> int:
    return int(max(1, min(MAX_STEP_CHUNK, STEP_CHUNK_BYTES // max(step_nbytes, 1))))


_CONSOLIDATING = threading.Lock()  # a trace and its probe group write from their own threads


def consolidate(path: Path) -> None:
    """Rewrite the consolidated metadata of the trace at ``path``, and of the trace it lies in if it is
    a group of one (a probe group: the enclosing trace's consolidated copy of it would go stale)."""
    import zarr

    # consolidated on purpose (one read to open, clean after a crash): zarr's notice that Zarr v3 does
    # not specify consolidated metadata yet would come with every write. The filter is re-added each
    # time because test runners and callers may reset the filters.
    warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", category=UserWarning)
    with _CONSOLIDATING:  # one at a time: the last one to run sees every finished write
        zarr.consolidate_metadata(path, zarr_format=3)
        if (path.parent / "zarr.json").exists():
            zarr.consolidate_metadata(path.parent, zarr_format=3)


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM wait until the block is done (main thread): a write cut in half would leave
    the trace's variables with different numbers of steps. The signal is raised afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])  # now, to the handler the process had


def truncate_steps(path: str | os.PathLike, last_step: int) -> None:
    """Drop the steps after ``last_step`` from the trace at ``path`` and its groups (a run resumed from
    a checkpoint records them again), also from a write that a kill cut in half (a variable longer than
    the step coordinate). The step coordinate shrinks first: a reader never sees a step without its values."""
    import zarr

    root = zarr.open_group(path, mode="r+", zarr_format=3, use_consolidated=False)
    for group in (root, *(g for _, g in root.groups())):
        if STEP not in group:
            continue
        steps = group[STEP][:]
        keep = int(np.searchsorted(steps, last_step, side="right"))  # steps increase
        if keep != len(steps):
            group[STEP].resize((keep,))
        for name, array in group.arrays():
            if name != STEP and (array.metadata.dimension_names or (None,))[0] == STEP and array.shape[0] != keep:
                array.resize((keep, *array.shape[1:]))
    consolidate(Path(path))


def open_trace(path: str | os.PathLike) -> xr.Dataset:
    """The trace, lazily (dask-backed: traces bigger than memory are fine); attrs decoded from JSON. A store
    whose metadata cannot be read is an error saying the trace is damaged."""
    try:
        ds = xr.open_zarr(path)
        ds.attrs = {k: json.loads(v) if k in JSON_ATTRS else v for k, v in ds.attrs.items()}
    except Exception as e:  # any failure to read the metadata (JSON, zarr, xarray) means the same to the user
        raise ValueError(f"trace {path} is damaged: its metadata cannot be read ({type(e).__name__}: {e}); "
                         f"record it again, or restore it from a copy") from e
    missing = removed_chunks(Path(path), list(ds.variables))
    if missing:
        raise ValueError(f"trace {path} is damaged: chunk files are missing ({', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}); record it again, or restore it from a copy")
    return ds


def removed_chunks(path: Path, names: list[str]) -> list[str]:
    """The chunk folders of a trace's arrays that are empty: chunk files removed after they were written.
    Zarr stores no chunk whose values all equal the fill value (NaN: a variable never recorded, such as
    ``loss_retain`` without a retain set), so an absent chunk alone is no damage; but it creates a chunk's
    folders only when it writes the chunk's file, so an empty one is a chunk that was written and is now
    gone (a removed chunk folder cannot be told from one never written)."""
    empty = []
    for name in names:
        for folder, subfolders, files in os.walk(path / name / "c"):
            if not subfolders and not files:
                empty.append(str(Path(folder).relative_to(path)))
    return sorted(empty)


def is_decoding_error(error: BaseException) -> bool:
    """Whether ``error`` was raised while zarr decoded a stored chunk (a damaged chunk file): the codecs
    raise plain RuntimeError / ValueError, so where it was raised is what tells it from a bug."""
    return any("/zarr/codecs/" in f.filename or f.filename.startswith("numcodecs/") or "/numcodecs/" in f.filename
               for f in traceback.extract_tb(error.__traceback__))


def export_netcdf(path: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write the trace as NetCDF (float variables as float32, which NetCDF needs); atomic. A probe
    group (:mod:`knowtrace.probe`) becomes the NetCDF group of the same name in the same file."""
    out = Path(out_file)
    open_trace(path)  # damaged metadata: an error saying so, before a file is made
    tmp = out.with_name(f".{out.name}.partial")
    try:
        _to_netcdf(path, tmp, mode="w")
        probe = Path(path) / PROBE_GROUP
        if probe.exists():
            _to_netcdf(probe, tmp, mode="a", group=PROBE_GROUP)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _to_netcdf(zarr_path, nc_file: Path, mode: str, group: str | None = None) -> None:
    import dask

    ds = xr.open_zarr(zarr_path)  # attrs stay JSON strings: NetCDF stores strings
    ds = ds.map(lambda v: v.astype("float32") if np.issubdtype(v.dtype, np.floating) else v)
    # one thread: with dask's thread pool, a failed chunk (a damaged trace) raises while other threads still
    # write, and xarray reopens the file by its name, re-creating the partial file after it was removed
    with dask.config.set(scheduler="synchronous"):
        ds.to_netcdf(nc_file, mode=mode, group=group, engine="h5netcdf")


def netcdf_groups(nc_file: str | os.PathLike) -> set[str]:
    """The names of the groups below the root of an exported trace (e.g. ``{"probe"}``)."""
    import h5netcdf

    with h5netcdf.File(nc_file, "r") as f:
        return set(f.groups)
