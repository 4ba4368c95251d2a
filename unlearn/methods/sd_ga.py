"""SD GA: gradient ascent on the noise-prediction error of every latent pixel of the forget images."""

from dataclasses import dataclass
from typing import ClassVar

from .base import SDMethod, StepOutput, register


@register
@dataclass
class SDGA(SDMethod):
    name = "ga"
    has_step_errors: ClassVar[bool] = True

    def loss(self, ctx, forget):
        a = ctx.adapter
        e = a.pixel_error(a.encode(forget), ctx.generator)  # (B, h, w)
        return StepOutput(-e.mean(), {"loss_forget": e.mean().detach()}, per_element=e.detach(),
                          ids=[r.id for r in forget])
