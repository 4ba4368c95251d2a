"""SD FTTP (Forget the Token and Pixel): ascent on the concept's latent pixels, descent on the others.

    loss = -alpha * mean(M * e) + beta * mean((1 - M) * e)

with ``e`` (B, h, w) the per-latent-pixel noise error and ``M`` the concept mask on the latent grid
(:mod:`unlearn.data.sd_masks`). Both means are over ALL latent pixels of the batch, so the loss is
``mean_x(w_x * e_x)`` with ``w_x = -alpha`` on the concept and ``+beta`` elsewhere: a per-pixel
weighting exactly like the token weights on the MLLM side, and a concept pixel weighs the same
whatever the concept's area. (Means over each group's own pixels would make a small concept's few
pixels weigh as much as the whole background, i.e. a much stronger ascent per pixel for small
concepts.) Paper defaults alpha 0.8, beta 0.5.

``fttp_dilated`` (FwD) dilates ``M`` with OpenCV before the latent grid, so the concept's outline
is ascended too instead of being kept by the descent on its surroundings. Its kernel is in pixels
of the model's resolution: the default (5 px, once) is one latent pixel on the world SD (32 px,
factor 2); for SD 1.x at 512 px a comparable ring is e.g. ``dilate=17``.
"""

from dataclasses import dataclass
from typing import ClassVar

from .base import SDMethod, register


@register
@dataclass
class SDFTTP(SDMethod):
    name = "fttp"
    needs_masks: ClassVar[bool] = True
    has_step_errors: ClassVar[bool] = True
    alpha: float = 0.8
    beta: float = 0.5
    dilate: int = 0  # OpenCV dilation kernel (pixels at the model's resolution); 0 = vanilla FTTP
    dilate_iterations: int = 1
    allow_degenerate: bool = False  # an empty/full mask weights the whole image as the concept instead of an error

    def mask_options(self) -> dict:
        return {"kernel": self.dilate, "iterations": self.dilate_iterations, "allow_degenerate": self.allow_degenerate}

    def setup(self, ctx, forget, retain):
        ctx.adapter.masks(forget, **self.mask_options())  # every mask checked before the first step

    def weights(self, mask):
        """Per-latent-pixel weights (B, h, w): -alpha on the concept, +beta elsewhere."""
        return -self.alpha * mask + self.beta * (1 - mask)

    def loss(self, ctx, forget):
        a = ctx.adapter
        batch = a.encode(forget, with_mask=True, **self.mask_options())
        e = a.pixel_error(batch, ctx.generator)  # (B, h, w)
        m = batch.mask
        loss = (self.weights(m) * e).mean()
        e = e.detach()
        self.step_errors = ([r.id for r in forget], e)
        return loss, {"loss_forget": loss.item(), "err_concept": float((e * m).sum() / m.sum().clamp(min=1)),
                      "err_other": float((e * (1 - m)).sum() / (1 - m).sum().clamp(min=1)),
                      "concept_share": float(m.mean())}


@register
@dataclass
class SDFTTPDilated(SDFTTP):
    name = "fttp_dilated"
    dilate: int = 5
