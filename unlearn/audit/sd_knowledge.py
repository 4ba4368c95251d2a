"""The knowledge attack on a Stable Diffusion run: K_C / K_N (Eq. 4, 6: ``exp(-error)`` of the UNet's
denoising on the concept's pixels / on the other pixels, at fixed timesteps and noise,
:func:`unlearn.eval.sd.forget_knowledge`) of the three models on the forget images (what the run trained
on; scored on the noise the run's own K_C / K_N used, so at seed 0 the unlearned model's mean is the run's
figure) and on the concept's images the run never used (``data.unseen``), every image scored on the same
noisy inputs by every model.

Not drawing a concept is not the same as not knowing it: a UNet that still denoises the concept's pixels
as well as the original does, while its prompt no longer draws it, keeps the concept in its weights. The
retain model (trained without the concept) shows how well a model that never saw it denoises it: its K_C is
the baseline, the original's the ceiling, and the verdict reads where the unlearned model sits between them
on the unseen images (the forget images were trained on directly; they show the run, not the concept):

* ``share = (K_C(unlearned) - K_C(retain)) / (K_C(original) - K_C(retain))``, K_C the mean over the unseen
  images: 0 = knows the concept as little as a model that never saw it, 1 = as well as the original.
* inconclusive without a retain model; when the original beats the retain model's K_C on fewer than
  ``min_separation`` of the unseen images (K_C does not tell a model that learned the concept from one that
  never saw it); when the run did not make the model stop drawing the concept (its own UA rose by less than
  ``min_ua_rise`` points over the original's: knowledge kept there is not hidden, it is shown); or when the
  unlearned model lost more K_N (its denoising of everything else) than the concept's whole K_C margin
  ``K_C(original) - K_C(retain)``: its low K_C then says more about damage than about the concept.
* hidden when ``share >= hidden_share`` (it keeps at least that part of what the original knows of the
  concept beyond a model that never saw it); else removed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from ..eval.sd import DEFAULT_TIMESTEPS, forget_knowledge
from .answers import check_at_least, pick
from .base import Attack, AuditContext, Verdict, register

SETS = ("forget", "unseen")  # the "set" of each image: ctx.data's lists


@register
class SDKnowledge(Attack):
    name = "knowledge"
    kind = "sd"
    options = {"images": 0, "hidden_share": 0.5, "min_separation": 0.75, "min_ua_rise": 25.0}
    needs_data = ("unseen",)

    @classmethod
    def check_options(cls, values: dict) -> None:
        check_at_least(cls.name, values, {"images": 0, "hidden_share": 0, "min_separation": 0, "min_ua_rise": 0})
        if not values["min_separation"] <= 1:
            raise ValueError(f"invalid audit options: knowledge.min_separation={values['min_separation']} (a share of "
                             f"the unseen images, 0 .. 1)")

    def run(self, ctx: AuditContext) -> xr.Dataset:
        unseen = pick(ctx.data.unseen, ctx.option(self.name, "images", self.options["images"]))  # 0: all of them
        sets = {"forget": ctx.data.forget, "unseen": unseen}
        values = {"K_C": [], "K_N": []}
        for model in ctx.models:
            adapter = ctx.adapter(model)
            # each set on its own: the forget images scored on the noise the run's own K_C / K_N used
            k = {s: forget_knowledge(adapter.pipe, images, noise_seed=ctx.seed, adapter=adapter)["per_record"]
                 for s, images in sets.items()}
            for v in values:
                values[v].append([k[s][r.id][v] for s, images in sets.items() for r in images])
        ids = [r.id for images in sets.values() for r in images]
        labels = [s for s, images in sets.items() for _ in images]
        return xr.Dataset({f"knowledge_{v}": (("model", "image"), np.array(a)) for v, a in values.items()},
                          coords={"model": list(ctx.models), "image": ids, "set": ("image", labels)},
                          attrs={"noise_seed": ctx.seed, "timesteps": " ".join(map(str, DEFAULT_TIMESTEPS))})

    def verdict(self, ds: xr.Dataset, ctx: AuditContext) -> Verdict:
        return knowledge_verdict(ds, *(ctx.option(self.name, o, self.options[o])
                                       for o in ("hidden_share", "min_separation", "min_ua_rise")),
                                 ua_rise=run_ua_rise(ctx.run))


def run_ua_rise(run: Path) -> float | None:
    """How many points the run's own UA (its metrics.json) rose from the original model to the unlearned one
    (None: not recorded)."""
    from knowtrace.files import read_json

    metrics = read_json(Path(run) / "metrics.json") if (Path(run) / "metrics.json").exists() else {}
    before, after = metrics.get("original", {}).get("ua"), metrics.get("ua")
    return None if before is None or after is None else float(after) - float(before)


def knowledge_verdict(ds: xr.Dataset, hidden_share: float, min_separation: float, min_ua_rise: float,
                      ua_rise: float | None) -> Verdict:
    """Read a knowledge dataset (``knowledge_K_C`` / ``knowledge_K_N`` over model, image; coordinate ``set``
    over image) into a verdict (the rule: the module's docs). ``ua_rise``: the run's own UA rise (None: not
    known, the check is skipped)."""
    models = list(ds["model"].values)
    rule = (f"share = (K_C unlearned - K_C retain) / (K_C original - K_C retain), K_C at fixed noise on the unseen "
            f"images. Inconclusive without a retain model, if the original beats the retain model on "
            f"< {min_separation:.0%} of them, if the run's UA rose < {min_ua_rise} points, or if the unlearned "
            f"model lost more K_N than the margin K_C original - retain (damage). Hidden if share >= {hidden_share}; "
            f"else removed")
    mean = {v: {s: {m: float(ds[f"knowledge_{v}"].sel(model=m).where(ds["set"] == s, drop=True).mean())
                    for m in models} for s in SETS if (ds["set"] == s).any()} for v in ("K_C", "K_N")}
    numbers = {"K_C": mean["K_C"], "K_N": mean["K_N"], "run_ua_rise": ua_rise}
    if "retain" not in models or "unseen" not in mean["K_C"]:
        return Verdict("knowledge", "inconclusive", rule, numbers)
    unseen = ds["set"] == "unseen"
    k_c = {m: ds["knowledge_K_C"].sel(model=m).where(unseen, drop=True) for m in models}
    k_c_mean, k_n_mean = mean["K_C"]["unseen"], mean["K_N"]["unseen"]
    margin = k_c_mean["original"] - k_c_mean["retain"]
    numbers["separation"] = separation = float((k_c["original"] > k_c["retain"]).mean())
    numbers["concept_margin"] = margin
    numbers["K_N_lost"] = lost = k_n_mean["original"] - k_n_mean["unlearned"]
    numbers["share"] = share = (k_c_mean["unlearned"] - k_c_mean["retain"]) / margin if margin > 0 else float("nan")
    if not separation >= min_separation or not margin > 0:
        return Verdict("knowledge", "inconclusive", rule, numbers)
    if ua_rise is not None and ua_rise < min_ua_rise:
        return Verdict("knowledge", "inconclusive", rule, numbers)
    if lost > margin:
        return Verdict("knowledge", "inconclusive", rule, numbers)
    return Verdict("knowledge", "hidden" if share >= hidden_share else "removed", rule, numbers)
