"""MMUnlearner: gradient ascent restricted to the parameters salient for the concept, interleaved
with gradient descent on retain data.

As the authors run it (github.com/Z1zs/MMUnlearner): ``data_process/SFRon.py`` (``Mask_Our.
prepare_weight_saliency_mask``: the Fisher and the mask rule), ``data_process/MLLMU_gen_mask.py``
(which data each part's Fisher uses) and ``baselines/MLLMU_manifold.py`` (which parameters the mask
applies to, and the alternating ascent / descent steps).

Saliency (once, before training), on every *trained* parameter:
- ``F_f``: diagonal Fisher on the forget records with images: over batches of ``saliency_batch_size``,
  the mean over batches of the squared gradient of the batch's mean answer NLL (text-only facts of the
  concept are kept, not forgotten);
- ``F_p``: the same on the preserve data, which depends on the part (the authors compute the mask
  twice): vision parameters (``vision_parts``: vision tower, projector) on the retain records with
  images; the language model on the retain records (with images and text-only) plus the concept's
  own text-only facts (the authors' text set is the whole benchmark's text knowledge);
- ``M = 1[(F_f + eps) / (F_p + eps) >= tau]`` with the authors' eps 1e-15 and tau 1. A parameter
  that gets no gradient from either set (F_f = F_p = 0) is salient: ratio exactly 1. Under LoRA
  every ``lora_A`` is such a parameter at the start (``lora_B`` = 0), so it is updated by the ascent.
  (The toolkit's earlier rule ``F_f / (F_p + 1e-12)`` made them non-salient: ``lora_A`` never moved.)
The mask is applied to the parameters whose names match ``masked`` (the authors keep the mask of
names containing proj / fc / linear / mlp / qkv and drop the others' masks: norms, embeddings and the
LM head ascend unmasked); "" masks every trained parameter.
Under LoRA the mask is computed on the LoRA parameters actually trained; the authors compute it on
the full model and look it up by the LoRA model's names, which do not match, so their LoRA runs mask
nothing.
Training: even steps ascend the mean NLL of the forget records with images, gradients multiplied by
M; odd steps descend the retain NLL, unmasked. (The authors run one ascent every
len(retain loader) // len(forget loader) descent steps and clip the gradient norm at 1 before the
mask; see docs/methods.md.) Failures are never swallowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .base import MLLMMethod, StepOutput, register
from .losses import records_nll


def fisher_diagonal(model, adapter, records, batch_size: int, max_batches: int = 0) -> dict[str, torch.Tensor]:
    """name -> mean over batches of (d mean_nll(batch) / d theta)^2, for every trained parameter;
    ``max_batches`` > 0 uses only that many batches."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = [records[s:s + batch_size] for s in range(0, len(records), batch_size)]
    batches = batches[:max_batches] if max_batches > 0 else batches
    for b in batches:
        model.zero_grad(set_to_none=True)
        records_nll(adapter, b).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2 / len(batches)
    model.zero_grad(set_to_none=True)
    return fisher


def language_side(model) -> set[str]:
    """Names of ``model``'s parameters in its language model or output head (the rest is the vision side)."""
    inside = {id(p) for part in (model.get_decoder(), model.get_output_embeddings()) if part is not None
              for p in part.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in inside}


@register
@dataclass
class MMUnlearner(MLLMMethod):
    name = "mmunlearner"
    resume_state = ("_cursor",)
    needs_retain = True
    tau: float = 1.0
    eps: float = 1e-15
    saliency_batch_size: int = 4  # the authors' mask loaders' batch size
    saliency_batches: int = 0  # 0: every batch of each set (the authors); N > 0: at most N batches per set (cheaper)
    # parameter names whose F_p uses image records only; "" = found from the model: every parameter outside its
    # language model (``get_decoder()``) and output head, i.e. the vision encoder and the projector of any family
    vision_parts: str = ""
    masked: str = r"proj|fc|linear|mlp|qkv"  # names the mask applies to (the authors' filter); "": all trained

    def setup(self, ctx, forget, retain):
        if self.saliency_batch_size < 1:
            raise ValueError(f"mmunlearner.saliency_batch_size must be >= 1, got {self.saliency_batch_size}")
        visual = [r for r in forget if r.image is not None]
        facts = [r for r in forget if r.image is None]
        if not visual:
            raise ValueError("mmunlearner needs forget records with images")
        retain_visual = [r for r in retain if r.image is not None]
        model, size, n = ctx.adapter.model, self.saliency_batch_size, self.saliency_batches
        self._params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        vision = {name for name in self._params if re.search(self.vision_parts, name)} if self.vision_parts \
            else set(self._params) - language_side(model)
        if vision and not retain_visual:
            raise ValueError("mmunlearner: vision parameters are trained but no retain record has an image "
                             "(their preserve Fisher uses retain records with images)")
        f_forget = fisher_diagonal(model, ctx.adapter, visual, size, n)
        f_language = fisher_diagonal(model, ctx.adapter, list(retain) + facts, size, n)
        f_vision = fisher_diagonal(model, ctx.adapter, retain_visual, size, n) if vision else {}
        self.mask = {}
        for name in self._params:
            f_keep = f_vision[name] if name in vision else f_language[name]
            salient = (f_forget[name] + self.eps) / (f_keep + self.eps) >= self.tau
            self.mask[name] = salient.to(f_forget[name].dtype)
        self.salient_fraction = float(sum(m.sum() for m in self.mask.values()) / sum(m.numel() for m in self.mask.values()))
        # the masks the ascent applies: only names matching ``masked``; the others ascend unmasked
        self._applied = [(self._params[name], m) for name, m in self.mask.items() if re.search(self.masked, name)]
        self._visual, self._cursor = visual, 0

    def loss(self, ctx, forget):
        if ctx.step % 2 == 0:  # ascent on the visual forget records only: text knowledge is kept
            batch = [self._visual[(self._cursor + i) % len(self._visual)] for i in range(len(forget))]
            self._cursor += len(forget)
            loss = -records_nll(ctx.adapter, batch)
            return StepOutput(loss, {"loss_forget": loss.detach(), "salient_fraction": self.salient_fraction})
        loss = records_nll(ctx.adapter, ctx.retain_batch(self.name))
        return StepOutput(loss, {"loss_retain": loss.detach(), "salient_fraction": self.salient_fraction})

    def gradient_hook(self, ctx):
        if ctx.step % 2 == 0:  # only the ascent is restricted to salient weights
            for p, m in self._applied:
                if p.grad is not None:
                    p.grad.mul_(m)
