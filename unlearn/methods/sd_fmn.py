"""Forget-Me-Not (attention re-steering): minimise the cross-attention mass that the UNet's
``attn2`` layers put on the concept's prompt tokens, over noised forget images, training the
cross-attention only: its query and key projections, the only cross-attention weights the
probabilities depend on (value/output projections would get zero gradient: training them is a
no-op, and under several processes DDP rejects parameters that never get a gradient).

    loss = mean over attn2 layers, heads, query pixels and records of sum_{k in concept tokens} A[k]

The probabilities come with gradient from :func:`knowtrace.sd_attention.capture_cross_attention`
(``keep_grad=True``). The concept's tokens are the prompt's tokens that overlap an occurrence of its
name or an alias in the decoded prompt (:func:`unlearn.data.token_weights.prompt_token_flags`, BPE-safe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from knowtrace.sd_attention import capture_cross_attention

from ..data.token_weights import concept_token_positions
from .base import SDMethod, StepOutput, register


@register
@dataclass
class ForgetMeNot(SDMethod):
    name = "fmn"

    def train_targets(self, adapter, lora):
        return adapter.part("xattn_qk", lora)

    def token_rows(self, ctx, forget) -> torch.Tensor:
        """(B, L) 1 on each record's concept tokens. Found once per prompt (a step would repeat the same
        decoding) and kept on the instance, not in a field: the manifest records options only."""
        tok, rows = ctx.adapter.pipe.tokenizer, self.__dict__.setdefault("_token_rows", {})
        keys = [(r.prompt, tuple(ctx.names)) for r in forget]
        for key in keys:
            if key not in rows:
                rows[key] = row = torch.zeros(tok.model_max_length)
                row[concept_token_positions(tok, key[0], key[1])] = 1
        return torch.stack([rows[k] for k in keys])

    def setup(self, ctx, forget, retain):
        self.token_rows(ctx, forget)  # every prompt checked before the first step

    def loss(self, ctx, forget):
        a = ctx.adapter
        batch = a.encode(forget)
        _, t, z_t = a.noise(batch.latents, ctx.generator)
        tokens = self.token_rows(ctx, forget).to(z_t.device)  # (B, L)
        with capture_cross_attention(a.pipe.unet, keep_grad=True) as cap:
            a.predict(z_t, t, batch.cond)
        probs = cap.probs()  # each (B, heads, h*w, L)
        mass = torch.stack([(p.float() * tokens[:, None, None, :]).sum(-1).mean() for p in probs]).mean()
        return StepOutput(mass, {"loss_forget": mass.detach()})
