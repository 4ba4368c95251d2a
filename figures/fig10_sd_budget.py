"""Fig. 10 (SD budget): FTTP's UA and FD on the world SD against the number of training images (at a
fixed number of steps) and against the number of steps (at a fixed number of images). One run per
point (resumable: saved runs are reused, and re-evaluated only if the evaluation settings changed).
The default evaluation is small so the figure finishes in minutes; raise --eval-seeds / --fd-seeds
for tighter numbers (a UA step is 100 / eval-seeds points; FDs are comparable only at equal
--fd-seeds).

    python figures/fig10_sd_budget.py [--concept vorn] [--images 1 2 3 5] [--steps 5 10 20 30]
        [--fixed-steps 20] [--fixed-images 5] [--eval-seeds 10] [--fd-seeds 3]
"""

from __future__ import annotations

from common import parser, save
from sd_common import WORLD_LR, sd_run


def figure(sweeps: dict, original: dict | None, title: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cols = list(sweeps)
    fig = make_subplots(rows=2, cols=len(cols), shared_yaxes=True, vertical_spacing=0.1, horizontal_spacing=0.06,
                        subplot_titles=[f"{m} vs {c}" for m in ("UA %", "FD") for c in cols])
    for col, name in enumerate(cols, start=1):
        points = sweeps[name]
        xs = [p["x"] for p in points]
        for row, key in enumerate(("ua", "fd"), start=1):
            fig.add_trace(go.Scatter(x=xs, y=[p[key] for p in points], mode="lines+markers", name="FTTP",
                                     line=dict(color="#d62728", width=3), showlegend=row == 1 and col == 1),
                          row=row, col=col)
            if original is not None:
                fig.add_trace(go.Scatter(x=[min(xs), max(xs)], y=[original[key]] * 2, mode="lines", name="original model",
                                         line=dict(color="grey", dash="dash"), showlegend=row == 1 and col == 1),
                              row=row, col=col)
        fig.update_xaxes(title_text=name, row=2, col=col)
    fig.update_yaxes(title_text="UA % (higher = forgotten)", row=1, col=1)
    fig.update_yaxes(title_text="FD (lower = kept)", row=2, col=1)
    fig.update_layout(title=title, width=1000, height=650)
    return fig


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--concept", default="vorn")
    ap.add_argument("--method", default="fttp")
    ap.add_argument("--images", nargs="+", type=int, default=[1, 2, 3, 5], help="image counts (at --fixed-steps)")
    ap.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20, 30], help="step counts (at --fixed-images)")
    ap.add_argument("--fixed-steps", type=int, default=20)
    ap.add_argument("--fixed-images", type=int, default=5)
    ap.add_argument("--lr", type=float, default=WORLD_LR, help=f"default {WORLD_LR:g}, the world SD's lr (docs/sd.md)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seeds", type=int, default=10, help="UA images of the concept's prompt")
    ap.add_argument("--fd-seeds", type=int, default=3, help="FD images per retained (non-style) concept")
    args = ap.parse_args()

    def point(steps, images, x):
        run, m = sd_run(args.runs, args.concept, args.method, steps, images, args.lr, args.seed, args.eval_seeds,
                        args.fd_seeds, world_dir=args.world_dir, progress=not args.quiet)
        print(f"{args.method} steps={steps} images={images}: UA {m['ua']:.0f} FD {m['fd']:.2f} "
              f"K_C {m['K_C']:.3f} K_N {m['K_N']:.3f}", flush=True)
        return {"x": x, "steps": steps, "images": images, "ua": m["ua"], "fd": m["fd"], "K_C": m["K_C"],
                "K_N": m["K_N"], "retained_mean": m["retained_mean"], "run": str(run), "original": m.get("original")}

    sweeps = {"training images": [point(args.fixed_steps, n, n) for n in args.images],
              "steps": [point(s, args.fixed_images, s) for s in args.steps]}
    # the starting model's UA / FD (same evaluation settings: taken from any run evaluated with them; its
    # K_C / K_N depend on the run's forget images, so they are not a single reference and are left out)
    original = next((p["original"] for ps in sweeps.values() for p in ps if p["original"]), None)
    for ps in sweeps.values():
        for p in ps:
            p.pop("original")
    numbers = {"concept": args.concept, "method": args.method, "lr": args.lr, "seed": args.seed,
               "eval_seeds": args.eval_seeds, "fd_seeds": args.fd_seeds, "fd_space": "world-classifier-features",
               "original": None if original is None else {k: original[k] for k in ("ua", "fd", "retained_mean")},
               "sweeps": sweeps}
    title = (f"SD {args.method.upper()} budget on the world SD, concept {args.concept}<br>images at {args.fixed_steps} steps, "
             f"steps at {args.fixed_images} images (UA over {args.eval_seeds} seeds, FD {args.fd_seeds} per concept)")
    save({"fig10_sd_budget": figure(sweeps, numbers["original"], title)}, args.out, png=not args.no_png,
         numbers={"fig10_sd_budget": numbers})


if __name__ == "__main__":
    main()
