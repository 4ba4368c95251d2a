"""Pieces the methods' objectives are built from. Shapes: (batch, seq) unless noted."""

from __future__ import annotations

import torch
from knowtrace.logprobs import IGNORE_INDEX
from torch.nn import functional as F


def signed_weights(flags: torch.Tensor, alpha: float, beta: float, scored: torch.Tensor | None = None) -> torch.Tensor:
    """FTTP's per-element weights from concept flags (answer tokens or latent pixels, any shape):
    ``-alpha`` on the concept (ascent), ``+beta`` elsewhere (descent); 0 where not ``scored``."""
    w = torch.where(flags.bool(), -alpha, beta)
    return w if scored is None else torch.where(scored, w, 0.0)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``-log p(label)`` aligned to ``labels`` (position t scored by logits[t-1]).

    logits: (batch, seq, vocab). Returns (nll, scored), both (batch, seq); nll is 0 where unscored.
    """
    target = labels[:, 1:]
    scored = target != IGNORE_INDEX
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target.clamp(min=0), reduction="none")
    nll = nll * scored
    pad = torch.zeros_like(labels[:, :1], dtype=nll.dtype)
    return torch.cat([pad, nll], 1), torch.cat([pad.bool(), scored], 1)


def weighted_token_loss(logits, labels, weights) -> torch.Tensor:
    """``sum_t w_t * l_t / (number of scored tokens)``: GD is w = +1, GA w = -1, FTTP signed weights."""
    nll, scored = token_nll(logits, labels)
    return (weights.to(nll.dtype) * nll * scored).sum() / scored.sum().clamp(min=1)


def mean_nll(logits, labels) -> torch.Tensor:
    nll, scored = token_nll(logits, labels)
    return nll.sum() / scored.sum().clamp(min=1)


def records_nll(adapter, records) -> torch.Tensor:
    """``mean_nll`` of the answers of ``records`` under the model being trained."""
    batch = adapter.encode(records)
    return mean_nll(adapter.model(**batch).logits, batch["labels"])


def sequence_logprob(logits, labels) -> torch.Tensor:
    """(batch,) sum of the answer tokens' log-probs."""
    return -token_nll(logits, labels)[0].sum(1)


def token_kl(ref_logits, logits, labels) -> torch.Tensor:
    """Mean over scored positions of KL(p_ref || p_theta) of the next-token distributions."""
    scored = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # found once (a host read), used for both
    ref = F.log_softmax(ref_logits[:, :-1].float(), -1)[scored]
    cur = F.log_softmax(logits[:, :-1].float(), -1)[scored]
    return F.kl_div(cur, ref, log_target=True, reduction="batchmean")
