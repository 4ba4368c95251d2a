"""Forget-Me-Not (attention re-steering), as its authors run it (SHI-Labs/Forget-Me-Not,
``src/train_attn.py``: ``AttnController`` collects, at every ``attn2`` layer, the attention
probabilities on the concept's token positions; its ``loss`` is the L2 norm of all of them
concatenated; ``ForgetMeNotDataset.__getitem__`` marks the positions; ``configs/attn.yaml`` holds
the defaults). Over noised forget images:

    loss = mean over records b of || A_b ||_2,   A_b = (A^l[b, head, query, k]) for every attn2 layer l,
           head, query pixel and k in the record's concept tokens (and end-of-text token)

so every probability counts once: a layer with more query pixels (the 64x64 ones of SD 1.x) weighs
more, and a record's norm is taken over all its layers together (their batch is 1 record; the mean
over records keeps the loss's scale whatever the batch size).

Options, with the authors' defaults:

* ``eot`` (their ``use_pooler: true``): also count the end-of-text ("pooler") token. ``"pooler"``: its
  first occurrence, what their code marks with their default SD 2.1 tokenizer (which pads with
  another token); ``"all"``: every end-of-text position, what their code marks where the tokenizer
  pads with the end token (SD 1.x, the world SD): the whole padding; ``"none"``: the concept's
  tokens only.
* ``only_xattn`` (their ``only_optimize_ca: false``): train the whole UNet by default (the
  parameters past the last ``attn2`` layer's query / key get a zero gradient and stay put), or only the
  cross-attention (every ``attn2`` parameter: the value and output projections of earlier layers
  reach later layers' queries, so they are trained too).

Not repeated from their defaults: ``use_ti: true`` (a textual-inversion token learned beforehand
stands for the concept in the prompt; here the concept's own name is used, their ``use_ti: false``
path) and their optimiser (AdamW, weight decay 0.01, lr 2e-6, 35 steps, gradient clipping 1: the
loop's settings apply). The probabilities come with gradient from
:func:`knowtrace.sd_attention.capture_cross_attention` (``keep_grad=True``). The concept's tokens are
the prompt's tokens that overlap an occurrence of its name or an alias in the decoded prompt
(:func:`unlearn.data.token_weights.concept_token_positions`, BPE-safe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from knowtrace.sd_attention import capture_cross_attention

from ..data.token_weights import concept_token_positions
from .base import SDMethod, StepOutput, register

EOT_CHOICES = ("pooler", "all", "none")


@register
@dataclass
class ForgetMeNot(SDMethod):
    name = "fmn"
    eot: str = "pooler"  # end-of-text positions in the loss: "pooler" (the first), "all", "none"
    only_xattn: bool = False  # True: train attn2 only; False: the whole UNet (the authors' default)

    def __post_init__(self):
        if self.eot not in EOT_CHOICES:
            raise ValueError(f"fmn.eot must be one of {', '.join(EOT_CHOICES)}; got {self.eot!r}")

    def train_targets(self, adapter, lora):
        return adapter.part("xattn", lora) if self.only_xattn else None

    def positions(self, tok, prompt: str, names) -> torch.Tensor:
        """(L,) 1 on the prompt's concept tokens and the end-of-text positions ``eot`` names."""
        ids = torch.tensor(tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids)
        row = torch.zeros(len(ids))
        row[concept_token_positions(tok, prompt, names)] = 1
        ends = (ids == tok.eos_token_id).nonzero().flatten()
        row[{"pooler": ends[:1], "all": ends, "none": ends[:0]}[self.eot]] = 1
        return row

    def token_rows(self, ctx, forget) -> torch.Tensor:
        """(B, L) the records' positions. Found once per prompt (a step would repeat the same decoding)
        and kept on the instance, not in a field: the manifest records options only."""
        tok, rows = ctx.adapter.pipe.tokenizer, self.__dict__.setdefault("_token_rows", {})
        keys = [(r.prompt, tuple(ctx.names)) for r in forget]
        for key in keys:
            if key not in rows:
                rows[key] = self.positions(tok, *key)
        return torch.stack([rows[k] for k in keys])

    def setup(self, ctx, forget, retain):
        self.token_rows(ctx, forget)  # every prompt checked before the first step

    def loss(self, ctx, forget):
        a = ctx.adapter
        batch = a.encode(forget)
        _, t, z_t = a.noise(batch.latents, ctx.generator)
        rows = self.token_rows(ctx, forget).to(z_t.device)  # (B, L)
        with capture_cross_attention(a.pipe.unet, keep_grad=True) as cap:
            pred = a.predict(z_t, t, batch.cond)
        # each p: (B, heads, h*w, L); the squares of the marked probabilities, summed per record
        squares = sum((p.float() ** 2 * rows[:, None, None, :]).sum((1, 2, 3)) for p in cap.probs())  # (B,)
        loss = squares.sqrt().mean()
        # + 0 * prediction: the layers past the last attn2 get a zero gradient instead of none (they stay
        # put all the same); with several processes DDP requires a gradient for every trained parameter
        return StepOutput(loss + 0 * pred.float().sum(), {"loss_forget": loss.detach()})
