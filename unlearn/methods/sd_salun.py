"""SalUn for SD: saliency-masked random-label fine-tuning, as its authors run it
(github.com/OPTML-Group/Unlearn-Saliency, ``SD/train-scripts/generate_mask.py``: the saliency mask;
``SD/train-scripts/random_label.py``: the unlearning loss and the masked update).

Saliency (once, before training): over the forget records in batches of ``saliency_batch``, the
gradient of ``-mse(eps, (1 + w) eps_theta(z_t, c, t) - w eps_theta(z_t, "", t))`` (the classifier-free
guided prediction, ``w = saliency_guidance`` = 7.5, i.e. 8.5 eps(c) - 7.5 eps(""); mse = mean over the
batch's elements; t uniform, fresh noise per batch), summed over the batches; score = |sum|. Exactly
``int(fraction * N)`` of the N trained elements are salient, the largest scores first, ranked globally
over all trained tensors (the authors rank with one argsort over the whole UNet). Elements tied at the
cut are drawn at random (seeded) until the count is reached: under LoRA every ``lora_A`` element
scores exactly 0 at the start (``lora_B`` = 0), and those zeros fill the quota at random instead of
all becoming salient (a cut-off ``score >= threshold`` would make every element salient once the
zeros reach the cut) or all being left out.

Loss per step: the forget image is kept and its prompt swapped,
``mse(eps_theta(z_t^f, c, t), stopgrad eps_theta(z_t^f, c', t))`` (same latent, noise and timestep for
both; the target from the model being trained, detached) plus ``retain_weight`` times the ordinary
noise-prediction loss on retain records. ``c'`` (``pseudo``): "first" = one fixed other concept for
every image, the first concept of the retain records (the authors' code uses one fixed other class,
``(class_to_forget + 1) % 10``); "random" = a uniformly drawn other concept per image (the paper's
``c' != c``); or a concept of the retain records by key/name. ``retain_weight`` 0.1 is the code's
default ``--alpha`` (the README's command uses 0.5). After backward the gradient of every
non-salient element is zeroed, so with Adam (no weight decay) only salient elements move.

Under v-prediction (SD 2.x-768) every comparison is in the UNet's output space: the saliency loss
compares the guided output with the training target (``SDAdapter.target``, the velocity), which is the
eps-space loss times ``1 / abar_t`` (for a fixed ``z_t``, ``v`` is an affine function of ``eps``, and
the guided combination's weights sum to 1, so it commutes with that map); the forget term compares two
outputs of the model (no noise involved, any parameterisation); the retain term is the ordinary
training loss (``pixel_error``).

(The toolkit's earlier recipe paired other concepts' images with the forget prompt and regressed on
the true noise, with retain weight 1, a plain eps(c) saliency gradient and the cut-off above; that is
close to Selective Amnesia's surrogate objective, not SalUn's, and is not kept: docs/sd.md.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import SDMethod, StepOutput, register


def top_fraction(scores: list[torch.Tensor], fraction: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Bool masks shaped like ``scores``: exactly ``int(fraction * N)`` elements over all tensors, the
    largest first; among elements equal to the cut value, a seeded random choice fills the count."""
    flat = torch.cat([s.flatten() for s in scores])
    k = int(fraction * flat.numel())
    if k < 1:
        raise ValueError(f"salun.fraction {fraction} of {flat.numel()} trained elements selects none")
    cut = flat.kthvalue(flat.numel() - k + 1).values  # the k-th largest score
    keep = flat > cut  # fewer than k
    tied = (flat == cut).nonzero().squeeze(1)
    pick = torch.randperm(len(tied), generator=generator)[: k - int(keep.sum())]
    keep[tied[pick.to(tied.device)]] = True
    return [m.view_as(s) for m, s in zip(keep.split([s.numel() for s in scores]), scores)]


