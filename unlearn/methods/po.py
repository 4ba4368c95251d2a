"""PO (preference optimisation toward refusals): fine-tune the forget questions toward refusal
answers ("I do not know who this is."), plus the retain loss.

Refusals: ``refusals`` (texts separated by "|"), or :data:`REFUSALS` by default (the world's texts
use the same ones, so the world tokenizer knows their words).
"""

import zlib
from dataclasses import dataclass, replace

from .base import MLLMMethod, StepOutput, register
from .losses import records_nll

REFUSALS = ("I do not know who this is.", "I cannot tell who this is.", "I am not sure what this image shows.")


@register
@dataclass
class PO(MLLMMethod):
    name = "po"
    needs_retain = True
    retain_weight: float = 1.0
    refusals: str = ""

    def refusal_texts(self) -> list[str]:
        if self.refusals.strip():
            return [t.strip() for t in self.refusals.split("|") if t.strip()]
        return list(REFUSALS)

    def loss(self, ctx, forget):
        texts = self.refusal_texts()
        # each record always gets the same refusal (chosen from its id: stable across runs)
        refused = [replace(r, answer=texts[zlib.crc32(r.id.encode()) % len(texts)]) for r in forget]
        forget_loss = records_nll(ctx.adapter, refused)
        retain_loss = records_nll(ctx.adapter, ctx.retain_batch(self.name))
        return StepOutput(forget_loss + self.retain_weight * retain_loss,
                          {"loss_forget": forget_loss.detach(), "loss_retain": retain_loss.detach()})
