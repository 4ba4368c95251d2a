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
    b, s, _ = logits.shape
    out = torch.full((b, s), float("nan"), dtype=torch.float32, device=logits.device)
    rows, cols = (labels[:, 1:] != ignore_index).nonzero(as_tuple=True)  # scored tokens: (row, position - 1)
    for start in range(0, rows.numel(), chunk_rows):
        r, c = rows[start:start + chunk_rows], cols[start:start + chunk_rows]
        chunk = logits[r, c].float()  # (n, vocab): only the scored positions, position t-1 predicts token t
        out[r, c + 1] = chunk.gather(1, labels[r, c + 1, None]).squeeze(1) - chunk.logsumexp(1)
    return out


def answer_logprobs(logprobs: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> list[torch.Tensor]:
    """Per sample, the 1-D tensor of log-probs of its scored tokens, in order."""
    return [row[lab != ignore_index] for row, lab in zip(logprobs, labels)]
