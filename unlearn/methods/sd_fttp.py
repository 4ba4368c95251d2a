"""SD FTTP (Forget the Token and Pixel): ascent on the concept's latent pixels, descent on the others.
The per-pixel loss is the UNet's error against its training target (``SDAdapter.pixel_error``: the
noise under epsilon prediction, the velocity under v-prediction).

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

from ..data.sd_masks import MaskOptions
from .base import SDMethod, StepOutput, register
from .losses import signed_weights


@register
@dataclass
class SDFTTP(SDMethod):
    name = "fttp"
    has_step_errors: ClassVar[bool] = True
    alpha: float = 0.8
    beta: float = 0.5
    dilate: int = 0  # OpenCV dilation kernel (pixels at the model's resolution); 0 = vanilla FTTP
    dilate_iterations: int = 1
    allow_degenerate: bool = False  # an empty/full mask weights the whole image as the concept instead of an error

    @property
    def mask_options(self) -> MaskOptions:
        return MaskOptions(self.dilate, self.dilate_iterations, self.allow_degenerate)

    def setup(self, ctx, forget, retain):
        ctx.adapter.masks(forget, self.mask_options)  # every mask checked before the first step

    def loss(self, ctx, forget):
        batch = ctx.adapter.encode(forget, masks=self.mask_options)
        m = batch.mask  # (B, h, w) {0, 1}: the concept's latent pixels
        e = ctx.adapter.pixel_error(batch, ctx.generator)  # (B, h, w)
        loss = (signed_weights(m, self.alpha, self.beta) * e).mean()
        e = e.detach()
        logs = {"loss_forget": loss.detach(), "err_concept": (e * m).sum() / m.sum().clamp(min=1),
                "err_other": (e * (1 - m)).sum() / (1 - m).sum().clamp(min=1), "concept_share": m.mean()}
        return StepOutput(loss, logs, per_element=e, ids=[r.id for r in forget])


@register
@dataclass
class SDFTTPDilated(SDFTTP):
    name = "fttp_dilated"
    dilate: int = 5
