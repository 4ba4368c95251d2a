"""ESD (Erasing Concepts from Diffusion Models): train ``eps_theta(z_t, c, t)`` toward the frozen
starting model's negatively guided prediction

    target = eps_ref(z_t, "", t) - eta * (eps_ref(z_t, c, t) - eps_ref(z_t, "", t))

ESD-x trains the cross-attention (``attn2``) only, ESD-u every other UNet part. ``z_t`` here is a
forget image noised at a uniform timestep; the original samples ``z_t`` by partially denoising with
the model itself (data-free), which costs a sampling run per step; with forget images the noisy
latents lie where the concept lives, which is what the original's sampling aims for.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn import functional as F

from .base import SDMethod, register


def esd_target(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, eta: float) -> torch.Tensor:
    return eps_uncond - eta * (eps_cond - eps_uncond)


@dataclass
class ESD(SDMethod):
    needs_reference = True
    part: ClassVar[str]
    eta: float = 1.0

    def train_targets(self, adapter, lora):
        return adapter.part(self.part, lora)

    def loss(self, ctx, forget):
        a = ctx.adapter
        batch = a.encode(forget)
        _, t, z_t = a.noise(batch.latents, ctx.generator)
        empty = a.text_embeddings([""] * len(forget))

        def reference(model):  # conditional and unconditional predictions in one call: (2B, C, h, w)
            return a.predict(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([batch.cond, empty]), model).chunk(2)

        eps_cond, eps_uncond = ctx.reference(reference, self.name)
        target = esd_target(eps_cond, eps_uncond, self.eta)
        loss = F.mse_loss(a.predict(z_t, t, batch.cond).float(), target.float())
        return loss, {"loss_forget": loss.item()}


@register
@dataclass
class ESDX(ESD):
    name = "esd_x"
    part = "xattn"


@register
@dataclass
class ESDU(ESD):
    name = "esd_u"
    part = "non_xattn"
