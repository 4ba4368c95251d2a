"""Plotly views of a trace (:mod:`knowtrace.schema`) as ``plotly.graph_objects.Figure`` objects (show them
in a notebook, or write them with :func:`save`): token log-probs over steps (FTTP paper Fig. 2), K_C and
K_N over steps (Fig. 3) and against each other (Fig. 5), answer tokens' attention over the image (Fig. 8)
and the SD per-latent-pixel noise error, one frame per step.

Values are plotted as stored: no smoothing, no rescaling. Steps where a sample was not in the batch are
NaN; lines bridge them (``connectgaps``) and markers show the recorded steps.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from .schema import SAMPLE, STEP, TOKEN

CONCEPT_COLOR = "#d62728"
OTHER_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#7f7f7f", "#bcbd22", "#e377c2")
# what to do to record each variable, for the "this trace has no X" errors
HOW_TO_RECORD = {
    **dict.fromkeys(("logprob", "K_C", "K_N"), "record a trace with knowtrace's MLLMTracer (or `unlearn mllm ... --trace`)"),
    "xattn": "run with attention capture enabled (the tracer's cross-attention capture of answer tokens "
             "to image patches)",
    "eps_err": "record an SD trace (per-latent-pixel noise error, eps_err)",
    "attr": "trace with probes and attribution (knowtrace.trace(..., probes=, attribution=AttributionOptions()))",
}


class ExportUnavailable(RuntimeError):
    """Static image export cannot run here (no kaleido or no Chromium); the message says how to fix it."""


class MissingVariableError(KeyError):
    """The trace lacks the variable a view needs. ``str()`` is the plain message (not KeyError's repr)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def variable(data: xr.Dataset | xr.DataArray, name: str) -> xr.DataArray:
    """``data[name]`` from a Dataset, or ``data`` itself when it is that DataArray; clear error if absent."""
    if isinstance(data, xr.DataArray):
        if data.name not in (None, name):
            raise MissingVariableError(f"expected the {name!r} variable of a trace, got a DataArray named {data.name!r}")
        return data
    if not isinstance(data, xr.Dataset):
        raise TypeError(f"expected an xarray Dataset or DataArray (a knowtrace trace), got {type(data).__name__}")
    if name not in data.variables:
        present = sorted(str(v) for v in data.data_vars)
        raise MissingVariableError(f"this trace has no {name}: {HOW_TO_RECORD.get(name, 'record it first')} "
                                   f"(variables in this trace: {', '.join(present) or 'none'})")
    return data[name]


def _values(da: xr.DataArray) -> np.ndarray:
    return np.asarray(da.values, dtype=np.float64)  # computes a dask-backed slice; float16 -> float64


def sample_index(data: xr.Dataset | xr.DataArray, sample: int | str) -> int:
    """A sample's index from its index or its id (coord ``sample_id``)."""
    if isinstance(sample, str):
        ids = [str(i) for i in data.coords["sample_id"].values] if "sample_id" in data.coords else []
        if sample not in ids:
            known = f"; ids: {ids[:8]}{' ...' if len(ids) > 8 else ''}" if ids else " (it has no sample ids: give an index)"
            raise KeyError(f"no sample with id {sample!r} in this trace{known}")
        return ids.index(sample)
    return sample


def _pick_sample(da: xr.DataArray, sample: int | str) -> tuple[int, xr.DataArray]:
    """The sample's index (from an index or id, range-checked) and its selection."""
    sample = sample_index(da, sample)
    n = da.sizes[SAMPLE]
    if not isinstance(sample, (int, np.integer)) or not -n <= sample < n:
        raise IndexError(f"sample {sample!r} is out of range: this trace has {n} samples (0..{n - 1})")
    return sample, da.isel({SAMPLE: int(sample)})


def _sample_text(da: xr.DataArray, sample) -> str:
    """'sample 2 (id)' for titles; ``da`` is the one-sample selection."""
    sid = str(da.coords["sample_id"].values) if "sample_id" in da.coords else ""
    return f"sample {sample}" + (f" ({sid})" if sid and sid != str(sample) else "")


def clean_token(s: str) -> str:
    """A token string for a label: the tokenizers' word-start markers (SentencePiece "▁", byte-level
    BPE "Ġ") dropped, so labels read "3:foo"."""
    return str(s).lstrip("▁Ġ") or str(s)


def _answer_positions(da: xr.DataArray) -> list[int]:
    """Answer positions of one sample that are not padding (token_id -1 / token_str "" per the schema)."""
    if "token_id" in da.coords:
        return [int(i) for i in np.flatnonzero(np.asarray(da.coords["token_id"].values) >= 0)]
    if "token_str" in da.coords:
        return [int(i) for i in np.flatnonzero(np.asarray(da.coords["token_str"].values).astype(object) != "")]
    return list(range(da.sizes[TOKEN]))


def _title(data, text: str) -> str:
    method = data.attrs.get("method") if hasattr(data, "attrs") else None
    name = method.get("name") if isinstance(method, dict) else method if isinstance(method, str) else None
    if not name:
        return text
    head, sep, rest = text.partition("<br>")  # the method goes on the first line
    return f"{head} ({name}){sep}{rest}"


# ---------------------------------------------------------------------------------------- Fig. 2
def token_trajectories(logprob: xr.DataArray | xr.Dataset, sample: int | str = 0) -> go.Figure:
    """log p of each answer token of ``sample`` over steps: one line per answer position.

    Lines are named "pos:token" so a token that occurs twice keeps two lines; concept tokens are red
    and thick, the others thin (coords ``token_str`` / ``is_concept`` when present).
    """
    full = variable(logprob, "logprob")
    sample, da = _pick_sample(full, sample)  # da: (step, token)
    steps = da[STEP].values.tolist()
    # object: a StringDType coord (how Zarr v3 strings read back) does not cast to fixed-width str
    strs = da.coords["token_str"].values.astype(object) if "token_str" in da.coords else None
    concept = da.coords["is_concept"].values.astype(bool) if "is_concept" in da.coords else np.zeros(da.sizes[TOKEN], bool)
    values = _values(da.transpose(STEP, TOKEN))  # (step, token)
    fig = go.Figure()
    for k, pos in enumerate(_answer_positions(da)):
        label = f"{pos}:{clean_token(strs[pos])}" if strs is not None else str(pos)
        is_c = bool(concept[pos])
        fig.add_trace(go.Scatter(
            x=steps, y=values[:, pos], name=label, mode="lines+markers", connectgaps=True,
            line=dict(color=CONCEPT_COLOR if is_c else OTHER_COLORS[k % len(OTHER_COLORS)], width=4 if is_c else 1.5),
            marker=dict(size=7 if is_c else 4), legendgroup="concept" if is_c else "other",
            legendgrouptitle_text="concept tokens" if is_c else "other answer tokens",
            hovertemplate=f"{label}<br>step %{{x}}<br>log p %{{y:.4f}}<extra>{'concept' if is_c else ''}</extra>",
        ))
    concept_name = str(da.coords["concept"].values) if "concept" in da.coords else ""
    fig.update_layout(title=_title(logprob, f"Token log-probabilities<br><sub>{_sample_text(da, sample)}"
                                            + (f", concept {concept_name}" if concept_name else "") + "</sub>"),
                      xaxis_title="step", yaxis_title="log p(token | image, prefix)", legend=dict(groupclick="toggleitem"))
    return fig


# ---------------------------------------------------------------------------------------- Fig. 3
def _band(fig, x, lo, hi, color, name, row):
    fig.add_trace(go.Scatter(x=x, y=hi, mode="lines", line=dict(width=0), showlegend=False, hoverinfo="skip",
                             legendgroup=name, connectgaps=True), row=row, col=1)
    rgba = "rgba({},{},{},0.2)".format(*(int(color[i:i + 2], 16) for i in (1, 3, 5)))  # "#rrggbb", translucent
    fig.add_trace(go.Scatter(x=x, y=lo, mode="lines", line=dict(width=0), fill="tonexty", showlegend=False,
                             fillcolor=rgba, hoverinfo="skip", legendgroup=name, connectgaps=True),
                  row=row, col=1)


def _nan_stats(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-step mean, std, min, max over samples (axis 1), ignoring NaN; all-NaN steps stay NaN."""
    seen = ~np.isnan(v).all(1)
    out = [np.full(v.shape[0], np.nan) for _ in range(4)]
    if seen.any():
        w = v[seen]
        for o, f in zip(out, (np.nanmean, np.nanstd, np.nanmin, np.nanmax)):
            o[seen] = f(w, axis=1)
    return tuple(out)


def knowledge_over_steps(data: xr.Dataset | xr.DataArray, k_n: xr.DataArray | None = None,
                         samples: str | int | Sequence[int | str] = "mean", band: str | None = "range",
                         log_y: bool = False) -> go.Figure:
    """K_C (top) and K_N (bottom) over steps, from a trace or the K_C DataArray (then ``k_n`` is K_N).

    ``samples``: "mean" (over the samples recorded at each step, with a ``band``: "range" = min..max,
    "std" = mean +- one standard deviation, None), "all", or an index / id / list of them (a line each).
    """
    if band not in ("range", "std", None):
        raise ValueError(f"band must be 'range', 'std' or None, got {band!r}")
    k_c = variable(data, "K_C")
    k_n = variable(data if k_n is None else k_n, "K_N")
    steps = k_c[STEP].values.tolist()
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("Conceptual knowledge K_C", "Natural knowledge K_N"))
    colors = {"K_C": CONCEPT_COLOR, "K_N": OTHER_COLORS[0]}
    for row, (name, da) in enumerate((("K_C", k_c), ("K_N", k_n)), start=1):
        v = _values(da.transpose(STEP, SAMPLE))  # (step, sample)
        fig.update_yaxes(title_text=name, type="log" if log_y else None, row=row, col=1)
        if isinstance(samples, str) and samples == "mean":
            mean, std, lo, hi = _nan_stats(v)
            if band is not None:
                _band(fig, steps, *((lo, hi) if band == "range" else (mean - std, mean + std)), colors[name], name, row)
            fig.add_trace(go.Scatter(x=steps, y=mean, name=f"{name} (mean of {v.shape[1]} samples)", mode="lines+markers",
                                     line=dict(color=colors[name], width=3), connectgaps=True, legendgroup=name),
                          row=row, col=1)
            continue
        if isinstance(samples, str) and samples == "all":
            chosen = range(v.shape[1])
        else:  # an index or id, or a list of them
            chosen = [samples] if isinstance(samples, (int, np.integer, str)) else list(samples)
        chosen = [_pick_sample(da, s)[0] for s in chosen]  # indices, range-checked
        for s in chosen:
            fig.add_trace(go.Scatter(x=steps, y=v[:, s], name=f"{name} sample {s}", mode="lines+markers",
                                     connectgaps=True, legendgroup=name,
                                     line=dict(color=colors[name] if len(chosen) == 1 else None)), row=row, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_layout(title=_title(data, "Conceptual and natural knowledge over steps"))
    return fig


# ---------------------------------------------------------------------------------------- Fig. 5
def last_finite(da: xr.DataArray) -> np.ndarray:
    """Per sample, the value at the last step where it is finite (NaN if never): (sample,)."""
    v = _values(da.transpose(STEP, SAMPLE))
    out = np.full(v.shape[1], np.nan)
    for s in range(v.shape[1]):
        ok = np.flatnonzero(np.isfinite(v[:, s]))
        if len(ok):
            out[s] = v[ok[-1], s]
    return out


def knowledge_scatter(runs: Mapping[str, xr.Dataset], mode: str = "final", log: bool = False) -> go.Figure:
    """K_C (x) against K_N (y), one trace per run (e.g. per method). ``mode="final"``: one point per run,
    the mean over samples of each sample's last recorded value; ``"trajectory"``: the per-step mean over
    samples as a path from the first step (open marker) to the last."""
    if mode not in ("final", "trajectory"):
        raise ValueError(f"mode must be 'final' or 'trajectory', got {mode!r}")
    if not runs:
        raise ValueError("no runs to plot: give a dict of name -> trace Dataset")
    fig = go.Figure()
    for k, (name, ds) in enumerate(runs.items()):
        k_c, k_n = variable(ds, "K_C"), variable(ds, "K_N")
        color = OTHER_COLORS[k % len(OTHER_COLORS)]
        if mode == "final":
            x, y = float(np.nanmean(last_finite(k_c))), float(np.nanmean(last_finite(k_n)))
            fig.add_trace(go.Scatter(x=[x], y=[y], name=name, mode="markers+text", text=[name],
                                     textposition="top center", marker=dict(size=12, color=color),
                                     hovertemplate=f"{name}<br>K_C %{{x:.4g}}<br>K_N %{{y:.4g}}<extra></extra>"))
            continue
        steps = k_c[STEP].values
        x, y = (_nan_stats(_values(k.transpose(STEP, SAMPLE)))[0] for k in (k_c, k_n))  # per-step means
        ok = np.isfinite(x) & np.isfinite(y)
        symbols = ["circle-open"] + ["circle"] * (int(ok.sum()) - 1)
        fig.add_trace(go.Scatter(x=x[ok], y=y[ok], name=name, mode="lines+markers", customdata=steps[ok],
                                 line=dict(color=color), marker=dict(symbol=symbols, size=9, color=color),
                                 hovertemplate=f"{name}<br>step %{{customdata}}<br>K_C %{{x:.4g}}<br>K_N %{{y:.4g}}"
                                               f"<extra></extra>"))
    kind = "log" if log else None
    fig.update_layout(title="Conceptual vs natural knowledge" + (" (final step)" if mode == "final" else " over steps"),
                      xaxis=dict(title="K_C (conceptual knowledge)", type=kind),
                      yaxis=dict(title="K_N (natural knowledge)", type=kind))
    return fig


# ---------------------------------------------------------------------------------------- Fig. 8
def _as_image(image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"image must be (height, width, 3) RGB (array or PIL image), got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and arr.max() <= 1.0:
        arr = arr * 255.0  # [0, 1] floats
    return np.clip(arr[..., :3], 0, 255).astype(np.uint8)


def mask_outline(mask: np.ndarray, x0: float, dx: float, y0: float, dy: float) -> tuple[list, list]:
    """The cell edges between mask and non-mask cells (and the grid border) as one polyline with None
    breaks: exact to the cell, unlike a smoothed contour. ``mask``: (y, x) bool; cell (i, j) is
    centred at (x0 + j dx, y0 + i dy)."""
    padded = np.pad(mask, 1)
    xs, ys = [], []
    for i, j in zip(*np.nonzero(mask)):
        cx, cy = x0 + j * dx, y0 + i * dy
        left, right, top, bottom = cx - dx / 2, cx + dx / 2, cy - dy / 2, cy + dy / 2
        for (di, dj), (xa, ya, xb, yb) in (((-1, 0), (left, top, right, top)), ((1, 0), (left, bottom, right, bottom)),
                                           ((0, -1), (left, top, left, bottom)), ((0, 1), (right, top, right, bottom))):
            if not padded[i + 1 + di, j + 1 + dj]:
                xs += [xa, xb, None]
                ys += [ya, yb, None]
    return xs, ys


def map_slider(maps: xr.DataArray, image=None, title: str = "", colorbar: str = "", opacity: float = 0.55,
               contour: np.ndarray | None = None, panels: int | None = None, signed: bool = False) -> go.Figure:
    """A heatmap per step with a step slider; one colour range over all steps, so frames compare.
    ``maps``: (step, y, x); ``image`` (H, W, 3) is drawn under it, each map cell stretched over its pixels;
    ``contour`` (y, x) bool is outlined on top (cell edges). ``panels=n``: a static grid of n evenly spaced
    steps instead (first and last included): what a PNG can show (a slider's image is its first frame).
    ``signed``: a diverging colour scale centred on 0 (attributions: blue lowers, red raises the log-prob)."""
    maps = maps.transpose(STEP, "y", "x")
    z = _values(maps)  # (step, y, x)
    steps = maps[STEP].values.tolist()
    finite = z[np.isfinite(z)]
    if not finite.size:  # nothing to draw: say so rather than show an empty grid
        raise ValueError(f"nothing recorded for this map: all values are NaN ({title.split('<br>')[-1]}); "
                         f"a text-only sample has no image maps, and a sample that was in no traced batch none at all")
    zmin, zmax = float(finite.min()), float(finite.max())
    if signed:
        zmax = max(abs(zmin), abs(zmax))
        zmin = -zmax
    colorscale = "RdBu_r" if signed else "Inferno"
    ny, nx = z.shape[1:]
    img = _as_image(image) if image is not None else None
    if img is not None:
        h, w = img.shape[:2]
        cell = dict(x0=(w / nx) / 2 - 0.5, dx=w / nx, y0=(h / ny) / 2 - 0.5, dy=h / ny)  # image pixel centres are integers
    else:
        cell = dict(x0=0, dx=1, y0=0, dy=1)
    # the grid's extent exactly; row 0 at the top (reversed range); square cells
    y_range = [cell["y0"] + (ny - 0.5) * cell["dy"], cell["y0"] - cell["dy"] / 2]
    x_range = [cell["x0"] - cell["dx"] / 2, cell["x0"] + (nx - 0.5) * cell["dx"]]

    def heat(k, show_scale=True):
        return go.Heatmap(z=z[k], zmin=zmin, zmax=zmax, colorscale=colorscale, opacity=opacity if img is not None else 1.0,
                          colorbar=dict(title=colorbar), showscale=show_scale,
                          hovertemplate="x %{x}<br>y %{y}<br>%{z:.4g}<extra></extra>", **cell)

    def layers(k, show_scale=True) -> list:
        """The traces of step k: image, map, mask outline; the map's index among them."""
        out = [go.Image(z=img, hoverinfo="skip")] if img is not None else []
        out.append(heat(k, show_scale))
        if contour is not None:
            xs, ys = mask_outline(np.asarray(contour, dtype=bool), **cell)
            out.append(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="cyan", width=2), name="concept mask",
                                  hoverinfo="skip", showlegend=False))
        return out

    if panels is not None:
        return _map_panels(layers, steps, int(panels), x_range, y_range, title)
    fig = go.Figure(layers(0))
    heat_index = 1 if img is not None else 0
    fig.frames = [go.Frame(data=[heat(k)], traces=[heat_index], name=str(s)) for k, s in enumerate(steps)]
    fig.update_layout(
        title=title,
        yaxis=dict(range=y_range, scaleanchor="x", constrain="domain"),
        xaxis=dict(range=x_range, constrain="domain"),
        sliders=[dict(active=0, currentvalue=dict(prefix="step "), pad=dict(t=40), steps=[
            dict(label=str(s), method="animate",
                 args=[[str(s)], dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))])
            for s in steps])],
        updatemenus=[dict(type="buttons", showactive=False, x=0, y=0, xanchor="right", yanchor="top", pad=dict(t=40, r=10),
                          buttons=[dict(label="play", method="animate",
                                        args=[None, dict(frame=dict(duration=400, redraw=True), fromcurrent=True)]),
                                   dict(label="pause", method="animate",
                                        args=[[None], dict(mode="immediate", frame=dict(duration=0, redraw=False))])])],
    )
    return fig


