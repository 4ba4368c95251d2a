"""Fig. 5: K_C against K_N after unlearning, one point per MLLM method (mean over the training
image's questions), with the starting model, on the world MLLM.

    python figures/fig5_kc_kn.py [--concept grom] [--steps 10] [--methods ...]
"""

from __future__ import annotations

from common import parser, probe_trace, save


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--concept", default="grom")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--methods", nargs="+")
    args = ap.parse_args()
    from knowtrace.plots import knowledge_scatter

    from unlearn.methods import METHODS

    traces = {}
    for method in args.methods or sorted(METHODS):
        traces[method] = probe_trace(args, method)
    first = next(iter(traces.values()))
    traces = {"original": first.isel(step=[0]), **traces}  # step -1: the starting model
    fig = knowledge_scatter(traces, mode="final", log=True)
    fig.update_layout(title=f"K_C vs K_N after {args.steps} steps, per method (concept {args.concept}; log scales)")
    numbers = {m: {"K_C": float(ds["K_C"].isel(step=-1).mean()), "K_N": float(ds["K_N"].isel(step=-1).mean())}
               for m, ds in traces.items()}
    save({"fig5_kc_kn": fig}, args.out, png=not args.no_png, numbers={"fig5_kc_kn": numbers})


if __name__ == "__main__":
    main()
