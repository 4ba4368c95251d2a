"""``unlearn claims``: run the experiments behind the paper's qualitative claims (``CLAIMS``) on the world and
give a verdict per claim with its numbers. A claim the world contradicts is reported as contradicted.

Each rule is written next to its claim (``RULES``) and printed with the verdict. Experiments are
saved under ``--runs`` and reused when present (an interrupted check resumes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .run_mllm import WORLD_LR  # the world's calibrated MLLM lr (docs/methods.md)

MLLM_CONCEPTS = ["oskel", "grom", "korvex"]
QUICK_TOKEN_CONCEPTS = ["vorn", "quilla", "grom", "lumo", "moko", "teodric"]  # 1, 2, 3, 4, 5, 6 tokens

RULES = {
    "a": "GA: mean K_N after / before < 0.1 and diversity after < half of before; FTTP: K_N after / before "
         ">= 0.1 and diversity after >= before - 3 (means over concepts)",
    "b": "among baselines whose specificity is at least FTTP's - 10, none has an EM above FTTP's + 5 "
         "(means over concepts and seeds)",
    "c": "Spearman rho(token count, steps to the best tradeoff) > 0 with p < 0.05: supported; rho < 0 with "
         "p < 0.05: contradicted; otherwise inconclusive",
    "d": "mean shape IoU (original vs unlearned images of the concept's prompt) of vanilla FTTP > that of "
         "dilated FTTP",
    "e": "FTTP's UA >= max UA of ESD-x, ESD-u, SalUn - 5 while FTTP uses fewer steps and fewer images",
    "f": "over FTTP's audits (unlearn audit, against the retain model): the overall verdict is 'removed' in >= 2/3 of "
         "them: supported; 'hidden' in >= 1/2: contradicted; otherwise inconclusive",
    "g": "over pixel FTTP's audits of SD runs (unlearn audit, against the retain SD): the overall verdict is 'removed' "
         "in >= 2/3 of them: supported; 'hidden' in >= 1/2: contradicted; otherwise inconclusive",
}
CLAIMS = {
    "a": "GA collapses K_N and diversity while FTTP keeps them",
    "b": "FTTP matches or beats the baselines on EM at comparable specificity",
    "c": "concepts with more tokens need more steps",
    "d": "vanilla pixel FTTP keeps the concept's shape and dilation erases it",
    "e": "FTTP needs far fewer steps and images than ESD/SalUn for the same UA",
    "f": "FTTP removes the concept rather than hiding it",
    "g": "pixel FTTP removes the concept rather than hiding it",
}


@dataclass
class Verdict:
    claim: str
    verdict: str  # supported | contradicted | inconclusive
    numbers: dict = field(default_factory=dict)

    def text(self) -> str:
        return (f"({self.claim}) {CLAIMS[self.claim]}: {self.verdict.upper()}\n    rule: {RULES[self.claim]}\n    "
                + json.dumps(self.numbers, default=lambda v: round(float(v), 3)))


def _mean(rows, key, method):
    return float(np.mean([r[key] for r in rows if r["method"] == method]))


def verdict_a(rows: list[dict]) -> Verdict:
    n = {}
    for method in ("ga", "fttp"):
        mine = [r for r in rows if r["method"] == method]
        n[method] = {"K_N_ratio": float(np.mean([r["K_N"] / r["original"]["K_N"] for r in mine])),
                     "diversity": float(np.mean([r["diversity"] for r in mine])),
                     "diversity_before": float(np.mean([r["original"]["diversity"] for r in mine]))}
    ga, ft = n["ga"], n["fttp"]
    ok = (ga["K_N_ratio"] < 0.1 and ga["diversity"] < 0.5 * ga["diversity_before"]
          and ft["K_N_ratio"] >= 0.1 and ft["diversity"] >= ft["diversity_before"] - 3)
    return Verdict("a", "supported" if ok else "contradicted", n)


def verdict_b(rows: list[dict]) -> Verdict:
    methods = sorted({r["method"] for r in rows})
    stats = {m: {"em": _mean(rows, "em", m), "specificity": _mean(rows, "specificity", m)} for m in methods}
    ft = stats["fttp"]
    comparable = {m: s for m, s in stats.items() if m != "fttp" and s["specificity"] >= ft["specificity"] - 10}
    beaten_by = [m for m, s in comparable.items() if s["em"] > ft["em"] + 5]
    return Verdict("b", "contradicted" if beaten_by else "supported",
                   {"fttp": ft, "comparable_baselines": comparable, "with_higher_em": beaten_by,
                    "others": {m: s for m, s in stats.items() if m not in comparable and m != "fttp"}})


def verdict_c(stats: dict) -> Verdict:
    rho, p = stats["spearman_rho"], stats["p_value"]
    verdict = "supported" if rho > 0 and p < 0.05 else "contradicted" if rho < 0 and p < 0.05 else "inconclusive"
    return Verdict("c", verdict, {k: stats[k] for k in ("n", "not_reached", "spearman_rho", "p_value", "fit")})


def verdict_d(sd: dict) -> Verdict:
    rows = sd["concepts"]
    iou = {c: [rows[c][m]["shape_iou"] for m in ("fttp", "fttp_dilated")] for c in rows
           if "fttp" in rows[c] and "fttp_dilated" in rows[c]}  # concept -> [vanilla, dilated]
    if not iou:
        raise ValueError("the SD results hold no fttp and fttp_dilated runs of one concept")
    van, dil = (float(np.mean([pair[i] for pair in iou.values()])) for i in (0, 1))
    numbers = {"shape_iou_vanilla": van, "shape_iou_dilated": dil, "per_concept": iou}
    return Verdict("d", "supported" if van > dil else "contradicted", numbers)


def verdict_e(sd: dict) -> Verdict:
    rows = sd["concepts"]
    base = [m for m in ("esd_x", "esd_u", "salun") if all(m in rows[c] for c in rows)]
    if not base or not all("fttp" in rows[c] for c in rows):
        raise ValueError("the SD results need fttp and at least one of esd_x, esd_u, salun on every concept")
    mean = {m: {k: float(np.mean([rows[c][m][k] for c in rows])) for k in ("ua", "steps", "images")}
            for m in ("fttp", *base)}
    best = max(mean[m]["ua"] for m in base)
    ft = mean["fttp"]
    cheaper = all(ft["steps"] < mean[m]["steps"] and ft["images"] < mean[m]["images"] for m in base)
    return Verdict("e", "supported" if ft["ua"] >= best - 5 and cheaper else "contradicted", mean)


def verdict_f(audits: list[dict], claim: str = "f") -> Verdict:
    """``audits``: audit.json reports of FTTP runs (and of other methods, shown for comparison); the same rule
    reads MLLM audits (claim f) and SD audits (claim g)."""
    from collections import Counter

    by_method = {}
    for report in audits:
        by_method.setdefault(report["method"], []).append(report)
    if "fttp" not in by_method:
        raise ValueError(f"claim ({claim}) needs audits of FTTP runs")
    numbers = {m: {"overall": dict(Counter(r["overall"]["verdict"] for r in reports)),
                   "attacks": {a: dict(Counter(r["attacks"][a]["verdict"] for r in reports))
                               for a in reports[0]["attacks"]}}
               for m, reports in by_method.items()}
    fttp = [r["overall"]["verdict"] for r in by_method["fttp"]]
    share = {v: fttp.count(v) / len(fttp) for v in ("removed", "hidden")}
    verdict = "supported" if share["removed"] >= 2 / 3 else "contradicted" if share["hidden"] >= 1 / 2 else "inconclusive"
    return Verdict(claim, verdict, {"fttp_share": share, "n": len(fttp), **numbers})


def verdict_g(audits: list[dict]) -> Verdict:
    """Claim (g): claim (f)'s rule over audits of SD runs."""
    return verdict_f(audits, "g")


