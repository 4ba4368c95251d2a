"""GradDiff: gradient ascent on the forget answers plus gradient descent on retain answers."""

from dataclasses import dataclass

from .base import MLLMMethod, StepOutput, register
from .losses import records_nll


@register
@dataclass
class GradDiff(MLLMMethod):
    name = "graddiff"
    needs_retain = True
    retain_weight: float = 1.0

    def loss(self, ctx, forget):
        forget_loss = -records_nll(ctx.adapter, forget)
        retain_loss = records_nll(ctx.adapter, ctx.retain_batch(self.name))
        return StepOutput(forget_loss + self.retain_weight * retain_loss,
                          {"loss_forget": forget_loss.detach(), "loss_retain": retain_loss.detach()})
