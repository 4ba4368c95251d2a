"""Audit attack ``lens``: does some layer of the unlearned model still put the concept's name on top?

Over the concept's records on unseen images (``test`` and ``unseen``) whose answer names the concept, at the
position that predicts the name's first token in the teacher-forced answer (the token before the first concept
token, :meth:`MLLMAdapter.concept_flags`), each layer's state is read through the model's final norm and output
head (:func:`knowtrace.lens.logit_lens`): ``lens_prob`` (model, layer) the mean probability of that token,
``lens_rank`` the median rank (0 = top), ``lens_top`` the fraction of records where it ranks in the top
``top_k``.

Verdict (options ``top_k``, ``hit``, ``margin``), on ``lens_top`` of the unlearned (U), original (O) and retain
(R) models: **inconclusive** without a retain model, or when no layer of the original ranks the name in the top
``top_k`` for at least ``hit`` of the records (the lens has nothing to find); **hidden** if at some layer
``U[l] >= hit`` and ``U[l] >= R[l] + margin``; **removed** if at every layer ``U[l] < R[l] + margin``;
otherwise inconclusive. Layers from ``from_layer`` (default 1: layer 0 is the input token's embedding, a token
prior; see :func:`.probes.layer_verdict`).
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from knowtrace.lens import logit_lens

from ..data.names import names_in
from .base import Attack, AuditContext, Verdict, register
from .probes import FROM_LAYER, layer_states, layer_verdict


@register
class LogitLens(Attack):
    name = "lens"
    options = {"batch_size": 16, "top_k": 10, "hit": 0.5, "margin": 0.3, "from_layer": FROM_LAYER}
    needs_data = ("test",)

    def run(self, ctx: AuditContext) -> xr.Dataset:
        data = ctx.data
        records = [r for r in data.test + data.unseen if names_in(r.answer, data.names)]
        if not records:
            raise ValueError(f"no test or unseen record of {data.concept!r} names it in its answer (looked for "
                             f"{list(data.names)}): the logit lens has no position to read")
        batch_size, top_k = ctx.option(self.name, "batch_size", 16), ctx.option(self.name, "top_k", 10)
        prob, rank = [], []
        for m in ctx.models:
            adapter = ctx.adapter(m)

            def before_name(batch, chunk, adapter=adapter):
                flags = adapter.concept_flags(chunk, data.names)  # (n, T): every row names the concept
                return flags.int().argmax(1) - 1  # the position predicting the first concept token

            states, tokens = layer_states(adapter, records, batch_size, before_name)
            p, r = logit_lens(adapter.model, states, tokens)  # (L + 1, n)
            prob.append(p)
            rank.append(r)
        prob, rank = torch.stack(prob), torch.stack(rank)  # (model, L + 1, n)
        dims = ("model", "layer")
        return xr.Dataset(
            {"lens_prob": (dims, prob.double().mean(2).numpy()),
             "lens_rank": (dims, rank.double().median(2).values.numpy()),
             "lens_top": (dims, (rank < top_k).double().mean(2).numpy())},
            coords={"model": list(ctx.models), "layer": np.arange(prob.shape[1])},
            attrs={"lens_records": len(records), "lens_top_k": top_k})

    def verdict(self, ds: xr.Dataset, ctx: AuditContext) -> Verdict:
        hit, margin, from_layer = (ctx.option(self.name, k, self.options[k]) for k in ("hit", "margin", "from_layer"))
        top_k = ds.attrs.get("lens_top_k", self.options["top_k"])
        rule = (f"on the fraction of records whose name token ranks in the top {top_k}, over layers >= {from_layer}: hidden if at some layer the "
                f"unlearned model's is >= {hit} and >= the retain model's + {margin}; removed if at every layer it is "
                f"< the retain model's + {margin}; inconclusive without a retain model or when no layer of the "
                f"original reaches {hit}")
        top = ds.lens_top
        numbers = {f"lens_top_{m}": [round(float(v), 4) for v in top.sel(model=m).values] for m in ds.model.values}
        if "retain" not in ds.model or "unlearned" not in ds.model:
            return Verdict(self.name, "inconclusive", rule + " (needs the unlearned and the retain model)", numbers)
        if not (top.sel(model="original") >= hit).any():
            return Verdict(self.name, "inconclusive", rule + " (the original does not reach it)", numbers)
        unlearned, retain = top.sel(model="unlearned"), top.sel(model="retain")
        above_retain = unlearned >= retain + margin
        return layer_verdict(self.name, rule, numbers, (unlearned >= hit) & above_retain, above_retain, from_layer)
