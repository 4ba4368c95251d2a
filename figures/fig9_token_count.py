"""Fig. 9: name length in tokens vs FTTP steps to the best unlearning-utility tradeoff, over every
world concept (definition in unlearn/token_count.py), with Spearman's rho and a least-squares line.

    python figures/fig9_token_count.py [--max-steps 30] [--every 2] [--concepts ...]
"""

from __future__ import annotations

from common import parser, save

from unlearn.token_count import StudySettings, correlate, run_study


def figure(rows, stats, settings):
    import numpy as np
    import plotly.graph_objects as go

    fig = go.Figure()
    beyond = settings.max_steps + settings.every
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind]
        jitter = np.linspace(-0.12, 0.12, len(mine))  # concepts with equal values stay visible
        fig.add_trace(go.Scatter(
            x=[r["tokens"] + j for r, j in zip(mine, jitter)],
            y=[r["best_step"] if r["best_step"] is not None else beyond for r in mine], mode="markers", name=kind,
            marker=dict(size=11, symbol=["circle" if r["best_step"] is not None else "x" for r in mine]),
            text=[f"{r['name']} ({r['tokens']} tokens): best step {r['best_step']}, H {r['best_tradeoff']}" for r in mine],
            hoverinfo="text"))
    xs = np.array([1, max(r["tokens"] for r in rows)])
    fig.add_trace(go.Scatter(x=xs, y=stats["fit"]["intercept"] + stats["fit"]["slope"] * xs, mode="lines",
                             name=f"fit: {stats['fit']['intercept']:.1f} + {stats['fit']['slope']:.2f} x tokens",
                             line=dict(dash="dash", color="gray")))
    fig.update_layout(title=f"Token count vs FTTP steps to the best tradeoff (Spearman rho {stats['spearman_rho']:.2f}, "
                            f"p {stats['p_value']:.3f}, n {stats['n']}; x = not reached in {settings.max_steps} steps)",
                      xaxis_title="concept name length (world tokens)", yaxis_title="steps to the best tradeoff")
    return fig


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--max-steps", type=int, default=StudySettings.max_steps)
    ap.add_argument("--every", type=int, default=StudySettings.every)
    ap.add_argument("--concepts", nargs="+", help="default: every world concept")
    args = ap.parse_args()
    settings = StudySettings(max_steps=args.max_steps, every=args.every)
    rows = run_study(args.runs / "token-count", args.concepts, settings, world_dir=args.world_dir,
                     progress=not args.quiet)
    stats = correlate(rows, settings)
    for r in rows:
        print(f"{r['concept']:9s} {r['kind']:8s} {r['tokens']} tokens  best step {r['best_step']}  H {r['best_tradeoff']}")
    print({k: v for k, v in stats.items() if k != "definition"})
    save({"fig9_token_count": figure(rows, stats, settings)}, args.out, png=not args.no_png,
         numbers={"fig9_token_count": {"settings": vars(settings), "stats": stats, "concepts": rows}})


if __name__ == "__main__":
    main()
