"""Audit attack ``probes``: is the concept still linearly decodable from the unlearned model's hidden states?

Per decoder layer (0 = embeddings), at the answer-start position of each record (the position that predicts
the answer's first token, :func:`knowtrace.hidden.answer_start`):

* ``probes_accuracy`` (model, layer): a probe fitted on the ORIGINAL model's states of ``probe_train`` (labels
  ``probe_labels``), applied to each model's states of ``probe_test`` (the concept's unseen images, all labelled
  ``concept_label``): the fraction it calls the concept. On the unlearned model it tells whether the original's
  read-out of the concept still works; on the retain model, whose states live in another space, it is only
  shown, never compared with.
* ``probes_fresh_accuracy`` (model, layer): a probe fitted afresh on that model's own ``probe_train`` states,
  tested on its own ``probe_test`` states: how much its states hold about the concept, whatever their basis.
  The retain model's figure is the floor: what images alone tell a model that never learned the concept.

Verdict (thresholds are the options ``near`` and ``margin``), with U, O, R the unlearned, original and retain
models: **hidden** if at some layer l the original's probe still reads the concept from the unlearned model
(``U_probe[l] >= O_probe[l] - near``) and its own states decode it better than the retain model's
(``U_fresh[l] >= R_fresh[l] + margin``); **removed** if at every layer ``U_fresh[l] < R_fresh[l] + margin``;
otherwise, or without a retain model, **inconclusive**.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import xarray as xr
from knowtrace.hidden import answer_start, forward_hidden, states_at
from knowtrace.linear_probe import probe_layers
from knowtrace.logprobs import IGNORE_INDEX
from knowtrace.modes import eval_mode

from .base import Attack, AuditContext, Verdict, register


def layer_states(adapter, records: list, batch_size: int,
                 locate: Callable[[dict, list], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(states (L + 1, n, d) float32, tokens (n,)) of ``records`` teacher-forced through the adapter's model:
    each layer's state at the position ``locate(batch, chunk)`` gives per row (default: the answer start) and
    the answer token that position predicts."""
    if not records:
        raise ValueError("no records to read hidden states from")
    model = adapter.model
    states, tokens = [], []
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            batch = adapter.encode(chunk, train=True)
            labels = batch["labels"]  # (n, T)
            positions = answer_start(labels) if locate is None else locate(batch, chunk)
            _, hidden = forward_hidden(model, {key: v for key, v in batch.items() if key != "labels"})
            states.append(states_at(hidden, positions))
            tokens.append(labels[torch.arange(len(chunk), device=labels.device), positions.to(labels.device) + 1].cpu())
    tokens = torch.cat(tokens)
    if (tokens == IGNORE_INDEX).any():
        raise ValueError("a located position does not predict an answer token")
    return torch.cat(states, 1), tokens


FROM_LAYER = 1  # the first layer the per-layer verdicts read (see layer_verdict)


def layer_verdict(attack: str, rule: str, numbers: dict, hidden, above_retain, from_layer: int = FROM_LAYER) -> Verdict:
    """The per-layer rule of ``probes`` and ``lens``, over layers >= ``from_layer``: hidden at the layers where
    ``hidden`` (bool over ``layer``) holds; else removed if the unlearned model is above the retain model at no
    layer (``above_retain``); else inconclusive. ``numbers`` gains ``hidden_layers``. Layer 0 is left out by
    default: it is the input token's embedding, before any computation on the image or the question (a LoRA run
    cannot change it), so what the lens or a probe reads there is a token prior, not what the model computes
    (measured: on the world, korvex read "hidden" at layer 0 alone after every LoRA method)."""
    read = hidden.layer >= from_layer
    hidden, above_retain = hidden & read, above_retain & read
    numbers["hidden_layers"] = [int(layer) for layer in hidden.layer.values[hidden.values]]
    if numbers["hidden_layers"]:
        verdict = "hidden"
    elif not above_retain.any():
        verdict = "removed"
    else:
        verdict = "inconclusive"
    return Verdict(attack, verdict, rule, numbers)


@register
class LinearProbes(Attack):
    name = "probes"
    options = {"batch_size": 16, "near": 0.1, "margin": 0.2, "l2": 1e-2, "from_layer": FROM_LAYER}
    needs_data = ("probe_train", "probe_test")

    def run(self, ctx: AuditContext) -> xr.Dataset:
        data = ctx.data
        if len(data.probe_labels) != len(data.probe_train):
            raise ValueError(f"{len(data.probe_labels)} probe labels for {len(data.probe_train)} probe_train records")
        if data.concept_label not in set(data.probe_labels):
            raise ValueError(f"concept_label {data.concept_label} is not among probe_labels: a probe trained on them "
                             f"can never name the concept")
        if not data.probe_test:
            raise ValueError("probe_test is empty: the probes need the concept's unseen images")
        opt = {k: ctx.option(self.name, k, v) for k, v in self.options.items()}
        train = {m: layer_states(ctx.adapter(m), data.probe_train, opt["batch_size"])[0] for m in ctx.models}
        test = {m: layer_states(ctx.adapter(m), data.probe_test, opt["batch_size"])[0] for m in ctx.models}
        y = torch.tensor(data.probe_labels)
        original = probe_layers(train["original"], y, ctx.seed, l2=opt["l2"])
        transfer = [[p.accuracy(x, data.concept_label) for p, x in zip(original, test[m])] for m in ctx.models]
        fresh = [[p.accuracy(x, data.concept_label) for p, x in zip(probe_layers(train[m], y, ctx.seed, l2=opt["l2"]),
                                                                      test[m])] for m in ctx.models]
        dims = ("model", "layer")
        return xr.Dataset(
            {"probes_accuracy": (dims, np.array(transfer)), "probes_fresh_accuracy": (dims, np.array(fresh))},
            coords={"model": list(ctx.models), "layer": np.arange(len(original))},
            attrs={"probe_chance": 1 / len(set(data.probe_labels)), "probe_train_records": len(data.probe_train),
                   "probe_test_records": len(data.probe_test)})

    def verdict(self, ds: xr.Dataset, ctx: AuditContext) -> Verdict:
        near, margin, from_layer = (ctx.option(self.name, k, self.options[k]) for k in ("near", "margin", "from_layer"))
        rule = (f"over layers >= {from_layer}: hidden if at some layer the original's probe reads the concept from the unlearned model within "
                f"{near} of its accuracy on the original and the unlearned model's own probe beats the retain "
                f"model's by >= {margin}; removed if at every layer the unlearned model's own probe beats the retain "
                f"model's by < {margin}; else inconclusive")
        numbers = {f"{var}_{m}": [round(float(v), 4) for v in ds[var].sel(model=m).values]
                   for var in ("probes_accuracy", "probes_fresh_accuracy") for m in ds.model.values}
        if "retain" not in ds.model or "unlearned" not in ds.model:
            return Verdict(self.name, "inconclusive", rule + " (needs the unlearned and the retain model)", numbers)
        acc, fresh = ds.probes_accuracy, ds.probes_fresh_accuracy
        still_read = acc.sel(model="unlearned") >= acc.sel(model="original") - near
        above_retain = fresh.sel(model="unlearned") >= fresh.sel(model="retain") + margin
        return layer_verdict(self.name, rule, numbers, still_read & above_retain, above_retain, from_layer)
