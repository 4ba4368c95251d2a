"""The token-count study (paper Fig. 9): do concepts whose names have more tokens need more FTTP steps?

For every world concept (names of 1 to 6 world-tokenizer tokens) FTTP runs for ``max_steps`` steps
from one image, evaluated after every ``every`` steps (EM on unseen images, specificity).

**Steps to the best tradeoff** of a concept: the smallest evaluated step count s at which the
harmonic mean H(s) = 2 EM(s) Spec(s) / (EM(s) + Spec(s)) (both 0-100; H = 0 when either is 0)
reaches its maximum over the evaluated steps. A concept whose H stays 0 (never forgotten in
``max_steps``) has no best step: it is reported as not reached and ranked after every reached one
(given ``max_steps + every``) for the correlation, which says how many such concepts there were.

The correlation is Spearman's rho between token count and steps to the best tradeoff (scipy), with a
least-squares line steps = a + b * tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class StudySettings:
    method: str = "fttp"
    max_steps: int = 30
    every: int = 2
    lr: float = 3e-3  # the world's calibrated lr (docs/methods.md)
    seed: int = 0
    images: int = 1


def harmonic(em: float, spec: float) -> float:
    return 0.0 if em <= 0 or spec <= 0 else 2 * em * spec / (em + spec)


def steps_to_best_tradeoff(curve: list[dict]) -> tuple[int | None, float]:
    """(smallest step with the maximal H, that H); (None, 0.0) when H is 0 at every step."""
    if not curve:
        raise ValueError("empty evaluation curve")
    scores = [harmonic(r["em"], r["specificity"]) for r in curve]
    best = max(scores)
    if best <= 0:
        return None, 0.0
    return next(r["step"] for r, h in zip(curve, scores) if h == best), best


def run_study(out: Path, concepts=None, settings: StudySettings = StudySettings(), world_dir=None,
              progress: bool = True) -> list[dict]:
    """One run per concept under ``out`` (kept: a finished concept is read back, not run again)."""
    from .run_mllm import run_mllm
    from .runs import write_json
    from .world.concepts import CONCEPTS, get_concept
    from .world.tokenizer import build_tokenizer, count_tokens

    tok = build_tokenizer()
    chosen = [get_concept(c) for c in concepts] if concepts else list(CONCEPTS)
    rows = []
    for c in chosen:
        run = Path(out) / c.key
        metrics_file = run / "metrics.json"
        if metrics_file.exists() and json.loads((run / "manifest.json").read_text()).get("study") == vars(settings):
            metrics = json.loads(metrics_file.read_text())
        else:
            metrics = run_mllm(c.key, settings.method, run, steps=settings.max_steps, seed=settings.seed,
                               images=settings.images, options={"lr": settings.lr}, world_dir=world_dir,
                               progress=progress, overwrite=True, eval_every=settings.every)
            manifest = json.loads((run / "manifest.json").read_text())
            write_json(run / "manifest.json", {**manifest, "study": vars(settings)})
        step, score = steps_to_best_tradeoff(metrics["curve"])
        at = next((r for r in metrics["curve"] if r["step"] == step), None)
        rows.append({"concept": c.key, "kind": c.kind, "name": c.name, "tokens": count_tokens(tok, c.name),
                     "best_step": step, "best_tradeoff": round(score, 2),
                     "em_at_best": at["em"] if at else None, "specificity_at_best": at["specificity"] if at else None,
                     "curve": [{k: r[k] for k in ("step", "em", "specificity", "diversity")} for r in metrics["curve"]]})
    return rows


def correlate(rows: list[dict], settings: StudySettings = StudySettings()) -> dict:
    """Spearman's rho (and p) of token count vs steps to the best tradeoff, and a least-squares line."""
    from scipy.stats import spearmanr

    if len(rows) < 3:
        raise ValueError("the correlation needs at least 3 concepts")
    beyond = settings.max_steps + settings.every
    tokens = np.array([r["tokens"] for r in rows], float)
    steps = np.array([r["best_step"] if r["best_step"] is not None else beyond for r in rows], float)
    rho, p = spearmanr(tokens, steps)
    slope, intercept = np.polyfit(tokens, steps, 1)
    return {"n": len(rows), "not_reached": int(sum(r["best_step"] is None for r in rows)),
            "spearman_rho": float(rho), "p_value": float(p), "fit": {"intercept": float(intercept), "slope": float(slope)},
            "definition": "steps to the best tradeoff = the smallest evaluated step with the maximal harmonic mean "
                          "of EM and specificity; not reached = ranked at max_steps + every"}
