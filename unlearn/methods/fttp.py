"""FTTP: gradient ascent on the concept's tokens (-alpha), descent on every other answer token
(+beta) of the same forget answers; no retain set.

Defaults alpha = 1.0, beta = 1.0: see docs/methods.md for the measurement on the world that they
come from (the paper gives no MLLM values).
"""

from dataclasses import dataclass

from ..data.token_weights import token_weights
from .base import MLLMMethod, register
from .losses import weighted_token_loss


@register
@dataclass
class FTTP(MLLMMethod):
    name = "fttp"
    alpha: float = 1.0
    beta: float = 1.0
    allow_missing: bool = False  # answers without the concept: all natural (+beta) instead of an error

    def weights(self, ctx, forget, labels):
        """Signed token weights, computed once per distinct batch (steps revisit the same records)."""
        cache = self.__dict__.setdefault("_weights", {})
        key = (labels.shape, labels.cpu().numpy().tobytes())
        if key not in cache:
            cache[key] = token_weights(ctx.adapter.tokenizer, labels, ctx.names, self.alpha, self.beta,
                                       record_ids=[r.id for r in forget], concept=ctx.concept,
                                       allow_missing=self.allow_missing)
        return cache[key]

    def loss(self, ctx, forget):
        batch = ctx.adapter.encode(forget)
        weights, is_concept = self.weights(ctx, forget, batch["labels"])
        logits = ctx.adapter.model(**batch).logits
        loss = weighted_token_loss(logits, batch["labels"], weights)
        return loss, {"loss_forget": loss.item(), "concept_tokens": int(is_concept.sum())}