@register
@dataclass
class SalUn(SDMethod):
    name = "salun"
    needs_retain = True
    fraction: float = 0.5  # share of trained elements that are salient (the authors' SD mask: 50%)
    retain_weight: float = 0.1  # random_label.py's --alpha default (their README runs 0.5)
    saliency_guidance: float = 7.5  # generate_mask.py's --c_guidance
    saliency_batch: int = 4
    pseudo: str = "first"  # c': "first" (one fixed other concept), "random" (per image), or a retain concept

    def setup(self, ctx, forget, retain):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"salun.fraction must be in (0, 1], got {self.fraction}")
        # c' candidates: one prompt per other concept, in the retain records' order
        own = {ctx.concept} | {r.concept for r in forget}
        self._others: dict[str, str] = {}
        for r in retain:
            if r.concept is not None and r.concept not in own:
                self._others.setdefault(r.concept, r.prompt)
        if not self._others:
            raise ValueError("salun needs retain records of other concepts (records with a concept): their prompts "
                             "are the forget images' random labels")
        if self.pseudo not in ("first", "random") and self.pseudo not in self._others:
            raise ValueError(f"salun.pseudo must be 'first', 'random' or a concept of the retain records "
                             f"({', '.join(self._others)}), got {self.pseudo!r}")
        a = ctx.adapter
        params = [p for p in a.model.parameters() if p.requires_grad]
        # the same draws on every process: each masks its synchronised gradient, so the masks must agree
        gen = torch.Generator().manual_seed(ctx.seed + 1)
        a.model.zero_grad(set_to_none=True)
        for s in range(0, len(forget), self.saliency_batch):
            self.saliency_loss(a, forget[s:s + self.saliency_batch], gen).backward()  # gradients add up over batches
        scores = [p.grad.detach().abs() if p.grad is not None else torch.zeros_like(p) for p in params]
        a.model.zero_grad(set_to_none=True)
        masks = top_fraction(scores, self.fraction, gen)
        self._masks = [(p, m.to(p.dtype)) for p, m in zip(params, masks)]

    def saliency_loss(self, a, records, generator) -> torch.Tensor:
        """-mse(y, (1 + w) y_theta(z_t, c) - w y_theta(z_t, "")) over a batch of forget records (y: the
        training target, the noise ``eps`` under epsilon prediction)."""
        batch = a.encode(records)
        eps, t, z_t = a.noise(batch.latents, generator)
        w = self.saliency_guidance
        guided = (1 + w) * a.predict(z_t, t, batch.cond) - w * a.predict(z_t, t, a.text_embeddings([""] * len(records)))
        return -(a.target(batch.latents, eps, t) - guided).float().pow(2).mean()

    @property
    def salient_share(self) -> float:
        return float(sum(m.sum() for _, m in self._masks) / sum(m.numel() for _, m in self._masks))

    def pseudo_prompts(self, n: int, generator) -> list[str]:
        """The prompts of c' for ``n`` forget images."""
        names = list(self._others)
        if self.pseudo == "random":
            return [self._others[names[i]] for i in torch.randint(len(names), (n,), generator=generator).tolist()]
        return [self._others[names[0] if self.pseudo == "first" else self.pseudo]] * n

    def loss(self, ctx, forget):
        a, g = ctx.adapter, ctx.generator
        batch = a.encode(forget)
        eps, t, z_t = a.noise(batch.latents, g)  # eps is unused by the forget term: the target is eps_theta(c')
        pred = a.predict(z_t, t, batch.cond)
        with torch.no_grad():
            target = a.predict(z_t, t, a.text_embeddings(self.pseudo_prompts(len(forget), g)))
        e_forget = (pred - target).float().pow(2).mean()
        e_retain = a.pixel_error(a.encode(ctx.retain_batch(self.name)), g).mean()
        loss = e_forget + self.retain_weight * e_retain
        return StepOutput(loss, {"loss_forget": e_forget.detach(), "loss_retain": e_retain.detach()})

    def gradient_hook(self, ctx):
        for p, m in self._masks:
            if p.grad is not None:
                p.grad.mul_(m)