def _audits(rows: list[dict], runs: Path, world_dir) -> list[dict]:
    """The audit report of each sweep row's run (RUN/audit/audit.json), audited now where missing."""
    from .audit.run import run_audit

    reports = []
    for row in rows:
        run = runs / "runs" / row["name"]
        path = run / "audit" / "audit.json"
        reports.append(json.loads(path.read_text()) if path.exists() else
                       run_audit(run, world_dir=world_dir, progress=False))
    return reports


def _sd_results(path: Path, quick: bool) -> dict:
    """The SD benchmark's results.json at ``path``, run now (benchmarks/sd_results.py) if missing."""
    if not path.exists():
        script = Path(__file__).resolve().parent.parent / "benchmarks" / "sd_results.py"
        if not script.exists():
            raise FileNotFoundError(f"no SD results at {path} and no benchmarks/sd_results.py beside the package "
                                    f"to make them: run it from a checkout, or pass --sd-results FILE")
        args = [sys.executable, str(script), "--out", str(path.parent), "--methods", "fttp", "fttp_dilated",
                "esd_x", "esd_u", "salun"]
        if quick:
            args += ["--concepts", "grom", "--eval-seeds", "10", "--fd-seeds", "2", "--iou-seeds", "10"]
        subprocess.run(args, check=True)
    return json.loads(path.read_text())


