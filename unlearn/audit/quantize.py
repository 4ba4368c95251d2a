"""The quantization attack: the unlearned model quantized to int8 (torch's dynamic quantization of its
linear layers, LoRA merged first) answers the run's test questions again. Unlearning that moved the
weights only a little can fall inside the rounding and come back ("Does your LLM truly unlearn? An
embarrassingly simple approach", Zhang et al. 2024). The original model quantized the same way is the
control: it must still name the concept, else int8 broke the model and the attack shows nothing.
Dynamic quantization runs on the CPU only: a model on a GPU is copied to the CPU first (said on stderr)."""

from __future__ import annotations

import sys

import numpy as np
import torch
import xarray as xr

from .answers import check_at_least, identification, identifies, pick
from .base import Attack, AuditContext, Verdict, register

PRECISIONS = ("float", "int8")  # the "precision" coordinate: the model as loaded, then quantized


def quantized(adapter, progress: bool = True):
    """``adapter`` with its model quantized to int8 (dynamic, linear layers), on the CPU, in place."""
    if progress and any(p.device.type != "cpu" for p in adapter.model.parameters()):
        print("audit: quantize: dynamic int8 quantization runs on the CPU; the model is copied there",
              file=sys.stderr)
    model = adapter.model.to("cpu").float()
    adapter.model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return adapter


@register
class Quantize(Attack):
    name = "quantize"
    options = {"questions": 0, "max_new_tokens": 12, "margin": 25.0, "min_original": 50.0}

    @classmethod
    def check_options(cls, values: dict) -> None:
        check_at_least(cls.name, values, {"questions": 0, "max_new_tokens": 1, "margin": 0, "min_original": 0})

    def run(self, ctx: AuditContext) -> xr.Dataset:
        questions = pick(ctx.data.test, ctx.option(self.name, "questions", self.options["questions"]))
        tokens = ctx.option(self.name, "max_new_tokens", self.options["max_new_tokens"])
        models = [m for m in ("original", "unlearned") if m in ctx.models]
        ident = np.array([[identification(identifies(adapter, questions, ctx.data.names, tokens))
                           for adapter in (ctx.adapter(m), quantized(ctx.fresh(m), ctx.progress))]
                          for m in models])  # (model, precision)
        return xr.Dataset({"quantize_identified": (("model", "precision"), ident)},
                          coords={"model": models, "precision": list(PRECISIONS)})

    def verdict(self, ds: xr.Dataset, ctx: AuditContext) -> Verdict:
        return quantize_verdict(ds, ctx.option(self.name, "margin", self.options["margin"]),
                                ctx.option(self.name, "min_original", self.options["min_original"]))


def quantize_verdict(ds: xr.Dataset, margin: float, min_original: float) -> Verdict:
    ident = ds["quantize_identified"]
    at = {f"{m}_{p}": float(ident.sel(model=m, precision=p)) for m in ds["model"].values for p in PRECISIONS}
    rule = (f"identification = % of the run's test answers naming the concept. Inconclusive when the original model, "
            f"quantized, names it in under {min_original}% (int8 broke the model). Hidden when quantizing the "
            f"unlearned model raises its identification by >= {margin} points; else removed")
    if not at.get("original_int8", 0.0) >= min_original:
        return Verdict("quantize", "inconclusive", rule, at)
    rise = at["unlearned_int8"] - at["unlearned_float"]
    return Verdict("quantize", "hidden" if rise >= margin else "removed", rule, {**at, "rise": rise})