def panel_steps(n_steps: int, panels: int) -> list[int]:
    """Indices of ``panels`` evenly spaced steps out of ``n_steps``, first and last included, no repeats."""
    if panels < 1:
        raise ValueError(f"panels must be >= 1, got {panels}")
    count = min(panels, n_steps)
    return sorted({round(i * (n_steps - 1) / max(count - 1, 1)) for i in range(count)})


def _map_panels(layers, steps: list, panels: int, x_range, y_range, title: str) -> go.Figure:
    chosen = panel_steps(len(steps), panels)
    cols = min(len(chosen), 3)
    rows = -(-len(chosen) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"step {steps[k]}" for k in chosen],
                        horizontal_spacing=0.03, vertical_spacing=0.08)
    for i, k in enumerate(chosen):
        row, col = i // cols + 1, i % cols + 1
        for trace in layers(k, show_scale=i == 0):  # one colour scale: every panel shares zmin/zmax
            fig.add_trace(trace, row=row, col=col)
        axis = "" if i == 0 else str(i + 1)
        fig.update_xaxes(range=x_range, constrain="domain", showticklabels=False, row=row, col=col)
        fig.update_yaxes(range=y_range, scaleanchor=f"x{axis}", constrain="domain", showticklabels=False,
                         row=row, col=col)
    fig.update_layout(title=title, width=300 * cols + 120, height=300 * rows + 120)
    return fig


