"""SIU (Single Image Unlearning): fine-tune on four constructed targets with cross-entropy plus a
Dual Masked KL to the frozen reference.

Targets, built once from the forget records (one image, several texts):
1. the image's answers with the concept's name replaced by a substitute fictitious name;
2. the image described anew: "Describe this image." -> "The image shows <visual description>.";
3. the concept's text-only facts, kept as they are;
4. other concepts' records, kept (the retain batches).
Dual Masked KL (on the target batch): KL(p_ref || p_theta) per answer position, with positions of
the substitute name left out (token-level mask: there the model must move away from the
reference) and the concept name's token ids removed from both distributions before normalising
(vocabulary-level mask: the reference's preference for the name is not copied).

Substitute and description: ``substitute`` / ``description`` options; for a world concept the run
fills those left empty with the world's (its first substitute name; the concept's visual
description, :func:`unlearn.world.records.world_method_options`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from knowtrace.logprobs import IGNORE_INDEX
from torch.nn import functional as F

from ..data.names import name_pattern
from ..data.records import Record
from ..data.token_weights import concept_flags
from .base import MLLMMethod, StepOutput, register
from .losses import mean_nll, records_nll


def name_token_ids(tokenizer, names) -> list[int]:
    """Ids of every token of the names, written as-is, lower/title case, with and without a space."""
    texts = {t for name in names for v in (name, name.lower(), name.title()) for t in (v, " " + v)}
    ids = {i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]}
    return sorted(ids - {tokenizer.unk_token_id})


@register
@dataclass
class SIU(MLLMMethod):
    name = "siu"
    resume_state = ("_cursor",)
    needs_retain = True
    needs_reference = True
    substitute: str = ""
    description: str = ""
    kl_weight: float = 1.0

    def setup(self, ctx, forget, retain):
        substitute, description = self.substitute, self.description
        if not substitute or not description:
            raise ValueError("siu needs substitute=NAME and description=TEXT for a concept outside the world")
        pattern = name_pattern(ctx.names)
        # 3: text-only facts kept; 1: the image's answers with the substitute name (yes/no ones left out)
        targets = [r if r.image is None else
                   replace(r, id=r.id + ":substitute", answer=pattern.sub(substitute, r.answer))
                   for r in forget if r.image is None or r.qtype != "yesno"]
        images = {id(r.image): r.image for r in forget if r.image is not None}
        targets += [Record(f"{ctx.concept}:describe:{i}", "Describe this image.", f"The image shows {description}.",
                           image, ctx.concept) for i, image in enumerate(images.values())]  # 2: new descriptions
        self._targets, self._substitute = targets, substitute
        self._vocab_mask = name_token_ids(ctx.adapter.tokenizer, ctx.names)
        self._cursor = 0

    def loss(self, ctx, forget):
        n = len(forget)
        batch = [self._targets[(self._cursor + i) % len(self._targets)] for i in range(n)]
        self._cursor += n
        t = ctx.adapter.encode(batch)
        logits = ctx.adapter.model(**t).logits
        ce = mean_nll(logits, t["labels"]) + records_nll(ctx.adapter, ctx.retain_batch(self.name))  # 4: others kept
        kl = self.dual_masked_kl(ctx, ctx.reference_logits(t), logits, t["labels"])
        return StepOutput(ce + self.kl_weight * kl, {"loss_forget": ce.detach(), "loss_retain": kl.detach()})

    def dual_masked_kl(self, ctx, ref_logits, logits, labels):
        # (batch, seq-1): position t-1 predicts label t; token-level mask: not on the substitute name's tokens
        on_sub = concept_flags(ctx.adapter.tokenizer, labels[:, 1:], [self._substitute], allow_missing=True)
        keep = (labels[:, 1:] != IGNORE_INDEX) & ~on_sub.to(labels.device)
        rows = keep.nonzero(as_tuple=True)  # found once (a host read), used for both
        ref, cur = ref_logits[:, :-1][rows].float(), logits[:, :-1][rows].float()
        if self._vocab_mask:  # vocabulary-level mask: the concept's name tokens leave both distributions
            ref[:, self._vocab_mask] = float("-inf")
            cur = cur.index_fill(1, torch.tensor(self._vocab_mask, device=cur.device), float("-inf"))
        ref_lp, cur_lp = F.log_softmax(ref, -1), F.log_softmax(cur, -1)
        finite = torch.isfinite(ref_lp)
        terms = torch.where(finite, ref_lp.exp() * (ref_lp - cur_lp), torch.zeros_like(ref_lp))
        return terms.sum() / keep.sum().clamp(min=1)  # a device tensor: no host read in the loss
