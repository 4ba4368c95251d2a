"""GA+KL: gradient ascent on the forget answers plus KL(p_ref || p_theta) per token on retain data."""

from dataclasses import dataclass

from .base import MLLMMethod, StepOutput, register
from .losses import records_nll, token_kl


@register
@dataclass
class GAKL(MLLMMethod):
    name = "ga_kl"
    needs_retain = True
    needs_reference = True
    kl_weight: float = 1.0

    def loss(self, ctx, forget):
        forget_loss = -records_nll(ctx.adapter, forget)
        r = ctx.adapter.encode(ctx.retain_batch(self.name))
        kl = token_kl(ctx.reference_logits(r), ctx.adapter.model(**r).logits, r["labels"])
        return StepOutput(forget_loss + self.kl_weight * kl,
                          {"loss_forget": forget_loss.detach(), "loss_retain": kl.detach()})
