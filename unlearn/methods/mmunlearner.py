"""MMUnlearner: gradient ascent restricted to the parameters salient for the concept, interleaved
with gradient descent on retain data.

Saliency (once, before training): diagonal Fisher information (mean squared gradients of the NLL)
of every *trained* parameter on the forget records (F_f) and on preserved data (F_p: retained
concepts' records and the concept's own text-only facts, which MMUnlearner keeps); the mask is
``M = 1[F_f / (F_p + eps) >= tau]``. It is computed on the parameters actually trained, LoRA
parameters included (the public code's mask misses LoRA names and so masks nothing).
Training: even steps ascend the NLL of the forget records with images (text facts are kept, not
forgotten) with gradients multiplied by M; odd steps descend the retain NLL, unmasked. Failures are never swallowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import MLLMMethod, StepOutput, register
from .losses import records_nll


@register
@dataclass
class MMUnlearner(MLLMMethod):
    name = "mmunlearner"
    resume_state = ("_cursor",)
    needs_retain = True
    tau: float = 1.0
    eps: float = 1e-12
    saliency_batches: int = 4

    def _fisher(self, ctx, records, batch_size):
        model = ctx.adapter.model
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        batches = [records[s:s + batch_size] for s in range(0, len(records), batch_size)][: self.saliency_batches]
        for b in batches:
            model.zero_grad(set_to_none=True)
            records_nll(ctx.adapter, b).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2 / len(batches)
        model.zero_grad(set_to_none=True)
        return fisher

    def setup(self, ctx, forget, retain):
        visual = [r for r in forget if r.image is not None]
        facts = [r for r in forget if r.image is None]
        if not visual:
            raise ValueError("mmunlearner needs forget records with images")
        f_forget = self._fisher(ctx, visual, 2)
        f_keep = self._fisher(ctx, retain[: 2 * self.saliency_batches] + facts, 2)
        self.mask = {n: (f_forget[n] / (f_keep[n] + self.eps) >= self.tau).to(f_forget[n].dtype) for n in f_forget}
        self.salient_fraction = float(sum(m.sum() for m in self.mask.values()) / sum(m.numel() for m in self.mask.values()))
        self._params = {n: p for n, p in ctx.adapter.model.named_parameters() if p.requires_grad}
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
            for n, p in self._params.items():
                if p.grad is not None:
                    p.grad.mul_(self.mask[n])
