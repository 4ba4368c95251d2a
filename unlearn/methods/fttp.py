"""FTTP: gradient ascent on the concept's tokens (-alpha), descent on every other answer token
(+beta) of the same forget answers; no retain set. The per-token loss is the answer token's NLL.

Defaults alpha = 2.0, beta = 0.5, measured on the world (docs/methods.md; the paper gives no MLLM
values). Under Adam only the ratio alpha / beta matters (Adam's update is invariant to a common
scale of the loss, up to its epsilon): (1, 1) and (2, 2) train identically, and so do (2, 0.5) and
(4, 1). The ratio 4 had the best balance of EM and specificity in the measurement.
"""

from dataclasses import dataclass

from knowtrace.logprobs import IGNORE_INDEX

from .base import MLLMMethod, StepOutput, register
from .losses import signed_weights, weighted_token_loss


@register
@dataclass
class FTTP(MLLMMethod):
    name = "fttp"
    alpha: float = 2.0
    beta: float = 0.5
    allow_missing: bool = False  # answers without the concept: all natural (+beta) instead of an error

    def loss(self, ctx, forget):
        batch = ctx.adapter.encode(forget)
        labels = batch["labels"]
        flags = ctx.adapter.concept_flags(forget, ctx.names, self.allow_missing)  # (B, seq) the concept's tokens
        weights = signed_weights(flags, self.alpha, self.beta, scored=labels != IGNORE_INDEX)
        loss = weighted_token_loss(ctx.adapter.model(**batch).logits, labels, weights)
        return StepOutput(loss, {"loss_forget": loss.detach(), "concept_tokens": flags.sum()})
