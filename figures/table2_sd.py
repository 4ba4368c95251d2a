"""Table 2 (SD): every SD method x world concepts with UA, FD, TS (training steps) and TI (training
images), plus retained-concept recognition, K_C and K_N, next to the starting model.

The numbers are benchmarks/sd_results.py's (the same code, not a copy): a results.json of it under
--runs that covers a concept with the requested methods and settings is reused; concepts not covered
are benchmarked now, one concept per directory (--runs/table2-sd/<concept>), so an interrupted table
resumes at the first concept it lacks. The benchmark's defaults are the budgets of docs/sd.md
(FTTP / FwD / GA / FMN 20 steps from 5 images; ESD-x, ESD-u, SalUn, SA 100 steps from 20 images),
about 9 minutes per concept on one core.

    python figures/table2_sd.py [--concepts oskel grom korvex] [--methods ...] [--eval-seeds 20] [--fd-seeds 5]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common import ROOT, parser, save

BENCHMARK = ROOT / "benchmarks" / "sd_results.py"
# benchmark settings that change its numbers (must match for a saved result to be reused)
SETTINGS = ("lr", "steps", "images", "baseline_steps", "baseline_images", "eval_seeds", "fd_seeds", "seed")
COLUMNS = (("ua", "UA %", "{:.0f}"), ("fd", "FD", "{:.2f}"), ("TS", "TS", "{}"), ("TI", "TI", "{}"),
           ("retained_mean", "retained %", "{:.0f}"), ("K_C", "K_C", "{:.3f}"), ("K_N", "K_N", "{:.3f}"))


def saved_rows(runs: Path, concept: str, methods: list[str], settings: dict) -> dict | None:
    """The concept's row of a saved benchmark results.json under ``runs`` with these settings, if any."""
    for path in sorted(Path(runs).rglob("results.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "fg_threshold" not in res or concept not in res.get("concepts", {}):  # not an sd_results.py output
            continue
        row = res["concepts"][concept]
        if all(res["settings"].get(k) == settings[k] for k in SETTINGS) and {"original", *methods} <= set(row):
            return {"source": str(path), **{m: row[m] for m in ("original", *methods)}}
    return None


def benchmark(runs: Path, concept: str, methods: list[str], settings: dict) -> dict:
    out = Path(runs) / "table2-sd" / concept
    cmd = [sys.executable, str(BENCHMARK), "--concepts", concept, "--methods", *methods, "--out", str(out)]
    for k in SETTINGS:
        cmd += [f"--{k.replace('_', '-')}", str(settings[k])]
    subprocess.run(cmd, check=True, cwd=ROOT)
    row = saved_rows(out, concept, methods, settings)
    if row is None:
        raise RuntimeError(f"{BENCHMARK.name} finished but {out}/results.json lacks {concept}/{methods}")
    return row


def table_figure(table: dict, methods: list[str], title: str):
    import plotly.graph_objects as go

    rows = []
    for concept, row in table.items():
        for method in ("original", *methods):
            r = row[method]
            values = {**r, "TS": r.get("steps", 0), "TI": r.get("images", 0)}
            rows.append([concept, method, *(fmt.format(values[k]) for k, _, fmt in COLUMNS)])
    header = ["concept", "method", *(name for _, name, _ in COLUMNS)]
    fig = go.Figure(go.Table(header=dict(values=header), cells=dict(values=list(map(list, zip(*rows))))))
    fig.update_layout(title=title, height=140 + 26 * len(rows), width=1000)
    return fig, header, rows


def main() -> None:
    from unlearn.methods import SD_METHODS

    ap = parser(__doc__)
    ap.add_argument("--concepts", nargs="+", default=["oskel", "grom", "korvex"])
    ap.add_argument("--methods", nargs="+", default=sorted(SD_METHODS))
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--steps", type=int, default=20, help="FTTP / FwD / GA / FMN steps")
    ap.add_argument("--images", type=int, default=5, help="FTTP / FwD / GA / FMN training images")
    ap.add_argument("--baseline-steps", type=int, default=100, help="ESD-x, ESD-u, SalUn, SA steps")
    ap.add_argument("--baseline-images", type=int, default=20, help="ESD-x, ESD-u, SalUn, SA training images")
    ap.add_argument("--eval-seeds", type=int, default=20, help="UA images of the concept's prompt")
    ap.add_argument("--fd-seeds", type=int, default=5, help="FD images per retained (non-style) concept")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    unknown = sorted(set(args.methods) - set(SD_METHODS))
    if unknown:
        ap.error(f"unknown sd method(s) {unknown}; sd methods: {', '.join(sorted(SD_METHODS))}")
    settings = {k: getattr(args, k) for k in SETTINGS}
    table = {}
    for concept in args.concepts:
        table[concept] = saved_rows(args.runs, concept, args.methods, settings) or \
            benchmark(args.runs, concept, args.methods, settings)
        print(f"{concept}: {table[concept]['source']}", flush=True)
    fig, header, rows = table_figure(table, args.methods, f"SD methods on the world SD (lr {args.lr:g}, seed {args.seed}; "
                                                          f"UA over {args.eval_seeds} seeds, FD in the world classifier's "
                                                          f"feature space, {args.fd_seeds} images per retained concept)")
    text = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)])
    print(text)
    save({"table2_sd": fig}, args.out, png=not args.no_png,
         numbers={"table2_sd": {"settings": settings, "fd_space": "world-classifier-features", "rows": table}})
    (args.out / "table2_sd.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
