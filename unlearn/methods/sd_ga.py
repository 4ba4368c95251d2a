"""SD GA: gradient ascent on the noise-prediction error of every latent pixel of the forget images."""

from dataclasses import dataclass

from .base import SDMethod, register


@register
@dataclass
class SDGA(SDMethod):
    name = "ga"

    def loss(self, ctx, forget):
        a = ctx.adapter
        e = a.pixel_error(a.encode(forget), ctx.generator)  # (B, h, w)
        return -e.mean(), {"loss_forget": e.mean().item()}
