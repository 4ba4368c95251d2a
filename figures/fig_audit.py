"""Forgotten or hidden? The forgetting audit of GA and FTTP runs on a world concept (``unlearn audit``): per
method, how fast relearning on the forget records brings the concept back (unlearned vs the retain model that
never saw it, and the original as the ceiling), how well a probe trained afresh on each model's hidden states
decodes the concept, where the logit lens still finds its name, and the answers to rephrased questions and
after int8 quantization.

    python figures/fig_audit.py [--concept grom] [--methods ga fttp] [--retain-model PATH|none]

The runs are the figures' world MLLM runs (10 steps, the world's lr); each is audited into RUN/audit (reused
when it was audited with the same options), against the world's retain model of the concept by default
(built and cached the first time: several minutes).
"""

from __future__ import annotations

from common import audited, mllm_run, parser, save

MODEL_COLORS = {"original": "#1f77b4", "unlearned": "#d62728", "retain": "#2ca02c"}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--concept", default="grom")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=["ga", "fttp"])
    ap.add_argument("--retain-model", help="a model directory, or none (default: the world's retain model)")
    ap.add_argument("--relearn-steps", type=int, default=10)
    args = ap.parse_args()
    from plotly.subplots import make_subplots

    options = {"relearn.steps": str(args.relearn_steps)}
    columns = ["relearning on the forget records: % naming it", "fresh probe accuracy per layer",
               "logit lens: share with the name in the top 10", "% naming it: rephrased / int8"]
    fig = make_subplots(rows=len(args.methods), cols=4, subplot_titles=[f"{m}: {c}" for m in args.methods
                                                                         for c in columns])
    numbers, shown = {}, set()
    for row, method in enumerate(args.methods, start=1):
        run = mllm_run(args.runs, args.concept, method, args.steps, world_dir=args.world_dir, progress=not args.quiet)
        ds, report = audited(run, options, args.retain_model, args.world_dir)
        numbers[method] = {"overall": report["overall"]["verdict"],
                           **{a: {"verdict": v["verdict"], "numbers": v["numbers"]} for a, v in report["attacks"].items()}}
        for model in ds["model"].values:
            model = str(model)
            style = dict(name=model, legendgroup=model, showlegend=model not in shown,
                         line_color=MODEL_COLORS[model])
            shown.add(model)
            panels = [("relearn_identified", "relearn_step", {"relearn_set": "forget"}),
                      ("probes_fresh_accuracy", "probes_layer", {}), ("lens_top", "lens_layer", {})]
            for col, (var, x, sel) in enumerate(panels, start=1):
                if var in ds:
                    da = ds[var].sel(model=model, **sel)
                    fig.add_scatter(x=da[x].values, y=da.values, mode="lines+markers", row=row, col=col, **style)
            bars = [float(ds["rephrase_identified"].sel(model=model, rephrase_questions="rephrased"))
                    if "rephrase_identified" in ds else None,
                    float(ds["quantize_identified"].sel(model=model, quantize_precision="int8"))
                    if "quantize_identified" in ds else None]
            fig.add_bar(x=["rephrased", "int8"], y=bars, name=model, legendgroup=model, showlegend=False,
                        marker_color=MODEL_COLORS[model], row=row, col=4)
    fig.update_layout(title=f"Forgotten or hidden? The audit of {', '.join(args.methods)} on {args.concept} "
                            f"({args.steps} steps)", barmode="group", height=360 * len(args.methods) + 120,
                      width=1700)
    save({"fig_audit": fig}, args.out, png=not args.no_png, numbers={"fig_audit": numbers})


if __name__ == "__main__":
    main()