def _select_tokens(da: xr.DataArray, tokens) -> list[int]:
    """Answer positions to show: given ones, else the concept's tokens, else every answer token."""
    n = da.sizes[TOKEN]
    if tokens is None:
        answer = _answer_positions(da)
        flags = da.coords["is_concept"].values.astype(bool) if "is_concept" in da.coords else np.zeros(n, bool)
        return [p for p in answer if flags[p]] or answer
    chosen = [tokens] if isinstance(tokens, (int, np.integer)) else list(tokens)
    bad = [t for t in chosen if not isinstance(t, (int, np.integer)) or not 0 <= t < n]
    if bad or not chosen:
        raise IndexError(f"token positions {bad or chosen} are out of range: "
                         f"this trace has {n} answer positions (0..{n - 1})")
    return [int(t) for t in chosen]


def attention_slider(xattn: xr.DataArray | xr.Dataset, sample: int | str = 0,
                     tokens: int | Sequence[int] | None = None, image=None, layer: int | str = "mean",
                     opacity: float = 0.55, panels: int | None = None) -> go.Figure:
    """Cross-attention of answer tokens to the image patches, one frame per step (slider; ``panels=n``: a
    static grid of n steps, for PNG). The map is the mean over ``tokens`` (answer positions; default: the
    concept's tokens, else all) and over the recorded layers (``layer="mean"``) or one decoder layer (its
    number in the ``layer`` coord, else an index). ``image``: the sample's image, drawn under the map."""
    full = variable(xattn, "xattn")
    sample, da = _pick_sample(full, sample)
    da = da.astype(np.float64)  # (step, layer, token, y, x); means in float64
    positions = _select_tokens(da, tokens)
    if isinstance(layer, str):
        if layer != "mean":
            raise ValueError(f"layer must be 'mean' or a decoder layer number, got {layer!r}")
        by_layer, layer_text = da.mean("layer"), "mean over layers"
    elif "layer" in da.coords:  # the decoder layer number the tracer recorded (coord ``layer``)
        recorded = [int(v) for v in da["layer"].values]
        if layer not in recorded:
            raise IndexError(f"layer {layer} was not recorded: this trace has decoder layers {recorded}")
        by_layer, layer_text = da.sel(layer=layer), f"layer {layer}"
    else:  # no layer coord: an index into the recorded layers
        n = da.sizes["layer"]
        if not -n <= layer < n:
            raise IndexError(f"layer {layer} is out of range: this trace has {n} recorded layers")
        by_layer, layer_text = da.isel(layer=layer), f"layer #{layer}"
    maps = by_layer.isel({TOKEN: positions}).mean(TOKEN)  # (step, y, x)
    strs = da.coords["token_str"].values.astype(object) if "token_str" in da.coords else None
    names = ", ".join(f"{p}:{clean_token(strs[p])}" if strs is not None else str(p) for p in positions)
    title = f"Attention of [{names}] over the image<br><sub>{_sample_text(da, sample)}, {layer_text}</sub>"
    return map_slider(maps, image=image, opacity=opacity, colorbar="attention", title=_title(xattn, title),
                      panels=panels)


