"""Plotly views of an audit dataset (``RUN/audit/audit.nc``): one panel per variable, whatever the model.

A variable over a ``model`` dimension is drawn with one colour per model: over a dimension named like
``*step`` or ``*layer`` as lines (one panel per value of any further dimension), else as grouped bars
over its other dimension. Values are drawn as stored. Per-record variables (a dimension named like
``*record``, e.g. the membership scores of every record) and text variables (e.g. the prompts an attack
found) stay in the dataset and get no panel: their summaries (e.g. the AUC) do.
"""

from __future__ import annotations

import itertools

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

MODEL_COLORS = {"original": "#1f77b4", "unlearned": "#d62728", "retain": "#2ca02c"}
OTHER_COLOR = "#7f7f7f"
LINE_DIMS = ("step", "layer")  # a dimension whose name ends so is drawn along the x axis as lines
PER_RECORD = "record"  # a dimension whose name ends so: one value per record, not drawn


def _line_dim(da: xr.DataArray) -> str | None:
    return next((d for d in da.dims if str(d).endswith(LINE_DIMS)), None)


def panels(ds: xr.Dataset) -> list[tuple[str, xr.DataArray]]:
    """(title, 1-d or 2-d slice with ``model`` first) per panel: a line variable split over its other dims."""
    out = []
    for name, da in ds.data_vars.items():
        if any(str(d).endswith(PER_RECORD) for d in da.dims) or not np.issubdtype(da.dtype, np.number):
            continue
        da = da.transpose("model", ...) if "model" in da.dims else da.expand_dims(model=["-"])
        line = _line_dim(da)
        split = [d for d in da.dims if d not in ("model", line)] if line else list(da.dims[2:])
        for values in itertools.product(*(da[d].values for d in split)):
            sel = dict(zip(split, values))
            where = ", ".join(f"{str(d).split('_', 1)[-1]} {v}" for d, v in sel.items())
            out.append((f"{name}" + (f" ({where})" if where else ""), da.sel(sel)))
    return out


def audit_figure(ds: xr.Dataset, columns: int = 3) -> go.Figure:
    """All of an audit dataset's variables, a panel each (see the module docs)."""
    if not ds.data_vars:
        raise ValueError("the audit dataset holds no variables: no attack ran (see audit.json for why)")
    items = panels(ds)
    cols = min(columns, len(items))
    rows = -(-len(items) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[t for t, _ in items],
                        vertical_spacing=min(0.3 / rows + 0.05, 0.12, 0.9 / max(rows - 1, 1)))
    shown = set()
    for i, (_, da) in enumerate(items):
        row, col = i // cols + 1, i % cols + 1
        line = _line_dim(da)
        x_dim = line or next((d for d in da.dims if d != "model"), "model")
        for model in da["model"].values:
            part = da.sel(model=model)
            model = str(model)
            x = part[x_dim].values if x_dim in part.dims else [model]
            y = np.atleast_1d(np.asarray(part.values, dtype=np.float64))
            style = dict(name=model, legendgroup=model, showlegend=model not in shown,
                         marker_color=MODEL_COLORS.get(model, OTHER_COLOR))
            shown.add(model)
            if line:
                fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", line_color=style.pop("marker_color"),
                                         **style), row=row, col=col)
            else:
                fig.add_trace(go.Bar(x=[str(v) for v in x], y=y, **style), row=row, col=col)
        fig.update_xaxes(title_text=str(x_dim).split("_", 1)[-1], row=row, col=col)
    title = "Forgetting audit" + (f": {ds.attrs['concept']}" if "concept" in ds.attrs else "") + \
        (f", {ds.attrs['method']}" if "method" in ds.attrs else "") + \
        (f" (verdict: {ds.attrs['verdict']})" if "verdict" in ds.attrs else "")
    fig.update_layout(title=title, barmode="group", height=320 * rows + 120, width=420 * cols + 120)
    return fig
