"""GA: gradient ascent on every answer token of the forget set (weight -1)."""

from dataclasses import dataclass

import torch

from .base import MLLMMethod, StepOutput, register
from .losses import weighted_token_loss


@register
@dataclass
class GA(MLLMMethod):
    name = "ga"

    def loss(self, ctx, forget):
        batch = ctx.adapter.encode(forget)
        logits = ctx.adapter.model(**batch).logits
        loss = weighted_token_loss(logits, batch["labels"], -torch.ones(batch["labels"].shape))
        return StepOutput(loss, {"loss_forget": loss.detach()})