def attribution_slider(attr: xr.DataArray | xr.Dataset, sample: int | str = 0,
                       tokens: int | Sequence[int] | None = None, image=None, opacity: float = 0.55,
                       panels: int | None = None) -> go.Figure:
    """Integrated-gradients attribution (``attr``, probe mode) of answer tokens to the image patches, one frame per
    step that has one (slider; ``panels=n``: a static grid). The map is the *sum* over ``tokens`` (default: the
    concept's tokens, else all attributed ones): by IG's linearity, the attribution of their summed log-prob (the
    whole name). Signed, on a diverging scale centred on 0; ``image`` is drawn under it."""
    full = variable(attr, "attr")
    sample, da = _pick_sample(full, sample)
    da = da.astype(np.float64)  # (step, token, y, x)
    attributed = np.isfinite(_values(da)).any(axis=(0, 2, 3))
    positions = [p for p in _select_tokens(da, tokens) if attributed[p]] if tokens is None else _select_tokens(da, tokens)
    positions = positions or [int(p) for p in np.flatnonzero(attributed)]
    if not positions:
        raise ValueError(f"nothing recorded for this map: no answer token of {_sample_text(da, sample)} was attributed "
                         f"(a text-only sample has no image)")
    maps = da.isel({TOKEN: positions}).sum(TOKEN, skipna=False)  # (step, y, x); NaN at steps without attribution
    maps = maps.isel({STEP: np.flatnonzero(np.isfinite(_values(maps)).any(axis=(1, 2)))})
    strs = da.coords["token_str"].values.astype(object) if "token_str" in da.coords else None
    names = ", ".join(f"{p}:{clean_token(strs[p])}" if strs is not None else str(p) for p in positions)
    title = f"Attribution of [{names}] to the image patches (integrated gradients)<br><sub>{_sample_text(da, sample)}</sub>"
    return map_slider(maps, image=image, opacity=opacity, colorbar="attribution", title=_title(attr, title),
                      panels=panels, signed=True)


