"""Fig. 3 (SD): Conceptual (K_C) and Natural (K_N) knowledge of the forget images over unlearning steps,
GA vs FTTP, on the world SD (one non-style concept; step -1 = before training). K is Eq. 4, 6 on the
per-latent-pixel noise error of a fixed-noise probe recorded by `unlearn sd --trace` (docs/sd.md).

    python figures/fig3_sd_knowledge.py [--concept vorn] [--steps 20] [--images 5]
"""

from __future__ import annotations

from common import parser, save
from panels import side_by_side
from sd_common import WORLD_LR, sd_run


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--concept", default="vorn")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--lr", type=float, default=WORLD_LR, help=f"default {WORLD_LR:g}, the world SD's lr (docs/sd.md)")
    ap.add_argument("--eval-seeds", type=int, default=20, help="UA images (the run's own evaluation)")
    ap.add_argument("--fd-seeds", type=int, default=5, help="FD images per retained concept")
    args = ap.parse_args()
    import knowtrace
    from knowtrace.plots import knowledge_over_steps

    figs, numbers = {}, {}
    for method in ("ga", "fttp"):
        run, metrics = sd_run(args.runs, args.concept, method, args.steps, args.images, args.lr,
                              eval_seeds=args.eval_seeds, fd_seeds=args.fd_seeds, trace=True, world_dir=args.world_dir,
                              progress=not args.quiet)
        ds = knowtrace.open_trace(run / "trace.zarr")
        figs[f"SD {method.upper()}"] = knowledge_over_steps(ds)
        numbers[f"sd_{method}"] = {
            "run": str(run), "steps": ds.step.values.tolist(),
            "K_C": ds["K_C"].mean("sample").values.astype(float).tolist(),
            "K_N": ds["K_N"].mean("sample").values.astype(float).tolist(),
            "ua": metrics["ua"], "fd": metrics["fd"], "ua_original": metrics["original"]["ua"],
            "fd_original": metrics["original"]["fd"], "fd_space": metrics["fd_space"]}
    fig = side_by_side(figs, f"SD: K_C and K_N of the {args.images} forget images over steps<br>concept {args.concept} "
                             f"(world SD, lr {args.lr:g})", rows_per_fig=2, width=1000, height=600)
    save({"fig3_sd_knowledge": fig}, args.out, png=not args.no_png, numbers={"fig3_sd_knowledge": numbers})


if __name__ == "__main__":
    main()
