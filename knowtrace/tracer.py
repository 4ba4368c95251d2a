"""Tracing per-token log-probs and K_C / K_N of a training run, from the logits its steps compute.

A forward hook on the model keeps the logits and labels of every forward call made with labels
during a step (detached; no extra forward pass). At the end of the step, the call whose label rows
are the traced samples' answers is turned into per-token log-probs (gather - logsumexp, chunked),
aligned to the samples, reduced to K_C / K_N and appended to the Zarr trace.

Use it as a context manager (hooks removed on exit, also after an exception; attaching twice to
one model is an error) and call :meth:`MLLMTracer.record` after each step, or hand it to a loop as
a callback (``on_step_end``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .knowledge import mllm_knowledge
from .logprobs import IGNORE_INDEX, token_logprobs
from .store import TraceStore, pad_ragged

_ATTACHED = "_knowtrace_attached"


@dataclass
class TracedSample:
    """One traced answer: its id, answer token ids and strings, and which tokens are the concept's."""

    id: str
    token_ids: Sequence[int]
    token_strs: Sequence[str]
    is_concept: Sequence[bool]
    concept: str = ""


class MLLMTracer:
    def __init__(self, model: torch.nn.Module, path, samples: Sequence[TracedSample], attrs: dict | None = None,
                 float_dtype: str = "float16"):
        if not samples:
            raise ValueError("nothing to trace: give at least one sample")
        self.model, self.samples = model, list(samples)
        self.index = {s.id: i for i, s in enumerate(self.samples)}
        if len(self.index) != len(self.samples):
            raise ValueError("traced sample ids must be unique")
        static = {
            "token_id": pad_ragged([s.token_ids for s in self.samples], -1, dtype=np.int64),
            "token_str": pad_ragged([list(s.token_strs) for s in self.samples], "", dtype=object).astype(str),
            "is_concept": pad_ragged([list(map(bool, s.is_concept)) for s in self.samples], False, dtype=bool),
            "concept": np.array([s.concept for s in self.samples]),
        }
        self.width = static["token_id"].shape[1]
        self.store = TraceStore(path, static=static, attrs=attrs, float_dtype=float_dtype)
        self._calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handle = None

    # ------------------------------------------------------------------ hooks
    def __enter__(self):
        if getattr(self.model, _ATTACHED, False):
            raise RuntimeError("a knowtrace tracer is already attached to this model; exit it first")
        self._handle = self.model.register_forward_hook(self._capture, with_kwargs=True)
        setattr(self.model, _ATTACHED, True)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        setattr(self.model, _ATTACHED, False)
        self._calls.clear()
        return False

    def _capture(self, module, args, kwargs, output):
        labels = kwargs.get("labels")
        logits = getattr(output, "logits", None)
        if labels is not None and logits is not None:
            # keep the log-probs only (batch, seq), not the logits: computed now, chunked and detached
            self._calls.append((token_logprobs(logits.detach(), labels), labels.detach()))

    # ------------------------------------------------------------------ steps
    def _match(self, sample_ids: Sequence[str]):
        """The captured call whose rows are these samples' answers (same labelled token ids)."""
        want = [list(self.samples[self.index[i]].token_ids) for i in sample_ids]
        for logp, labels in self._calls:
            if labels.shape[0] != len(want):
                continue
            rows = [labels[r][labels[r] != IGNORE_INDEX].tolist() for r in range(labels.shape[0])]
            if rows == want:
                return logp, labels
        return None

    def record(self, step: int, sample_ids: Sequence[str], losses: dict | None = None) -> bool:
        """Append step ``step`` for the samples of this step's batch; False if no forward matched."""
        unknown = [i for i in sample_ids if i not in self.index]
        if unknown:
            raise KeyError(f"samples {unknown} are not traced; traced: {list(self.index)[:10]}...")
        logprob = np.full((len(self.samples), self.width), np.nan, dtype=np.float32)
        found = self._match(sample_ids)
        self._calls.clear()
        if found is not None:
            logp, labels = found
            for row, sid in enumerate(sample_ids):
                values = logp[row][labels[row] != IGNORE_INDEX]
                logprob[self.index[sid], : len(values)] = values.cpu().numpy()
        concept = torch.tensor(pad_ragged([list(map(bool, s.is_concept)) for s in self.samples], False, dtype=bool))
        lp = torch.from_numpy(logprob)
        k_c, k_n = mllm_knowledge(lp, concept)
        seen = ~torch.isnan(lp).all(1)
        k_c, k_n = torch.where(seen, k_c, torch.nan), torch.where(seen, k_n, torch.nan)
        values = {"logprob": logprob, "K_C": k_c.numpy(), "K_N": k_n.numpy()}
        for key in ("loss_forget", "loss_retain"):
            values[key] = np.float32((losses or {}).get(key, np.nan))
        self.store.append(step, **values)
        return found is not None

    def on_step_end(self, step: int, logs: dict, state) -> None:
        """Callback of the unlearn loop: ``state.batch`` holds the step's records (with ``.id``)."""
        self.record(step, [r.id for r in state.batch], logs)