def eps_err_slider(eps_err: xr.DataArray | xr.Dataset, sample: int | str = 0, image=None,
                   opacity: float = 0.55, panels: int | None = None) -> go.Figure:
    """SD: the per-latent-pixel squared noise error of ``sample`` over steps (slider, or ``panels``
    evenly spaced steps in a static grid); the concept's mask (coord ``mask``) is outlined when the
    trace has it."""
    full = variable(eps_err, "eps_err")
    sample, da = _pick_sample(full, sample)  # da: (step, y, x)
    contour = np.asarray(da.coords["mask"].values, dtype=bool) if "mask" in da.coords else None
    title = f"Noise-prediction error over the latent grid<br><sub>{_sample_text(da, sample)}</sub>"
    return map_slider(da, image=image, opacity=opacity, colorbar="error", contour=contour, title=_title(eps_err, title),
                      panels=panels)


# ---------------------------------------------------------------------------------------- saving
def png_unavailable() -> str | None:
    """Why static image export cannot work here (None when it can): kaleido 1.x and a Chromium
    (an executable file; a BROWSER_PATH that names none counts as none)."""
    if importlib.util.find_spec("kaleido") is None:
        return "PNG export needs kaleido>=1.0: pip install kaleido"
    try:  # kaleido's own browser lookup (choreographer): BROWSER_PATH, PATH, typical install paths
        from choreographer.browsers.chromium import Chromium

        found = Chromium.find_browser(skip_local=False)
    except (ImportError, AttributeError, TypeError):  # another choreographer version: look on PATH
        found = os.environ.get("BROWSER_PATH") or next(
            filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome"))), None)
    if found is None or not (os.path.isfile(found) and os.access(found, os.X_OK)):
        return ("PNG export needs a Chromium for kaleido: apt-get install -y chromium (Debian/Ubuntu), "
                "or set BROWSER_PATH to a Chrome/Chromium binary")
    return None


def save(figures: Mapping[str | os.PathLike, go.Figure]) -> list[Path]:
    """Write figures by file suffix: .html (self-contained, works offline) or .png/.svg/.pdf/.jpg/.webp
    (kaleido; all static images in ONE browser start, ~2.5 s). Each file is written under a temporary
    name and renamed, so a failure leaves no half-written file."""
    static_suffixes = {".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp"}
    items = [(Path(p), f) for p, f in figures.items()]
    for path, _ in items:
        if path.suffix.lower() not in static_suffixes | {".html"}:
            raise ValueError(f"{path}: unknown figure format {path.suffix!r}; "
                             f"use .html or one of {sorted(static_suffixes)}")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"{path}: directory {path.parent} does not exist")
    static = [(p, f) for p, f in items if p.suffix.lower() in static_suffixes]
    if static and (why := png_unavailable()):
        raise ExportUnavailable(why)
    tmps = {p: p.with_name(f".{p.stem}.partial{p.suffix}") for p, _ in items}
    try:
        for path, fig in items:
            if path.suffix.lower() == ".html":
                fig.write_html(tmps[path], include_plotlyjs=True, auto_play=False)
        if static:
            import plotly.io as pio

            pio.write_images([f for _, f in static], [tmps[p] for p, _ in static])  # one browser start for all
            # kaleido can return without writing a file when its browser fails (seen on a machine loaded to
            # 4 on 2 cores): try those once more, then say which figure is missing instead of failing on rename
            missing = [(p, f) for p, f in static if not tmps[p].exists()]
            if missing:
                pio.write_images([f for _, f in missing], [tmps[p] for p, _ in missing])
            still = [str(p) for p, _ in missing if not tmps[p].exists()]
            if still:
                raise ExportUnavailable(f"kaleido wrote no image for {', '.join(still)} (twice): its Chromium "
                                        f"failed or timed out; try again, or save as .html")
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    return [p for p, _ in items]
