"""Per-token log-probabilities from logits a forward pass already produced.

``log p(y_t) = logits[t-1, y_t] - logsumexp(logits[t-1, :])`` in float32, detached, in chunks of rows
(no full-vocabulary log-softmax is materialised). Labels are those of the final model input (MLLMs:
after image-token expansion), ``ignore_index`` where unscored. :class:`LogProbCapture` is the forward
hook that keeps them (not the logits) for every forward a training step already makes with labels.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .capture import Capture, host_copies

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2 ** 24  # logits per chunk of token_logprobs: 64 MiB in float32


@torch.no_grad()
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   chunk_rows: int = 2048, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Log-prob of every labelled token under the logits of the position before it.

    logits: (batch, seq, vocab); labels: (batch, seq) with ``ignore_index`` where unscored.
    Returns (batch, seq) float32: entry t is log p(labels[:, t] | prefix), NaN where unscored
    (including t = 0, which has no preceding position). A chunk holds at most ``chunk_rows`` rows
    and ``chunk_elements`` logits (and as many again inside ``logsumexp``).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (batch, seq)")
    b, s, vocab = logits.shape
    # rows per chunk: at Qwen's vocabulary (152064) 110, so a fully labelled sequence never holds a
    # (seq x vocab) float32 copy, let alone two
    chunk_rows = max(1, min(chunk_rows, chunk_elements // max(vocab, 1)))
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


@dataclass
class Forward:
    """One captured forward: per-row log-probs, labels, input ids and attention maps (or None), all on the
    CPU (copied from the device once per forward)."""

    logp: torch.Tensor  # (batch, seq) float32, NaN where unscored
    labels: torch.Tensor  # (batch, seq)
    input_ids: torch.Tensor | None  # (batch, seq)
    attention_mask: torch.Tensor | None  # (batch, seq)
    maps: list[dict[int, torch.Tensor]] | None  # per row: layer -> (heads, n_answer, gy, gx)
    sae_acts: list[torch.Tensor] | None = None  # per row: (n_answer, n_features) (knowtrace.sae_capture)
    attr: list | None = None  # per row: ((n_answer, gy, gx) maps, (n_answer,) deltas) or None (knowtrace.attribution)

    def answer(self, row: int) -> list[int]:
        return self.labels[row][self.labels[row] != IGNORE_INDEX].tolist()

    def key(self, row: int) -> tuple[int, ...] | None:
        if self.input_ids is None:
            return None
        ids = self.input_ids[row]
        if self.attention_mask is not None:
            ids = ids[self.attention_mask[row].bool()]
        return tuple(ids.tolist())


class LogProbCapture(Capture):
    """A :class:`~knowtrace.capture.Capture` keeping a :class:`Forward` per forward of ``model`` made
    with labels; ``read()`` returns them. ``attention``: an
    :class:`~knowtrace.mllm_attention.AttentionCapture` whose maps are recorded during the very forward
    while it is attached; ``sae``: likewise a :class:`~knowtrace.sae_capture.SAEActCapture`."""

    def __init__(self, model: torch.nn.Module, attention=None, sae=None):
        super().__init__(model)
        self.attention = attention
        self.sae = sae
        self._forwards: list[Forward] = []

    def _install(self) -> None:
        self._handles = [self.model.register_forward_pre_hook(self._begin, with_kwargs=True),
                         self.model.register_forward_hook(self._end, with_kwargs=True)]

    def read(self) -> list[Forward]:
        forwards, self._forwards = self._forwards, []
        return forwards

    @contextmanager
    def separately(self):
        """Forwards inside the block go to the list this yields, not to what ``read`` returns (probes
        run between training steps without mixing with the step's own forwards)."""
        kept, self._forwards = self._forwards, []
        try:
            yield self._forwards
        finally:
            self._forwards = kept

    def _begin(self, module, args, kwargs):
        labels = kwargs.get("labels")
        if self.attention is not None and self.attention.attached and labels is not None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                raise ValueError("attention capture needs input_ids (image positions are found from them)")
            self.attention.begin(input_ids, labels, kwargs.get("image_grid_thw"), kwargs.get("aspect_ratio_ids"))
        if self.sae is not None and self.sae.attached and labels is not None:
            self.sae.begin(labels)

    def _end(self, module, args, kwargs, output):
        labels = kwargs.get("labels")
        logits = getattr(output, "logits", None)
        maps = self.attention.read() if self.attention is not None and self.attention.recording else None
        sae_acts = self.sae.read() if self.sae is not None and self.sae.recording else None
        if labels is not None and logits is not None:
            # keep the log-probs only (batch, seq), not the logits: computed now, chunked and detached
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            logp = token_logprobs(logits.detach(), labels)
            # to the host in one transfer: matching rows and writing the trace then read no device memory
            self._forwards.append(Forward(*host_copies([logp, labels, input_ids, kwargs.get("attention_mask")]), maps,
                                          sae_acts))
