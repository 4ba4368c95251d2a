"""GA: gradient ascent on every answer token of the forget set (weight -1): the negated mean NLL."""

from dataclasses import dataclass

from .base import MLLMMethod, StepOutput, register
from .losses import records_nll


@register
@dataclass
class GA(MLLMMethod):
    name = "ga"

    def loss(self, ctx, forget):
        loss = -records_nll(ctx.adapter, forget)
        return StepOutput(loss, {"loss_forget": loss.detach()})
