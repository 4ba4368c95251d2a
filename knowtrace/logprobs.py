"""Per-token log-probabilities from logits a forward pass already produced.

``log p(y_t) = logits[t-1, y_t] - logsumexp(logits[t-1, :])``, computed in chunks of rows so that
no full-vocabulary log-softmax is ever materialised, detached, in float32. Labels are those of the
final model input (for MLLMs: after the image token was expanded into its patch positions), with
``ignore_index`` on positions that are not scored (prompt, image, padding).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


@torch.no_grad()
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   chunk_rows: int = 2048) -> torch.Tensor:
    """Log-prob of every labelled token under the logits of the position before it.

    logits: (batch, seq, vocab); labels: (batch, seq) with ``ignore_index`` where unscored.
    Returns (batch, seq) float32: entry t is log p(labels[:, t] | prefix), NaN where unscored
    (including t = 0, which has no preceding position).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (batch, seq)")
    b, s, v = logits.shape
    out = torch.full((b, s), float("nan"), dtype=torch.float32, device=logits.device)
    pred = logits[:, :-1].reshape(-1, v)  # (batch * (seq-1), vocab): position t-1 predicts token t
    target = labels[:, 1:].reshape(-1)
    scored = (target != ignore_index).nonzero().squeeze(1)
    values = torch.empty(scored.numel(), dtype=torch.float32, device=logits.device)
    for start in range(0, scored.numel(), chunk_rows):
        rows = scored[start:start + chunk_rows]
        chunk = pred[rows].float()  # (rows, vocab), only the scored rows
        values[start:start + chunk_rows] = chunk.gather(1, target[rows, None]).squeeze(1) - chunk.logsumexp(1)
    shifted = torch.full((b * (s - 1),), float("nan"), dtype=torch.float32, device=logits.device)
    shifted[scored] = values
    out[:, 1:] = shifted.view(b, s - 1)
    return out


def answer_logprobs(logprobs: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> list[torch.Tensor]:
    """Per sample, the 1-D tensor of log-probs of its scored tokens, in order."""
    return [row[lab != ignore_index] for row, lab in zip(logprobs, labels)]
