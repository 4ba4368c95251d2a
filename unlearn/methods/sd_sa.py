"""Selective Amnesia for SD: learn a surrogate for the forget prompt while continual-learning
penalties keep the rest.

    loss = mse(surrogate images | forget prompt) + replay_weight * mse(replayed images | their prompts)
           + ewc * sum_i F_i (theta_i - theta*_i)^2

Surrogates: retain records without a concept (on the world, background images: "nothing there"
stands in for the concept). Replay: at setup the STARTING model generates ``replay_per_prompt``
images for every other concept's prompt in the retain records (generative replay: no real data of
the remaining concepts is needed). Fisher: the diagonal empirical Fisher (mean squared gradient of
the diffusion loss, one record per backward) over ``fisher_samples`` of the replayed images, at
the starting weights ``theta*``. All on the trained parameters (the LoRA ones under LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.sd_records import SDRecord
from .base import SDMethod, StepOutput, register


@register
@dataclass
class SelectiveAmnesia(SDMethod):
    name = "sa"
    needs_retain = True
    ewc: float = 1000.0
    replay_weight: float = 1.0
    fisher_samples: int = 16
    replay_per_prompt: int = 2
    replay_inference_steps: int = 25

    def setup(self, ctx, forget, retain):
        a = ctx.adapter
        self._surrogates = [r for r in retain if r.concept is None]
        if not self._surrogates:
            raise ValueError("sa needs surrogate images: retain records without a concept (concept=None)")
        prompts = list(dict.fromkeys(r.prompt for r in retain if r.concept is not None))
        if not prompts:
            raise ValueError("sa needs retain records of other concepts: their prompts are replayed")
        ps = [p for p in prompts for _ in range(self.replay_per_prompt)]
        images = a.generate(ps, list(range(len(ps))), num_inference_steps=self.replay_inference_steps)
        self._replay = [SDRecord(f"replay:{i}", p, img, "replay") for i, (p, img) in enumerate(zip(ps, images))]
        params = [p for p in a.model.parameters() if p.requires_grad]
        self._star = [p.detach().clone() for p in params]
        fisher = [torch.zeros_like(p) for p in params]
        gen = torch.Generator().manual_seed(ctx.generator.initial_seed() + 2 if ctx.generator else 2)
        n = min(self.fisher_samples, len(self._replay))
        for i in range(n):
            a.model.zero_grad(set_to_none=True)
            a.pixel_error(a.encode([self._replay[i * len(self._replay) // n]]), gen).mean().backward()
            for f, p in zip(fisher, params):
                if p.grad is not None:
                    f += p.grad.detach() ** 2 / n
        a.model.zero_grad(set_to_none=True)
        self._params, self._fisher = params, fisher

    def penalty(self) -> torch.Tensor:
        return sum((f * (p - s) ** 2).sum() for p, s, f in zip(self._params, self._star, self._fisher))

    def loss(self, ctx, forget):
        a = ctx.adapter
        g = ctx.generator
        surr = [self._surrogates[i] for i in torch.randint(len(self._surrogates), (len(forget),), generator=g).tolist()]
        e_forget = a.pixel_error(a.encode(surr, prompts=[r.prompt for r in forget]), g).mean()
        replay = [self._replay[i] for i in torch.randint(len(self._replay), (len(forget),), generator=g).tolist()]
        e_replay = a.pixel_error(a.encode(replay), g).mean()
        ewc = self.penalty()
        loss = e_forget + self.replay_weight * e_replay + self.ewc * ewc
        return StepOutput(loss, {"loss_forget": e_forget.detach(), "loss_retain": e_replay.detach(), "ewc": ewc.detach()})
