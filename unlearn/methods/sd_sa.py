"""Selective Amnesia for SD: learn a surrogate for the forget prompt while continual-learning
penalties keep the rest.

    loss = mse(surrogate images | forget prompt) + replay_weight * mse(replayed images | their prompts)
           + ewc * sum_i F_i (theta_i - theta*_i)^2

Surrogates: retain records without a concept (on the world, background images: "nothing there"
stands in for the concept). Replay: at setup the STARTING model generates ``replay_per_prompt``
images for every other concept's prompt in the retain records (generative replay: no real data of
the remaining concepts is needed). All on the trained parameters (the LoRA ones under LoRA).

Fisher, as the authors compute it (clear-nus/selective-amnesia, ``sd/ldm/models/diffusion/ddpm_fim.py``,
``LatentDiffusion.training_step``: per image, batch 1, the diffusion loss of EVERY timestep
0..T-1 with its own noise draw is summed, backpropagated in chunks that add up, and the squared
summed gradient is averaged over the images, ``fisher += grad**2 / n_fim``): at the starting
weights ``theta*``,

    F = 1/N sum_n ( grad_theta sum_{t=0}^{T-1} L(x_n, c_n, t, eps_{n,t}) )^2,
    L = mean over latent channels and pixels of (y - y_theta(z_t, c, t))^2

over the replayed images (their FIM set is their replay set, ``fim_dataset``, 5000 generated
images). ``fisher_timesteps=k`` (0 < k < T) is a cheaper estimate for large models: k timesteps,
one uniform in each of k equal strata of 0..T-1, their sum scaled by T/k (an unbiased estimate of the
summed loss and its gradient). The penalty's weight ``ewc`` is their ``lmbda`` (50, the
``forget_*.yaml`` configs; the surrogate and replay terms weigh 1, their ``gamma``), and the
penalty is their ``sum F (theta - theta*)^2`` (``ddpm_forget.py``, ``training_step``).

``y`` is the model's training target (``SDAdapter.target``: the noise ``eps`` under epsilon
prediction, the velocity under v-prediction), so the Fisher is that of the loss the model was trained
with, and the surrogate and replay terms are its ordinary training loss (``pixel_error``), in either
parameterisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.sd_records import SDRecord
from .base import SDMethod, StepOutput, register


def fisher_timesteps(total: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """The timesteps of one image's summed loss: all ``total`` (k = 0 or k >= total) or one uniform draw
    in each of ``k`` equal strata of 0..total-1."""
    if k <= 0 or k >= total:
        return torch.arange(total)
    edges = torch.arange(k + 1) * total // k
    return edges[:-1] + (torch.rand(k, generator=generator) * (edges[1:] - edges[:-1])).long()


def diffusion_fisher(adapter, records: list[SDRecord], params: list[torch.Tensor], k: int, chunk: int,
                     generator: torch.Generator) -> list[torch.Tensor]:
    """The diagonal Fisher above over ``records`` (one image each), on ``params``. Per image the
    timesteps are drawn first (k > 0), then the noise, one (len(timesteps), C, h, w) draw."""
    total = adapter.noise_scheduler.config.num_train_timesteps
    fisher = [torch.zeros_like(p) for p in params]
    for r in records:
        batch = adapter.encode([r])  # latents (1, C, h, w), cond (1 row)
        ts = fisher_timesteps(total, k, generator)
        eps = torch.randn((len(ts), *batch.latents.shape[1:]), generator=generator).to(batch.latents)
        scale = total / len(ts)  # 1 with every timestep
        adapter.model.zero_grad(set_to_none=True)
        for s in range(0, len(ts), chunk):  # gradients of the chunks add up to that of the sum
            t = ts[s:s + chunk].to(batch.latents.device)
            z_t = adapter.noise_scheduler.add_noise(batch.latents.expand(len(t), -1, -1, -1), eps[s:s + chunk], t)
            pred = adapter.predict(z_t, t, batch.cond.expand(len(t)))
            target = adapter.target(batch.latents.expand(len(t), -1, -1, -1), eps[s:s + chunk], t)
            per_t = (target - pred).float().pow(2).mean((1, 2, 3))  # (chunk,) the loss at each t
            (scale * per_t.sum()).backward()
        for f, p in zip(fisher, params):
            if p.grad is not None:
                f += p.grad.detach() ** 2 / len(records)
    adapter.model.zero_grad(set_to_none=True)
    return fisher


@register
@dataclass
class SelectiveAmnesia(SDMethod):
    name = "sa"
    needs_retain = True
    ewc: float = 50.0  # the authors' lambda
    replay_weight: float = 1.0
    fisher_samples: int = 0  # replayed images in the Fisher; 0 = all (the authors: their whole replay set)
    fisher_timesteps: int = 0  # timesteps summed per image; 0 = all T (the authors), k < T: the estimate above
    fisher_batch: int = 50  # timesteps per backward in the Fisher (memory only: the authors' 20 chunks of 50)
    replay_per_prompt: int = 2
    replay_inference_steps: int = 25

    def __post_init__(self):
        for key in ("fisher_samples", "fisher_timesteps"):
            if getattr(self, key) < 0:
                raise ValueError(f"sa.{key} must be 0 (all) or positive; got {getattr(self, key)}")
        if self.fisher_batch < 1:
            raise ValueError(f"sa.fisher_batch must be at least 1; got {self.fisher_batch}")

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
        n = len(self._replay) if self.fisher_samples == 0 else min(self.fisher_samples, len(self._replay))
        records = [self._replay[i * len(self._replay) // n] for i in range(n)]
        gen = torch.Generator().manual_seed(ctx.generator.initial_seed() + 2 if ctx.generator else 2)
        self._params = params
        self._fisher = diffusion_fisher(a, records, params, self.fisher_timesteps, self.fisher_batch, gen)

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