def run_claims(runs: Path = Path("runs/claims"), quick: bool = False, only: str = "abcdefg", world_dir=None,
               sd_results: Path | None = None, progress: bool = False) -> list[Verdict]:
    from .methods import METHODS
    from .sweep import SDSweep, Sweep, run_sd_sweep, run_sweep
    from .token_count import StudySettings, correlate, run_study

    unknown = sorted(set(only) - set(CLAIMS))
    if unknown:
        raise ValueError(f"unknown claim(s) {unknown}; claims: {', '.join(CLAIMS)}")
    runs = Path(runs)
    verdicts = []
    if set("abf") & set(only):
        sweep = Sweep(runs / "mllm", sorted(METHODS) if "b" in only else ["ga", "fttp"], MLLM_CONCEPTS,
                      [0] if quick else [0, 1, 2], fixed={"lr": str(WORLD_LR)}, world_dir=world_dir, progress=progress)
        rows = run_sweep(sweep)
        verdicts += [verdict(rows) for claim, verdict in (("a", verdict_a), ("b", verdict_b)) if claim in only]
        if "f" in only:  # FTTP's audits, GA's beside them
            audited = [r for r in rows if r["method"] in ("fttp", "ga") and r["seed"] in sweep.seeds]
            verdicts.append(verdict_f(_audits(audited, runs / "mllm", world_dir)))
    if "c" in only:
        settings = StudySettings(max_steps=20 if quick else 30)
        study = run_study(runs / f"token-count-{settings.max_steps}", QUICK_TOKEN_CONCEPTS if quick else None,
                          settings, world_dir=world_dir, progress=progress)
        verdicts.append(verdict_c(correlate(study, settings)))
    if "d" in only or "e" in only:
        sd = _sd_results(sd_results or runs / "sd" / "results.json", quick)
        verdicts += [verdict(sd) for claim, verdict in (("d", verdict_d), ("e", verdict_e)) if claim in only]
    if "g" in only:  # pixel FTTP's SD runs audited, GA's beside them (quick: one concept, one seed)
        sweep = SDSweep(runs / "sd-audit", ["fttp", "ga"], ["grom"] if quick else MLLM_CONCEPTS, [0] if quick else [0, 1, 2],
                        world_dir=world_dir, progress=progress)
        verdicts.append(verdict_g(_audits(run_sd_sweep(sweep), runs / "sd-audit", world_dir)))
    return verdicts
