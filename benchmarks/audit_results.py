"""Benchmark: the forgetting audit over every MLLM method x 3 world concepts x 3 seeds at the world's lr
(``--kind sd``: every SD method x 3 concepts at the SD benchmark's budgets).

    python benchmarks/audit_results.py --out runs/bench-audit                      # trains what is missing
    python benchmarks/audit_results.py --out runs/bench-audit --runs runs/claims/mllm   # audit Table 1's runs
    python benchmarks/audit_results.py --kind sd --out runs/bench-audit-sd --seeds 0

The runs are Table 1's sweep (``benchmarks/mllm_results.py --set lr=3e-3``: LoRA, lr 3e-3, 10 steps, 1
image); SD runs are the SD benchmark's (benchmarks/sd_results.py: full UNet fine-tuning, lr 3e-5, FTTP / FwD /
GA / FMN 20 steps on 5 images, ESD-x / ESD-u / SalUn / SA 100 steps on 20), made by :func:`unlearn.sweep.run_sd_sweep`
as run directories (DIR/runs/<concept>-<method>-s<seed>). ``--runs DIR`` audits the runs of an existing sweep instead (DIR/runs/<concept>-<method>-...), training
those it lacks into it. Each run is audited against the world's retain model of its concept (built and cached
the first time: ``unlearn world build --retain CONCEPT`` / ``--retain-sd CONCEPT``) into RUN/audit (``unlearn audit RUN``); a run already
audited is skipped, so an interrupted benchmark resumes. Writes ``audits.jsonl`` (one line per audit),
``results.md`` (verdict counts and the figures each rule read, per concept and method) and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from mllm_sweep import add_arguments, sweep_of  # noqa: E402

from unlearn.methods import METHODS, SD_METHODS  # noqa: E402
from unlearn.sweep import SDSweep, run_sd_sweep, run_sweep, sd_budget  # noqa: E402

# kind -> column -> (attack, path to the number in its verdict): the figures the verdict rules read, mean over seeds
FIGURES = {"mllm": {
    "relearn gap vs retain (forget/unseen/unrelated)": ("relearn", ("gap_unlearned_minus_retain",)),
    "rephrased id. % (unlearned)": ("rephrase", ("identified_on_rephrased", "unlearned")),
    "rephrased id. % (retain)": ("rephrase", ("identified_on_rephrased", "retain")),
    "int8 id. % (unlearned)": ("quantize", ("unlearned_int8",)),
    "privleak (unlearned)": ("mia", ("privleak_unlearned",)),
    "probe hidden layers": ("probes", ("hidden_layers",)),
    "lens hidden layers": ("lens", ("hidden_layers",)),
}, "sd": {
    "K_C share (unlearned between retain 0 and original 1)": ("knowledge", ("share",)),
    "drawn % at the run's guidance (unlearned)": ("sampling", ("drawn_at_run_guidance", "unlearned")),
    "drawn gap vs retain per guidance": ("sampling", ("gap_unlearned_minus_retain",)),
    "relearn mean drawn % (unlearned)": ("relearn", ("mean_drawn_relearning", "unlearned")),
    "relearn mean drawn % (retain)": ("relearn", ("mean_drawn_relearning", "retain")),
    "inversion drawn % (unlearned)": ("inversion", ("unlearned_attack",)),
    "inversion drawn % (retain)": ("inversion", ("retain_attack",)),
    "adversarial drawn % (unlearned)": ("adversarial", ("unlearned_attack",)),
    "adversarial drawn % (retain)": ("adversarial", ("retain_attack",)),
}}


def figure(row: dict, attack: str, path: tuple[str, ...]):
    value = row["attacks"].get(attack, {}).get("numbers", {})
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return len(value) if isinstance(value, list) else value  # a list of layers: how many


def audit_row(run: Path, name: str, args) -> dict:
    from unlearn.audit.run import run_audit

    report_path = run / "audit" / "audit.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
    else:
        options = dict(kv.split("=", 1) for kv in args.audit_set)
        report = run_audit(run, options=options, seed=args.audit_seed, world_dir=args.world_dir,
                           progress=False)
    concept, method, *_ = name.split("-")
    return {"name": name, "concept": concept, "method": method, "overall": report["overall"]["verdict"],
            "attacks": {a: {"verdict": v["verdict"], "numbers": v["numbers"]} for a, v in report["attacks"].items()},
            "seconds": report["timings_seconds"]["total"]}


def _mean(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def summarise(rows: list[dict], concepts, methods, kind: str = "mllm") -> tuple[dict, str]:
    """Per concept and method: overall and per-attack verdict counts over seeds, and the rules' figures."""
    attacks = sorted({a for r in rows for a in r["attacks"]}, key=lambda a: list(rows[0]["attacks"]).index(a))
    figures = FIGURES[kind]
    header = ["concept", "method", "overall", *attacks, *figures]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table = {}
    for concept in concepts:
        for method in methods:
            got = [r for r in rows if r["concept"] == concept and r["method"] == method]
            if not got:
                continue

            def counts(verdicts):
                c = Counter(verdicts)
                return " ".join(f"{k[0].upper()}{c[k]}" for k in ("removed", "hidden", "inconclusive") if c[k])

            entry = {"n": len(got), "overall": dict(Counter(r["overall"] for r in got)),
                     "attacks": {a: dict(Counter(r["attacks"][a]["verdict"] for r in got if a in r["attacks"]))
                                 for a in attacks}, "figures": {}}
            cells = [concept, method, counts([r["overall"] for r in got])]
            cells += [counts([r["attacks"][a]["verdict"] for r in got if a in r["attacks"]]) for a in attacks]
            for column, (attack, path) in figures.items():
                values = [figure(r, attack, path) for r in got]
                if any(isinstance(v, dict) for v in values):  # per relearning set
                    keys = next(v for v in values if isinstance(v, dict))
                    mean = {k: _mean([v.get(k) for v in values if isinstance(v, dict)]) for k in keys}
                    cell = "/".join("-" if m is None else f"{m:.0f}" for m in mean.values())
                else:
                    mean = _mean(values)
                    cell = "-" if mean is None else f"{mean:.1f}"
                entry["figures"][column] = mean
                cells.append(cell)
            table[f"{concept}/{method}"] = entry
            lines.append("| " + " | ".join(cells) + " |")
    legend = ("R/H/I: how many seeds' audits said removed / hidden / inconclusive. Figures: means over seeds of the "
              "numbers the verdict rules read (docs/audit.md).")
    return table, "\n".join(lines) + "\n\n" + legend


