"""Membership-inference scores of the open-unlearning benchmark, from the per-token statistics of one forward.

Definitions follow open-unlearning (github.com/locuslab/open-unlearning, commit d3d7cf9e):
``src/evals/metrics/mia/loss.py``, ``zlib.py``, ``min_k.py``, ``min_k_plus_plus.py`` (the scores),
``src/evals/metrics/mia/utils.py`` (``mia_auc``), ``src/evals/metrics/privacy.py`` (``privleak``), with the
token statistics of ``src/evals/metrics/utils.py`` (``evaluate_probability``, ``tokenwise_logprobs``,
``tokenwise_vocab_logprobs``); Min-K%++ is Zhang et al. 2024 (github.com/zjysteven/mink-plus-plus, ``run.py``).

Sign conventions (open-unlearning's): every score is *loss-like*, higher = looks less like a member.

* ``loss``: the mean negative log-probability of the labelled answer tokens (``evaluate_probability``'s
  ``avg_loss``, all labelled tokens);
* ``zlib``: ``loss / len(zlib.compress(answer_text))`` (the answer decoded without special tokens);
* ``min_k``: ``-mean`` of the lowest ``max(1, int(k * m))`` token log-probs;
* ``min_k++``: the same over ``(log p - mu) / sigma``, where ``mu`` and ``sigma**2`` are the mean and variance
  of ``log p`` over the vocabulary under the model's own next-token distribution (variance clamped at 1e-6).

For both Min-K scores open-unlearning drops the last labelled token (``tokenwise_logprobs``: "-1 to ignore eos
prediction"), so ``m`` is the number of labelled tokens - 1; a row left with no token scores 0, as there.
``k``: 0.2 is ``MinKProbAttack``'s default (the TOFU configs use 0.4).

AUC orientation (``mia_auc``): ``roc_auc_score`` with members labelled 0 and non-members 1, so AUC is
P(non-member score > member score) + P(tie) / 2: 1 when members are much more likely than non-members, 0.5 when
the scores cannot tell them apart. ``privleak`` (MUSE's, as open-unlearning computes it):
``((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain) * 100``: 0 for a model that leaks as much as the retain
model, strongly negative for one that still knows its members (under-unlearning), positive for one whose members
look *less* like members than to a model that never saw them (over-unlearning).
"""

from __future__ import annotations

import zlib

import torch

from .logprobs import CHUNK_ELEMENTS, IGNORE_INDEX

SCORES = ("loss", "zlib", "min_k", "min_k++")
VARIANCE_FLOOR = 1e-6  # min_k_plus_plus.py: sigma = torch.clamp(sigma, min=1e-6) (it is the variance there)


