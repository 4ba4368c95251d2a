"""An HTML report comparing finished MLLM runs: a metrics table and the knowtrace views.

The report is one self-contained file (plotly.js inlined once, so it opens offline): the metrics of
the starting model and of every run, K_C and K_N over steps (Fig. 3), K_C against K_N (Fig. 5), the
token log-probs of the identification answer over training (Fig. 2) and, when the runs traced
attention, the answer's attention over the training image before and after (Fig. 8). A plain-text
summary is written beside it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

METRICS = ("efficacy", "em", "em_identify", "em_yesno", "specificity", "diversity", "K_C", "K_N")


def _load(run: Path) -> tuple[dict, dict]:
    from .runs import describe_state, read_manifest, run_state

    run = Path(run)
    if run_state(run) != "complete":
        raise ValueError(describe_state(run, read_manifest(run)))
    return json.loads((run / "metrics.json").read_text()), json.loads((run / "manifest.json").read_text())


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) and abs(v) >= 1000 else (f"{v:.1f}" if isinstance(v, float) else str(v))


def metrics_rows(runs: dict[str, Path]) -> list[tuple[str, dict]]:
    """(label, metrics) for the starting model, then each run."""
    loaded = {name: _load(path)[0] for name, path in runs.items()}
    first = next(iter(loaded.values()))
    return [("original", first["original"])] + list(loaded.items())


def summary_text(runs: dict[str, Path]) -> str:
    rows = metrics_rows(runs)
    _, manifest = _load(next(iter(runs.values())))
    lines = [f"concept {manifest['concept']} ({', '.join(manifest['names'])}), {manifest['train']['steps']} steps, "
             f"lr {manifest['train']['lr']}, {manifest['images']} image(s), seed {manifest['seed']}"]
    lines += [f"{label:10s} " + "  ".join(f"{k} {_fmt(m[k])}" for k in METRICS if k in m) for label, m in rows]
    return "\n".join(lines) + "\n"


def _figures(runs: dict[str, Path]) -> list[tuple[str, object]]:
    import knowtrace
    from knowtrace import plots
    from PIL import Image

    def best_trace(run: Path):
        # the probes (the same training-image questions at every step, step -1 = before training) when
        # traced; else the training steps' own forwards (each step holds only its batch's samples)
        path = Path(run) / "trace.zarr"
        if (path / "probe").exists():
            return "the training image's questions (probes)", knowtrace.open_probe_trace(path)
        return "the forget answers", knowtrace.open_trace(path)

    traces = {name: best_trace(p) for name, p in runs.items() if (Path(p) / "trace.zarr").exists()}
    if not traces:
        raise FileNotFoundError("none of the runs has a trace.zarr: run them with --trace")
    figs = [(f"K_C and K_N of {what} over steps, {name}", plots.knowledge_over_steps(ds))
            for name, (what, ds) in traces.items()]
    figs.append(("K_C against K_N, first to last step",
                 plots.knowledge_scatter({n: ds for n, (_, ds) in traces.items()}, mode="trajectory", log=True)))
    figs += [("Token log-probabilities of the identification answer, " + name, plots.token_trajectories(ds, 0))
             for name, (_, ds) in traces.items()]
    for name, (_, ds) in traces.items():
        if "xattn" in ds:
            image_path = Path(runs[name]) / "samples" / "probe-0.png"
            image = Image.open(image_path).convert("RGB") if image_path.exists() else None
            figs.append((f"Attention of the concept's answer tokens over the training image (step -1 = before), {name}",
                         plots.attention_slider(ds, 0, image=image)))
    return figs


def write_report(runs: dict[str, Path], out: Path, title: str = "Unlearning report") -> Path:
    """Write ``out`` (HTML) and ``out``'s sibling summary.txt; returns the HTML path."""
    out = Path(out)
    rows = metrics_rows(runs)
    figs = _figures(runs)
    head = "".join(f"<th>{k}</th>" for k in METRICS)
    body = "".join(f"<tr><th>{html.escape(label)}</th>" + "".join(f"<td>{_fmt(m.get(k, ''))}</td>" for k in METRICS)
                   + "</tr>" for label, m in rows)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}pre{background:#f6f6f6;padding:1em}</style>",
             f"</head><body><h1>{html.escape(title)}</h1><pre>{html.escape(summary_text(runs))}</pre>",
             "<p>Percentages 0-100. efficacy: training image; em: unseen images (identify and yes/no questions); "
             "specificity: other concepts and facts; diversity: unique words / words; K_C, K_N: Eq. 3, 5 on the "
             "forget answers (higher = more knowledge).</p>",
             f"<table><tr><th></th>{head}</tr>{body}</table>"]
    for i, (caption, fig) in enumerate(figs):
        parts += [f"<h2>{html.escape(caption)}</h2><div class='figure'>",
                  fig.to_html(full_html=False, include_plotlyjs=(i == 0), auto_play=False), "</div>"]
    parts.append("</body></html>")
    tmp = out.with_name(f".{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("\n".join(parts))
    tmp.replace(out)
    (out.parent / "summary.txt").write_text(summary_text(runs))
    return out
