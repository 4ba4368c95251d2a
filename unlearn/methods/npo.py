"""NPO: ``(2/beta) * mean log(1 + (p_theta(y|x) / p_ref(y|x))^beta)`` over forget answers (sequences).

A bounded alternative to GA: the loss saturates once the model's likelihood falls well below the
reference's. ``retain_weight`` > 0 adds the retain NLL (NPO+RT).
"""

from dataclasses import dataclass

from torch.nn import functional as F

from .base import MLLMMethod, StepOutput, register
from .losses import records_nll, sequence_logprob


@register
@dataclass
class NPO(MLLMMethod):
    name = "npo"
    needs_reference = True
    beta: float = 0.1
    retain_weight: float = 0.0

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"npo.beta must be > 0 (the loss divides by it); got {self.beta}")
        if self.retain_weight < 0:
            raise ValueError(f"npo.retain_weight must be >= 0; got {self.retain_weight}")

    @property
    def needs_retain(self) -> bool:  # NPO+RT: only with a retain term
        return self.retain_weight > 0

    def loss(self, ctx, forget):
        f = ctx.adapter.encode(forget)
        log_ratio = sequence_logprob(ctx.adapter.model(**f).logits, f["labels"]) - \
            sequence_logprob(ctx.reference_logits(f), f["labels"])
        loss = (2.0 / self.beta) * F.softplus(self.beta * log_ratio).mean()
        logs = {"loss_forget": loss.detach()}
        if self.retain_weight:
            retain_loss = records_nll(ctx.adapter, ctx.retain_batch(self.name))
            loss = loss + self.retain_weight * retain_loss
            logs["loss_retain"] = retain_loss.detach()
        return StepOutput(loss, logs)
