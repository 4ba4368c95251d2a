"""SD GA: gradient ascent on the noise-prediction error of every latent pixel of the forget images."""

from dataclasses import dataclass
from typing import ClassVar

from .base import SDMethod, register


@register
@dataclass
class SDGA(SDMethod):
    name = "ga"
    has_step_errors: ClassVar[bool] = True

    def loss(self, ctx, forget):
        a = ctx.adapter
        e = a.pixel_error(a.encode(forget), ctx.generator)  # (B, h, w)
        self.step_errors = ([r.id for r in forget], e.detach())
        return -e.mean(), {"loss_forget": e.mean().item()}