def claim_over(rows: list[dict], kind: str):
    """The paper claim these audits test, by unlearn.claims' rule: (f) "FTTP removes the concept rather than
    hiding it" on MLLM runs, (g) the same for pixel FTTP on SD runs; None when no FTTP run was audited."""
    from unlearn.claims import verdict_f, verdict_g

    if not any(r["method"] == "fttp" for r in rows):
        return None
    # the rows hold what the rule reads (each audit's method, overall verdict, attacks' verdicts): no file re-read
    reports = [{"method": r["method"], "overall": {"verdict": r["overall"]}, "attacks": r["attacks"]} for r in rows]
    return {"mllm": verdict_f, "sd": verdict_g}[kind](reports)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, methods_required=False)
    ap.set_defaults(seeds=[0, 1, 2], set=["lr=0.003"])  # run names as Table 1's: <concept>-<method>-lr0.003-s<seed>
    ap.add_argument("--runs", type=Path, help="an existing sweep's --out whose runs to audit (default: --out)")
    ap.add_argument("--audit-set", action="append", default=[], metavar="ATTACK.OPTION=VALUE")
    ap.add_argument("--audit-seed", type=int, default=0)
    ap.add_argument("--kind", choices=("mllm", "sd"), default="mllm", help="audit MLLM runs or SD runs (SD: --steps, "
                    "--grid and --set do not apply; each method runs at the SD benchmark's budget)")
    args = ap.parse_args()
    args.methods = args.methods or sorted(METHODS if args.kind == "mllm" else SD_METHODS)
    runs_dir = args.runs or args.out
    if args.kind == "sd":
        made = run_sd_sweep(SDSweep(runs_dir, args.methods, args.concepts, args.seeds, world_dir=args.world_dir))
    else:
        sweep = sweep_of(args)
        sweep.out = runs_dir
        made = run_sweep(sweep)
    trained = [r for r in made if r["method"] in args.methods and r["concept"] in args.concepts
               and r["seed"] in args.seeds]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "audits.jsonl"
    done = {json.loads(line)["name"]: json.loads(line) for line in log.read_text().splitlines()} if log.exists() else {}
    rows = []
    for r in trained:
        if r["name"] not in done:
            done[r["name"]] = audit_row(runs_dir / "runs" / r["name"], r["name"], args)
            with log.open("a") as f:
                f.write(json.dumps(done[r["name"]]) + "\n")
            print(f"{r['name']}: {done[r['name']]['overall']} "
                  + " ".join(f"{a}={v['verdict']}" for a, v in done[r["name"]]["attacks"].items()), flush=True)
        rows.append(done[r["name"]])
    table, text = summarise(rows, args.concepts, args.methods, args.kind)
    claim = claim_over(rows, args.kind)
    if claim is not None:
        text += (f"\n\nclaim ({claim.claim}) over these audits (unlearn.claims' rule; FTTP: {claim.numbers['n']} audits, "
                 f"shares {claim.numbers['fttp_share']}): **{claim.verdict}**")
    trained_as = {"steps": args.steps, "set": args.set} if args.kind == "mllm" else \
        {"budgets": {m: dict(zip(("steps", "images"), sd_budget(m))) for m in args.methods}, "lr": SDSweep.lr}
    settings = {"kind": args.kind, **trained_as, "seeds": args.seeds, "audit_set": args.audit_set,
                "audit_seed": args.audit_seed, "runs": str(runs_dir)}
    (args.out / "results.json").write_text(json.dumps({"settings": settings, "results": table,
                                                       "claim": None if claim is None else claim.__dict__}, indent=1))
    (args.out / "results.md").write_text(f"settings: {json.dumps(settings)}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