@torch.no_grad()
def token_stats(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, mu, sigma), each (n, T) float32 on logits' device, NaN where unscored: at a labelled position t,
    log p(labels[t] | prefix) and the mean and standard deviation of log p over the vocabulary at the
    prediction of token t (position t - 1). logits: (n, T, V); labels: (n, T).

    A chunk of scored positions holds at most ``chunk_elements`` logits (times three: the chunk's log-softmax,
    its probabilities and their product), never a (sequence x vocab) log-softmax."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (batch, seq)")
    n, seq, vocab = logits.shape
    rows_per_chunk = max(1, chunk_elements // max(vocab, 1))
    out = torch.full((3, n, seq), float("nan"), dtype=torch.float32, device=logits.device)
    rows, cols = (labels[:, 1:] != ignore_index).nonzero(as_tuple=True)  # scored tokens: (row, position - 1)
    for start in range(0, rows.numel(), rows_per_chunk):
        r, c = rows[start:start + rows_per_chunk], cols[start:start + rows_per_chunk]
        logp_all = logits[r, c].float()  # (m, V): a copy (advanced indexing), normalised in place below
        logp_all -= logp_all.logsumexp(1, keepdim=True)
        p = logp_all.exp()
        mu = (p * logp_all).sum(1)
        variance = (p.mul_(logp_all).mul_(logp_all)).sum(1) - mu.square()  # E[log p^2] - mu^2
        out[0, r, c + 1] = logp_all.gather(1, labels[r, c + 1, None]).squeeze(1)
        out[1, r, c + 1] = mu
        out[2, r, c + 1] = variance.clamp_min(VARIANCE_FLOOR).sqrt()
    return out[0], out[1], out[2]


def _min_k(values: list[torch.Tensor], k: float) -> torch.Tensor:
    """-mean of the lowest max(1, int(k * m)) of each row's m values; 0 for a row with none (open-unlearning)."""
    out = []
    for v in values:
        if v.numel() == 0:
            out.append(0.0)
            continue
        num = max(1, int(len(v) * k))
        out.append(-float(v.sort().values[:num].double().mean()))
    return torch.tensor(out, dtype=torch.float64)


def mia_scores(logp: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor, texts: list[str],
               k: float = 0.2) -> dict[str, torch.Tensor]:
    """Score name -> (n,) float64 (SCORES; higher = less like a member), from :func:`token_stats` (n, T) and
    ``mask`` (n, T) bool, the labelled answer tokens to score (not position 0); ``texts``: the answers as text
    (for zlib)."""
    if not 0 < k <= 1:
        raise ValueError(f"k={k}: Min-K% takes the lowest fraction k of the tokens, 0 < k <= 1")
    if len(texts) != logp.shape[0]:
        raise ValueError(f"{len(texts)} texts for {logp.shape[0]} rows: give one answer text per row")
    logp, mu, sigma, mask = logp.cpu().double(), mu.cpu().double(), sigma.cpu().double(), mask.cpu()
    if mask[:, 0].any() or logp[mask].isnan().any():
        raise ValueError("mask selects a token without a log-prob (position 0, or one token_stats did not score)")
    counts = mask.sum(1)
    if (counts == 0).any():
        raise ValueError(f"rows {(counts == 0).nonzero().squeeze(1).tolist()} have no scored token")
    loss = -torch.where(mask, logp, 0.0).sum(1) / counts
    zlib_size = torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=torch.float64)
    # Min-K%: every scored token but the last (open-unlearning's "ignore eos prediction")
    kept = [row.nonzero().squeeze(1)[:-1] for row in mask]
    return {"loss": loss, "zlib": loss / zlib_size,
            "min_k": _min_k([logp[i, idx] for i, idx in enumerate(kept)], k),
            "min_k++": _min_k([((logp[i] - mu[i]) / sigma[i])[idx] for i, idx in enumerate(kept)], k)}


def auc(member, nonmember) -> float:
    """ROC AUC of telling members from non-members by score, oriented as open-unlearning's ``mia_auc``:
    P(non-member score > member score), ties counted half (average ranks, Mann-Whitney)."""
    member, nonmember = torch.as_tensor(member, dtype=torch.float64), torch.as_tensor(nonmember, dtype=torch.float64)
    if member.numel() == 0 or nonmember.numel() == 0:
        raise ValueError(f"AUC needs members and non-members, got {member.numel()} and {nonmember.numel()}")
    if member.isnan().any() or nonmember.isnan().any():
        raise ValueError("a membership score is NaN")
    scores = torch.cat([member, nonmember])
    sorted_scores, order = scores.sort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # tied scores share their average rank
    _, inverse, counts = sorted_scores.unique_consecutive(return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2
    ranks[order] = average[inverse]
    n_non = nonmember.numel()
    u = ranks[member.numel():].sum() - n_non * (n_non + 1) / 2  # pairs where a non-member scores higher
    return float(u / (member.numel() * n_non))


def privleak(auc_model: float, auc_retain: float) -> float:
    """MUSE's PrivLeak in percent, as open-unlearning's ``privleak`` (see the module docstring)."""
    score, ref = 1 - auc_model, 1 - auc_retain
    return (score - ref) / (ref + 1e-10) * 100
