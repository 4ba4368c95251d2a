"""SalUn for SD: saliency-masked random-label fine-tuning.

Setup: the gradient of the forget loss (noise-prediction MSE on the forget images with their own
prompts; its sign does not matter for |grad|) over every forget record; the ``fraction`` of trained
weights with the largest |grad| (one threshold over all trained tensors) are salient. Steps: the
forget prompt paired with images of OTHER concepts (retain records that have a concept: the
"random label" of SalUn's SD recipe) plus ``retain_weight`` times the ordinary loss on retain
records; a gradient hook zeroes the gradient of every non-salient weight, so with Adam (no weight
decay) only salient weights ever move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import SDMethod, StepOutput, register


@register
@dataclass
class SalUn(SDMethod):
    name = "salun"
    needs_retain = True
    fraction: float = 0.5  # share of trained weights that are salient (SalUn's SD default: 50%)
    retain_weight: float = 1.0
    saliency_batch: int = 4

    def setup(self, ctx, forget, retain):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"salun.fraction must be in (0, 1], got {self.fraction}")
        self._others = [r for r in retain if r.concept is not None]
        if not self._others:
            raise ValueError("salun needs retain records of other concepts (records with a concept) for its random labels")
        a = ctx.adapter
        params = [p for p in a.model.parameters() if p.requires_grad]
        a.model.zero_grad(set_to_none=True)
        gen = torch.Generator().manual_seed(ctx.generator.initial_seed() + 1 if ctx.generator else 1)
        for s in range(0, len(forget), self.saliency_batch):
            chunk = forget[s:s + self.saliency_batch]
            (a.pixel_error(a.encode(chunk), gen).mean() * len(chunk) / len(forget)).backward()
        scores = [p.grad.detach().abs() if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([s.flatten() for s in scores])
        k = max(1, math.ceil(self.fraction * flat.numel()))
        threshold = torch.topk(flat, k).values[-1]
        self._masks = [(p, (s >= threshold).to(p.dtype)) for p, s in zip(params, scores)]
        a.model.zero_grad(set_to_none=True)

    @property
    def salient_share(self) -> float:
        return float(sum(m.sum() for _, m in self._masks) / sum(m.numel() for _, m in self._masks))

    def loss(self, ctx, forget):
        a = ctx.adapter
        pick = torch.randint(len(self._others), (len(forget),), generator=ctx.generator).tolist()
        relabelled = a.encode([self._others[i] for i in pick], prompts=[r.prompt for r in forget])
        e_forget = a.pixel_error(relabelled, ctx.generator).mean()
        e_retain = a.pixel_error(a.encode(ctx.retain_batch(self.name)), ctx.generator).mean()
        loss = e_forget + self.retain_weight * e_retain
        return StepOutput(loss, {"loss_forget": e_forget.detach(), "loss_retain": e_retain.detach()})

    def gradient_hook(self, ctx):
        for p, m in self._masks:
            if p.grad is not None:
                p.grad.mul_(m)
