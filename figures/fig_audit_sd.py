"""Forgotten or hidden, in pixels? The forgetting audit of SD runs on a world concept (``unlearn audit``): per
method, how fast relearning on the concept's unseen images brings it back (unlearned vs the retain SD that
never saw it, and the original as the ceiling), what each model draws over guidance scales, what textual
inversion and adversarial prompts get out of it (beside what its name gets), and K_C of the unseen images.

    python figures/fig_audit_sd.py [--concept oskel] [--methods ga fttp] [--retain-model PATH|none]

The runs are world SD runs at the SD benchmark's budget (20 steps on 5 images, lr 3e-5, full UNet); each is
audited into RUN/audit (reused when it was audited with the same options), against the world's retain SD of
the concept by default (built and cached the first time: about 12 minutes on 2 free cores).
"""

from __future__ import annotations

from common import audited, parser, save, sd_run

MODEL_COLORS = {"original": "#1f77b4", "unlearned": "#d62728", "retain": "#2ca02c"}
COLUMNS = ["relearning on unseen images: % drawn", "% drawn per guidance scale",
           "% drawn: name / inversion / adversarial", "K_C of the unseen images"]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--concept", default="oskel")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--methods", nargs="+", default=["ga", "fttp"])
    ap.add_argument("--eval-seeds", type=int, default=20, help="the runs' UA images")
    ap.add_argument("--fd-seeds", type=int, default=5, help="the runs' FD images per retained concept")
    ap.add_argument("--retain-model", help="an SD pipeline directory, or none (default: the world's retain SD)")
    ap.add_argument("--set", action="append", default=[], metavar="ATTACK.OPTION=VALUE",
                    help="an audit option (e.g. relearn.steps=4), repeatable")
    args = ap.parse_args()
    from plotly.subplots import make_subplots

    options = dict(kv.split("=", 1) for kv in args.set)
    fig = make_subplots(rows=len(args.methods), cols=len(COLUMNS),
                        subplot_titles=[f"{m}: {c}" for m in args.methods for c in COLUMNS])
    numbers, shown = {}, set()
    for row, method in enumerate(args.methods, start=1):
        run = sd_run(args.runs, args.concept, method, args.steps, args.images, args.lr, eval_seeds=args.eval_seeds,
                     fd_seeds=args.fd_seeds, world_dir=args.world_dir, progress=not args.quiet)
        ds, report = audited(run, options, args.retain_model, args.world_dir)
        numbers[method] = {"overall": report["overall"]["verdict"],
                           **{a: {"verdict": v["verdict"], "numbers": v["numbers"]} for a, v in report["attacks"].items()}}
        for model in map(str, ds["model"].values):
            style = dict(name=model, legendgroup=model, showlegend=model not in shown, marker_color=MODEL_COLORS[model])
            shown.add(model)
            lines = [("relearn_drawn", "relearn_step"), ("sampling_drawn", "sampling_guidance")]
            for col, (var, x) in enumerate(lines, start=1):
                if var in ds:
                    da = ds[var].sel(model=model)
                    fig.add_scatter(x=da[x].values, y=da.values, mode="lines+markers", row=row, col=col,
                                    line_color=MODEL_COLORS[model], **style)
            bars = {"name": ds["inversion_drawn"].sel(model=model, inversion_asked="name")
                    if "inversion_drawn" in ds else None,
                    "inversion": ds["inversion_drawn"].sel(model=model, inversion_asked="attack")
                    if "inversion_drawn" in ds else None,
                    "adversarial": ds["adversarial_drawn"].sel(model=model, adversarial_asked="attack")
                    if "adversarial_drawn" in ds else None}
            fig.add_bar(x=list(bars), y=[None if v is None else float(v) for v in bars.values()], row=row, col=3,
                        **{**style, "showlegend": False})
            if "knowledge_K_C" in ds:
                k_c = ds["knowledge_K_C"].sel(model=model).where(ds["knowledge_set"] == "unseen", drop=True)
                fig.add_bar(x=[model], y=[float(k_c.mean())], row=row, col=4, **{**style, "showlegend": False})
    fig.update_layout(title=f"Forgotten or hidden? The SD audit of {', '.join(args.methods)} on {args.concept} "
                            f"({args.steps} steps, {args.images} images)", barmode="group",
                      height=360 * len(args.methods) + 120, width=1700)
    save({"fig_audit_sd": fig}, args.out, png=not args.no_png, numbers=numbers)


if __name__ == "__main__":
    main()
