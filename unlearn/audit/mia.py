"""Audit attack ``mia``: can the concept's training records still be told from records it never saw?

Members are the concept's records the original model was trained on, non-members records of the same kind it
never saw. Each model scores every record with open-unlearning's LOSS, zlib, Min-K% and Min-K%++
(:mod:`knowtrace.mia`, which cites their code; every score is loss-like: higher = less like a member):
``mia_value`` (model, mia_score, mia_record); ``mia_auc`` (model, mia_score), oriented as open-unlearning's
(1 = members far more likely, 0.5 = indistinguishable); ``mia_privleak`` (model, mia_score), MUSE's PrivLeak of
each model against the retain model in percent (NaN without one; the retain model's own is 0).

Verdict (options ``score``, the score the rule reads, ``min_k`` as open-unlearning's privleak; ``tolerance`` in
percent): **inconclusive** without a retain model, or when the original's privleak is not below
``-tolerance`` (the attack cannot tell the original from a model that never learned the concept, so it has no
power); **removed** if ``|privleak(unlearned)| <= tolerance``; **hidden** if ``privleak(unlearned) <
-tolerance`` (its members still look like members, in the original's direction); **inconclusive** if
``privleak(unlearned) > tolerance`` (over-unlearned: its members look less like members than to a model that
never saw them, a trace of the edit rather than of the concept).
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from knowtrace.logprobs import IGNORE_INDEX
from knowtrace.mia import SCORES, auc, mia_scores, privleak, token_stats
from knowtrace.modes import eval_mode

from .base import Attack, AuditContext, Verdict, register


def record_scores(adapter, records: list, batch_size: int, k: float) -> np.ndarray:
    """(len(SCORES), n) float64: each score of each record under the adapter's model, teacher-forced."""
    model, tokenizer = adapter.model, adapter.tokenizer
    scores = {s: [] for s in SCORES}
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(records), batch_size):
            batch = adapter.encode(records[start:start + batch_size], train=True)
            labels = batch["labels"]  # (n, T)
            logits = model(**{key: v for key, v in batch.items() if key != "labels"}).logits
            logp, mu, sigma = token_stats(logits, labels)
            mask = labels != IGNORE_INDEX
            texts = tokenizer.batch_decode([row[row != IGNORE_INDEX].tolist() for row in labels.cpu()],
                                           skip_special_tokens=True)
            for name, value in mia_scores(logp, mu, sigma, mask, texts, k).items():
                scores[name].append(value)
    return np.stack([torch.cat(scores[s]).numpy() for s in SCORES])


@register
class MembershipInference(Attack):
    name = "mia"
    options = {"batch_size": 16, "k": 0.2, "score": "min_k", "tolerance": 10.0}
    needs_data = ("members", "nonmembers")

    def run(self, ctx: AuditContext) -> xr.Dataset:
        data = ctx.data
        if not data.members or not data.nonmembers:
            raise ValueError(f"membership inference needs members and non-members, got {len(data.members)} and "
                             f"{len(data.nonmembers)} records")
        records = data.members + data.nonmembers
        member = np.array([True] * len(data.members) + [False] * len(data.nonmembers))
        batch_size, k = ctx.option(self.name, "batch_size", 16), ctx.option(self.name, "k", 0.2)
        # (model, score, record)
        values = np.stack([record_scores(ctx.adapter(m), records, batch_size, k) for m in ctx.models])
        aucs = np.array([[auc(v[member], v[~member]) for v in per_model] for per_model in values])  # (model, score)
        leak = np.full_like(aucs, np.nan)
        if "retain" in ctx.models:
            retain = aucs[ctx.models.index("retain")]
            leak = np.array([[privleak(a, r) for a, r in zip(per_model, retain)] for per_model in aucs])
        return xr.Dataset(
            {"mia_value": (("model", "mia_score", "mia_record"), values),
             "mia_auc": (("model", "mia_score"), aucs), "mia_privleak": (("model", "mia_score"), leak)},
            coords={"model": list(ctx.models), "mia_score": list(SCORES), "mia_record": np.arange(len(records)),
                    "mia_record_id": ("mia_record", [r.id for r in records]),
                    "mia_member": ("mia_record", member.astype(np.int8))},
            attrs={"mia_k": k})

    def verdict(self, ds: xr.Dataset, ctx: AuditContext) -> Verdict:
        score, tol = (ctx.option(self.name, k, self.options[k]) for k in ("score", "tolerance"))
        if score not in SCORES:
            raise ValueError(f"mia.score={score!r} is not one of {SCORES}")
        rule = (f"on {score}'s privleak against the retain model: removed if |privleak(unlearned)| <= {tol}%; hidden "
                f"if < -{tol}%; inconclusive if > {tol}% (over-unlearned), without a retain model, or when the "
                f"original's privleak is not below -{tol}% (no power)")
        numbers = {f"auc_{m}": round(float(ds.mia_auc.sel(model=m, mia_score=score)), 4) for m in ds.model.values}
        if "retain" not in ds.model or "unlearned" not in ds.model:
            return Verdict(self.name, "inconclusive", rule + " (needs the unlearned and the retain model)", numbers)
        leak = {m: float(ds.mia_privleak.sel(model=m, mia_score=score)) for m in ("original", "unlearned")}
        numbers.update({f"privleak_{m}": round(v, 2) for m, v in leak.items()})
        if not leak["original"] < -tol:
            verdict = "inconclusive"
        elif abs(leak["unlearned"]) <= tol:
            verdict = "removed"
        elif leak["unlearned"] < -tol:
            verdict = "hidden"
        else:
            verdict = "inconclusive"
        return Verdict(self.name, verdict, rule, numbers)
