"""GradDiff: gradient ascent on the forget answers plus gradient descent on retain answers."""

from dataclasses import dataclass

from .base import MLLMMethod, StepOutput, register
from .losses import mean_nll


@register
@dataclass
class GradDiff(MLLMMethod):
    name = "graddiff"
    needs_retain = True
    retain_weight: float = 1.0

    def loss(self, ctx, forget):
        f = ctx.adapter.encode(forget)
        r = ctx.adapter.encode(ctx.retain_batch(self.name))
        forget_loss = -mean_nll(ctx.adapter.model(**f).logits, f["labels"])
        retain_loss = mean_nll(ctx.adapter.model(**r).logits, r["labels"])
        return StepOutput(forget_loss + self.retain_weight * retain_loss,
                          {"loss_forget": forget_loss.detach(), "loss_retain": retain_loss.detach()})
