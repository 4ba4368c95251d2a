"""Forget-Me-Not (attention re-steering): minimise the cross-attention mass that the UNet's
``attn2`` layers put on the concept's prompt tokens, over noised forget images, training the
cross-attention only: its query and key projections, the only cross-attention weights the
probabilities depend on (value/output projections would get zero gradient: training them is a
no-op, and under several processes DDP rejects parameters that never get a gradient).

    loss = mean over attn2 layers, heads, query pixels and records of sum_{k in concept tokens} A[k]

The probabilities come with gradient from :func:`knowtrace.sd_attention.capture_cross_attention`
(``keep_grad=True``). The concept's tokens are found by matching the token sequences of its name
and aliases in the prompt's token ids (every occurrence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import SDMethod, register


def concept_token_positions(tokenizer, prompt: str, names) -> list[int]:
    """Positions (in the padded text-encoder input, start token included) of every name/alias token sequence."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    found = set()
    for n in names:
        seq = tokenizer(n, add_special_tokens=False).input_ids
        for s in range(len(ids) - len(seq) + 1):
            if seq and ids[s:s + len(seq)] == seq:
                found.update(range(s, s + len(seq)))
    if not found:
        raise ValueError(f"prompt {prompt!r}: none of the concept's names ({', '.join(names)}) is among its tokens")
    return sorted(found)


@register
@dataclass
class ForgetMeNot(SDMethod):
    name = "fmn"

    def train_targets(self, adapter, lora):
        return adapter.part("xattn_qk", lora)

    def token_mask(self, ctx, forget) -> torch.Tensor:
        """(B, L) 1 on each record's concept tokens."""
        tok = ctx.adapter.pipe.tokenizer
        m = torch.zeros(len(forget), tok.model_max_length)
        for i, r in enumerate(forget):
            m[i, concept_token_positions(tok, r.prompt, ctx.names)] = 1
        return m

    def setup(self, ctx, forget, retain):
        self.token_mask(ctx, forget)  # every prompt checked before the first step

    def loss(self, ctx, forget):
        from knowtrace.sd_attention import capture_cross_attention

        a = ctx.adapter
        batch = a.encode(forget)
        _, t, z_t = a.noise(batch.latents, ctx.generator)
        tokens = self.token_mask(ctx, forget).to(z_t.device)  # (B, L)
        with capture_cross_attention(a.pipe.unet, keep_grad=True) as cap:
            a.predict(z_t, t, batch.cond)
        probs = cap.probs()  # each (B, heads, h*w, L)
        mass = torch.stack([(p.float() * tokens[:, None, None, :]).sum(-1).mean() for p in probs]).mean()
        return mass, {"loss_forget": mass.item()}
