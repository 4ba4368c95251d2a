"""Table 1: every MLLM method x 3 world concepts of different kinds, mean +- std over 3 seeds of EM,
specificity and diversity (and efficacy, K_C, K_N), next to the starting model. Runs what is missing
(resumable), at the world's calibrated lr by default; `--lr 3e-4` gives the paper's settings.

    python figures/table1_mllm.py [--lr 3e-3] [--seeds 0 1 2] [--concepts oskel grom korvex]
"""

from __future__ import annotations

from common import WORLD_LR, parser, save

from unlearn.sweep import Sweep, run_sweep, summarise


def table_figure(table: dict, concepts, methods, title: str):
    import plotly.graph_objects as go

    header = ["concept", "method", "EM", "specificity", "diversity", "efficacy"]
    rows = []
    for c in concepts:
        o = table[f"{c}/{methods[0]}"]["original"]
        rows.append([c, "(original)", *(f"{o[k]:.1f}" for k in ("em", "specificity", "diversity", "efficacy"))])
        for m in methods:
            r = table[f"{c}/{m}"]
            rows.append([c, m, *(f"{r[k][0]:.1f} ± {r[k][1]:.1f}" for k in ("em", "specificity", "diversity", "efficacy"))])
    fig = go.Figure(go.Table(header=dict(values=header), cells=dict(values=list(map(list, zip(*rows))))))
    fig.update_layout(title=title, height=120 + 26 * len(rows), width=900)
    return fig


def main() -> None:
    from unlearn.methods import METHODS

    ap = parser(__doc__)
    ap.add_argument("--lr", type=float, default=WORLD_LR)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--concepts", nargs="+", default=["oskel", "grom", "korvex"])
    ap.add_argument("--methods", nargs="+")
    args = ap.parse_args()
    methods = args.methods or sorted(METHODS)
    sweep = Sweep(args.runs / f"table1-lr{args.lr:g}", methods, args.concepts, args.seeds, args.steps,
                  fixed={"lr": f"{args.lr:g}"}, world_dir=args.world_dir)
    rows = [r for r in run_sweep(sweep) if r["method"] in methods and r["concept"] in args.concepts]
    table, text = summarise(rows, args.concepts, methods)
    print(text)
    fig = table_figure(table, args.concepts, methods, f"MLLM methods on the world: lr {args.lr:g}, {args.steps} steps, "
                                                        f"1 image, mean ± std over seeds {args.seeds}")
    name = f"table1_mllm_lr{args.lr:g}"
    save({name: fig}, args.out, png=not args.no_png, numbers={name: table})
    (args.out / f"{name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
