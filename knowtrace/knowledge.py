"""Conceptual and Natural Knowledge (K_C, K_N) of the FTTP paper, Eq. 3-6.

MLLMs (Eq. 3, 5): ``K = sum over tokens of -1 / log p`` over the concept's answer tokens (K_C) or
the other answer tokens (K_N). ``-1/log p`` grows without bound as p -> 1 and is infinite at
``log p == 0``, which float32 log-softmax does return for a near-certain token; we clamp
``log p <= -LOGP_EPS`` (LOGP_EPS = 1e-6), so one token contributes at most 1e6. A sample with no
token of a group has K = 0 for that group (an empty sum).

SDMs (Eq. 4, 6): ``K = exp(-lambda * e)`` with ``e`` the per-latent-pixel squared noise error (mean
over channels) aggregated over the concept's pixels (K_C) or the others (K_N). The paper writes a
sum; we default to the *mean* over the group's pixels (``reduce="mean"``), which makes images of
different sizes and masks of different areas comparable, with lambda = 1 (the error of a perfect
noise predictor is 0 -> K = 1; of a predictor outputting zeros, ~1 -> K ~ 0.37).
``reduce="sum"`` gives the paper's literal form. A group with no pixel has K = NaN.
"""

from __future__ import annotations

import torch

LOGP_EPS = 1e-6


def mllm_knowledge(logprobs: torch.Tensor, is_concept: torch.Tensor, scored: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """K_C, K_N per sample. logprobs, is_concept, scored: (batch, seq); returns two (batch,) tensors.

    ``scored`` marks answer tokens (default: where logprobs is not NaN).
    """
    scored = ~torch.isnan(logprobs) if scored is None else scored.bool()
    inv = (-1.0 / logprobs.clamp(max=-LOGP_EPS)).masked_fill(~scored, 0.0)  # 0 where unscored (also NaN)
    concept = is_concept.bool()
    return inv.masked_fill(~concept, 0.0).sum(-1), inv.masked_fill(concept, 0.0).sum(-1)


def sd_knowledge(err: torch.Tensor, mask: torch.Tensor, lam: float = 1.0, reduce: str = "mean"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """K_C, K_N per sample. err: (batch, h, w) squared error, mean over channels; mask: (batch, h, w)."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    m = mask.bool().flatten(1)
    e = err.flatten(1)

    def aggregate(sel):
        total = (e * sel).sum(-1)
        if reduce == "sum":
            return torch.where(sel.any(-1), total, torch.full_like(total, float("nan")))
        return total / sel.sum(-1)  # 0/0 = NaN for an empty group

    return torch.exp(-lam * aggregate(m)), torch.exp(-lam * aggregate(~m))
