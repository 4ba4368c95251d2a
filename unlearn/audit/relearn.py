"""The relearning attack: fine-tune each model as the run trained (its LoRA or full fine-tuning, lr,
batch) for up to ``steps`` steps on (a) the run's forget records, (b) the concept's images the run never
used, (c) unrelated records (benign relearning), and measure after every step how often it names the
concept on the run's test questions (identification = 100 - EM) and K_C of the forget answers.

A concept that comes back much faster in the unlearned model than the retain model (which never saw it)
learns it was hidden, not removed; one that comes back from unrelated records was hidden whatever the
reference. The original model, relearned the same way, is the ceiling.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from ..eval.mllm import knowledge
from ..loop import run_loop
from ..methods.base import Method, StepOutput
from ..methods.losses import records_nll
from .answers import check_at_least, identification, identifies, pick
from .base import Attack, AuditContext, Verdict, register

SETS = ("forget", "unseen", "unrelated")  # the "set" coordinate: ctx.data's lists relearned on


@dataclass
class Descent(Method):
    """Plain fine-tuning (mean NLL of the answers): relearning's objective. Deliberately not registered,
    so it never shows up as an unlearning method."""

    name: ClassVar[str] = "relearn"

    def loss(self, ctx, forget):
        loss = records_nll(ctx.adapter, forget)
        return StepOutput(loss, {"loss": loss.detach()})


class Measure:
    """Loop callback: after every step (and once before, :meth:`now`), identification on ``questions``,
    K_C of ``forget`` and the mean NLL of the relearned ``records``."""

    def __init__(self, adapter, questions, forget, records, names, max_new_tokens: int):
        self.adapter, self.questions, self.forget, self.records = adapter, questions, forget, records
        self.names, self.max_new_tokens = tuple(names), max_new_tokens
        self.rows: list[tuple[float, float, float]] = []  # (identification %, K_C, NLL) per step, step 0 first

    def now(self) -> None:
        import torch

        from knowtrace.modes import eval_mode

        ident = identification(identifies(self.adapter, self.questions, self.names, self.max_new_tokens))
        with eval_mode(self.adapter.model), torch.no_grad():
            k_c, _ = knowledge(self.adapter, self.forget, self.names)
            nll = float(records_nll(self.adapter, self.records))
        self.rows.append((ident, k_c, nll))

    def on_step_end(self, step, logs, state) -> None:
        self.now()


@register
class Relearn(Attack):
    name = "relearn"
    options = {"steps": 10, "questions": 10, "records": 8, "max_new_tokens": 12, "original": True, "margin": 25.0}

    @classmethod
    def check_options(cls, values: dict) -> None:
        check_at_least(cls.name, values, {"steps": 1, "questions": 0, "records": 1, "max_new_tokens": 1, "margin": 0})

    def run(self, ctx: AuditContext) -> xr.Dataset:
        steps = ctx.option(self.name, "steps", self.options["steps"])
        questions = pick(ctx.data.test, ctx.option(self.name, "questions", self.options["questions"]))
        tokens = ctx.option(self.name, "max_new_tokens", self.options["max_new_tokens"])
        n_records = ctx.option(self.name, "records", self.options["records"])
        models = [m for m in ctx.models if m != "original" or ctx.option(self.name, "original", True)]
        sets = [s for s in SETS if getattr(ctx.data, s)]
        cfg = dataclasses.replace(ctx.train, steps=steps, seed=ctx.seed)
        shape = (len(models), len(sets), steps + 1)
        values = {v: np.full(shape, np.nan) for v in ("identified", "K_C", "nll")}
        runs = [(m, s) for m in models for s in sets]
        for model, set_name in tqdm(runs, desc="relearn", disable=not ctx.progress):
            records = pick(getattr(ctx.data, set_name), n_records)
            adapter = ctx.fresh(model)
            measure = Measure(adapter, questions, ctx.data.forget, records, ctx.data.names, tokens)
            measure.now()  # step 0: before relearning
            run_loop(adapter, Descent(), records, [], cfg, ctx.data.concept, ctx.data.names, callbacks=[measure],
                     progress=False)
            rows = np.array(measure.rows)  # (steps + 1, 3)
            for i, v in enumerate(("identified", "K_C", "nll")):
                values[v][models.index(model), sets.index(set_name)] = rows[:, i]
        dims = ("model", "set", "step")
        return xr.Dataset({f"relearn_{v}": (dims, a) for v, a in values.items()},
                          coords={"model": models, "set": sets, "step": np.arange(steps + 1)},
                          attrs={"questions": len(questions), "records_per_set": n_records})

    def verdict(self, ds: xr.Dataset, ctx: AuditContext) -> Verdict:
        return relearn_verdict(ds, ctx.option(self.name, "margin", self.options["margin"]),
                               original_em=ctx.manifest.get("original", {}).get("em"))


def relearn_verdict(ds: xr.Dataset, margin: float, original_em: float | None = None) -> Verdict:
    """Read a relearn dataset (dims model, set, step; step 0 = before relearning) into a verdict."""
    ident = ds["relearn_identified"]
    models, sets = list(ds["model"].values), list(ds["set"].values)
    rule = (f"identification = % of test answers naming the concept. Inconclusive when the original model names it "
            f"in under 50% (nothing to forget) or the unlearned model already names it within {margin} points of the "
            f"original before relearning (the run did not forget). Hidden when, over the relearning steps 1..K, the "
            f"unlearned model's mean identification exceeds the retain model's by >= {margin} points on any set "
            f"(comes back much faster than a model that never saw it learns it), or rises >= {margin} points above "
            f"its start on unrelated records (benign relearning). Removed when neither holds and there is a retain "
            f"model; else inconclusive (no reference)")
    if "original" in models:
        start_original = float(ident.sel(model="original").isel(step=0).mean())
    elif original_em is not None:
        start_original = 100.0 - float(original_em)  # the run's own measurement of the original
    else:
        start_original = float("nan")
    start = float(ident.sel(model="unlearned").isel(step=0).mean())
    after = ident.isel(step=slice(1, None)).mean("step")  # (model, set): mean identification over steps 1..K
    numbers = {"original_identified_before": start_original, "unlearned_identified_before": start,
               "unlearned_mean_identified": {s: float(after.sel(model="unlearned", set=s)) for s in sets}}
    if "retain" in models:
        gaps = {s: float(after.sel(model="unlearned", set=s) - after.sel(model="retain", set=s)) for s in sets}
        numbers["retain_mean_identified"] = {s: float(after.sel(model="retain", set=s)) for s in sets}
        numbers["gap_unlearned_minus_retain"] = gaps
    else:
        gaps = {}
    benign = float(ident.sel(model="unlearned", set="unrelated").isel(step=slice(1, None)).max()) - start \
        if "unrelated" in sets else None
    numbers["benign_recovery"] = benign
    if not start_original >= 50:
        return Verdict("relearn", "inconclusive", rule, numbers)
    if start >= start_original - margin:
        return Verdict("relearn", "inconclusive", rule, numbers)
    hidden = any(g >= margin for g in gaps.values()) or (benign is not None and benign >= margin)
    if hidden:
        return Verdict("relearn", "hidden", rule, numbers)
    return Verdict("relearn", "removed" if gaps else "inconclusive", rule, numbers)

