"""Tracing per-token log-probs, K_C / K_N and cross-attention of a training run, from the forwards its
steps already make.

A forward hook on the model keeps, for every forward call made with labels during a step, the
per-token log-probs (gather - logsumexp, chunked, detached; no extra forward pass), the labels and
input ids, and, when attention is traced, the maps :mod:`knowtrace.mllm_attention` recorded during
that very forward. At the end of the step the rows that are traced samples are written to the Zarr
trace (:mod:`knowtrace.schema`) with K_C / K_N.

Three ways to drive it, one tracer:

* context manager: ``with knowtrace.trace(model, path, samples) as tr:`` then ``tr.record(step,
  sample_ids)`` after each step. Hooks are removed and the original attention implementation is
  restored on exit, also after an exception; attaching two tracers to one model is an error;
* callback of the unlearn loop: ``run_loop(..., callbacks=[tr])`` (``on_step_end(step, logs, state)``
  with ``state.batch`` the step's records, ``logs`` its losses);
* HF ``Trainer``: :class:`knowtrace.hf.KnowtraceCallback` (rows matched to samples by their tokens).

Probe mode (:mod:`knowtrace.probe`): every k steps a fixed probe set runs under inference mode into
the trace's ``probe`` group.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .knowledge import mllm_knowledge
from .logprobs import IGNORE_INDEX, token_logprobs
from .mllm_attention import AttentionCapture, AttentionOptions, stack_layers
from .store import TraceStore, index_samples, pad_ragged

_ATTACHED = "_knowtrace_attached"


@dataclass
class TracedSample:
    """One traced answer: its id, answer token ids and strings, and which tokens are the concept's.

    ``input_ids``: the sample's full (unpadded) model input ids; optional, used to tell samples with
    the same answer apart when rows are matched by content (HF Trainer)."""

    id: str
    token_ids: Sequence[int]
    token_strs: Sequence[str]
    is_concept: Sequence[bool]
    concept: str = ""
    input_ids: Sequence[int] | None = None


@dataclass
class _Call:
    """One captured forward: per-row log-probs, labels, input ids and attention maps (or None)."""

    logp: torch.Tensor  # (batch, seq) float32, NaN where unscored
    labels: torch.Tensor  # (batch, seq)
    input_ids: torch.Tensor | None  # (batch, seq)
    attention_mask: torch.Tensor | None  # (batch, seq)
    maps: list[dict[int, torch.Tensor]] | None  # per row: layer -> (heads, n_answer, gy, gx)

    def answer(self, row: int) -> list[int]:
        return self.labels[row][self.labels[row] != IGNORE_INDEX].tolist()

    def key(self, row: int) -> tuple[int, ...] | None:
        if self.input_ids is None:
            return None
        ids = self.input_ids[row]
        if self.attention_mask is not None:
            ids = ids[self.attention_mask[row].bool()]
        return tuple(ids.tolist())


class SampleTrace:
    """The store of one sample set (the traced samples, or a probe set): static coords once, then
    one slice per step built from matched rows of captured forwards."""

    def __init__(self, path, samples: Sequence[TracedSample], attrs: dict | None, float_dtype: str,
                 attention: AttentionCapture | None = None, n_heads: int = 0, flush_seconds: float = 0.0):
        self.samples = list(samples)
        self.index = index_samples(self.samples)
        self.attention, self.n_heads = attention, n_heads
        static = {
            "sample_id": np.array([s.id for s in self.samples]),
            "token_id": pad_ragged([s.token_ids for s in self.samples], -1, dtype=np.int64),
            "token_str": pad_ragged([list(s.token_strs) for s in self.samples], "", dtype=object).astype(str),
            "is_concept": pad_ragged([list(map(bool, s.is_concept)) for s in self.samples], False, dtype=bool),
            "concept": np.array([s.concept for s in self.samples]),
        }
        if attention is not None:
            static["layer"] = np.array(attention.layers, dtype=np.int64)
        self.width = static["token_id"].shape[1]
        self._concept = torch.from_numpy(static["is_concept"])
        self.store = TraceStore(path, static=static, attrs=attrs, float_dtype=float_dtype, flush_seconds=flush_seconds)

    def write(self, step: int, rows: Sequence[tuple[int, _Call, int]], losses: dict | None = None) -> None:
        """Append ``step`` from ``rows`` = (sample index, call, batch row); other samples are NaN."""
        n = len(self.samples)
        logprob = np.full((n, self.width), np.nan, dtype=np.float32)
        head = None
        if self.attention is not None:
            if self.attention.grid is None:
                raise ValueError("the patch grid is not known yet (no image was recorded): pass "
                                 "AttentionOptions(grid=(y, x))")
            shape = (n, len(self.attention.layers), self.n_heads, self.width, *self.attention.grid)
            head = np.full(shape, np.nan, dtype=np.float32)
        for si, call, r in rows:
            values = call.logp[r][call.labels[r] != IGNORE_INDEX]
            logprob[si, : len(values)] = values.cpu().numpy()
            if head is not None and call.maps is not None and call.maps[r]:
                m = stack_layers(call.maps[r], self.attention.layers).numpy()  # (layer, heads, n_answer, gy, gx)
                head[si, :, : m.shape[1], : m.shape[2]] = m
        k_c, k_n = mllm_knowledge(torch.from_numpy(logprob), self._concept)
        unseen = np.isnan(logprob).all(1)  # samples not in this step: K is NaN, not an empty sum
        values = {"logprob": logprob, "K_C": np.where(unseen, np.nan, k_c.numpy()),
                  "K_N": np.where(unseen, np.nan, k_n.numpy())}
        for key in ("loss_forget", "loss_retain"):
            values[key] = np.float32((losses or {}).get(key, np.nan))
        if head is not None:
            with warnings.catch_warnings():  # all-NaN slices (samples not in this step) stay NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                values["xattn"] = np.nanmean(head, axis=2) if self.n_heads > 1 else head[:, :, 0]
            if self.attention.options.heads == "all":
                values["xattn_head"] = head
        self.store.append(step, **values)


class MLLMTracer:
    """Per-step token log-probs, K_C / K_N and (optionally) cross-attention of ``samples``.

    ``attention``: :class:`~knowtrace.mllm_attention.AttentionOptions` (None: no attention);
    ``probes``: a :class:`~knowtrace.probe.ProbeSet` run every ``probes.every`` steps;
    ``flush_seconds``: steps are buffered and written at most this often (and on exit, also after an
    exception; see :class:`~knowtrace.store.TraceStore`); 0 writes every step at once.
    """

    def __init__(self, model: torch.nn.Module, path: str | os.PathLike, samples: Sequence[TracedSample],
                 attrs: dict | None = None, float_dtype: str = "float16", attention: AttentionOptions | None = None,
                 probes=None, flush_seconds: float = 5.0):
        self.model = model
        self.attention = AttentionCapture(model, attention) if attention is not None else None
        n_heads = 0
        if self.attention is not None:
            n_heads = 1 if attention.heads == "mean" else self.attention.config.num_attention_heads
        on_steps = self.attention if attention is not None and attention.on_steps else None
        self.trace = SampleTrace(path, samples, attrs, float_dtype, on_steps, n_heads, flush_seconds)
        self.samples, self.index, self.store = self.trace.samples, self.trace.index, self.trace.store
        self.probe = None
        if probes is not None:
            from .probe import ProbeRunner  # probe mode builds on this module

            self.probe = ProbeRunner(self, probes, Path(path), attrs, float_dtype, n_heads, flush_seconds)
        self._calls: list[_Call] = []
        self._handles = []
        self._recording_attention = False
        self._warned = False

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # ------------------------------------------------------------------ hooks
    def __enter__(self):
        if getattr(self.model, _ATTACHED, False):
            raise RuntimeError("a knowtrace tracer is already attached to this model; exit it first")
        self._attach()
        return self

    def __exit__(self, *exc):
        self._detach()
        self._calls.clear()
        self.flush()
        return False

    def _attach(self):
        try:
            if self.attention is not None:
                self.attention.__enter__()
                self.attention.switch(self.attention.options.on_steps)  # probes only: switched in per probe
            self._handles = [self.model.register_forward_pre_hook(self._begin, with_kwargs=True),
                             self.model.register_forward_hook(self._capture, with_kwargs=True)]
            setattr(self.model, _ATTACHED, True)
        except BaseException:
            self._detach()
            raise

    def _detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.attention is not None:
            self.attention.__exit__(None, None, None)
        if getattr(self.model, _ATTACHED, False):
            setattr(self.model, _ATTACHED, False)

    @contextmanager
    def paused(self):
        """Detach hooks and the attention function for a while (forwards inside are not traced, e.g.
        an evaluation); re-attached afterwards, buffered steps kept."""
        if not self.attached:
            raise RuntimeError("the tracer is not attached; pause it inside its `with` block")
        self._detach()
        try:
            yield self
        finally:
            self._attach()

    def flush(self) -> None:
        """Write buffered steps now (the main trace first: the probe group lives inside its store)."""
        self.store.flush()
        if self.probe is not None:
            self.probe.trace.store.flush()

    def _begin(self, module, args, kwargs):
        labels = kwargs.get("labels")
        wanted = self.attention is not None and (self._recording_attention or self.attention.options.on_steps)
        if wanted and labels is not None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                raise ValueError("attention capture needs input_ids (image positions are found from them)")
            self.attention.begin(input_ids, labels, kwargs.get("image_grid_thw"))

    def _capture(self, module, args, kwargs, output):
        labels = kwargs.get("labels")
        logits = getattr(output, "logits", None)
        maps = self.attention.end() if self.attention is not None and self.attention.recording else None
        if labels is not None and logits is not None:
            # keep the log-probs only (batch, seq), not the logits: computed now, chunked and detached
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            self._calls.append(_Call(token_logprobs(logits.detach(), labels), labels.detach(),
                                     None if input_ids is None else input_ids.detach(),
                                     None if mask is None else mask.detach(), maps))

    # ------------------------------------------------------------------ steps
    def _match(self, sample_ids: Sequence[str]):
        """The captured call whose rows are these samples' answers (same labelled token ids)."""
        want = [list(self.samples[self.index[i]].token_ids) for i in sample_ids]
        for call in self._calls:
            if call.labels.shape[0] == len(want) and [call.answer(r) for r in range(len(want))] == want:
                return call
        return None

    def _match_rows(self, calls: Sequence[_Call]) -> list[tuple[int, _Call, int]]:
        """Every row of every call that is exactly one traced sample (by input ids when the samples
        carry them, else by answer tokens); rows matching several samples are skipped, with a warning."""
        by_key: dict[tuple, list[int]] = {}
        for i, s in enumerate(self.samples):
            key = ("in", tuple(s.input_ids)) if s.input_ids is not None else ("ans", tuple(s.token_ids))
            by_key.setdefault(key, []).append(i)
        rows = []
        for call in calls:
            for r in range(call.labels.shape[0]):
                key = call.key(r)
                hits = by_key.get(("in", key), []) if key is not None else []
                hits = hits or by_key.get(("ans", tuple(call.answer(r))), [])
                if len(hits) == 1:
                    rows.append((hits[0], call, r))
                elif len(hits) > 1 and not self._warned:
                    self._warned = True
                    warnings.warn(f"a batch row matches {len(hits)} traced samples with the same tokens; it is not "
                                  f"recorded. Give TracedSample.input_ids (or distinct answers) to tell them apart")
        return rows

    def record(self, step: int, sample_ids: Sequence[str] | None = None, losses: dict | None = None) -> bool:
        """Append step ``step``; False if no captured forward held the step's samples.

        ``sample_ids``: the step's batch in row order (the call whose label rows are exactly these
        samples' answers is used); None: every captured row that is a traced sample (matched by
        tokens). Runs the probes afterwards when they are due."""
        if sample_ids is not None:
            unknown = [i for i in sample_ids if i not in self.index]
            if unknown:
                raise KeyError(f"samples {unknown} are not traced; traced: {list(self.index)[:10]}...")
            call = self._match(sample_ids)
            rows = [] if call is None else [(self.index[s], call, r) for r, s in enumerate(sample_ids)]
        else:
            rows = self._match_rows(self._calls)
        self._calls.clear()
        self.trace.write(step, rows, losses)
        if self.probe is not None:
            self.probe.maybe_run(step)
        return bool(rows)

    def clear(self) -> None:
        """Forget this step's captured forwards without writing (e.g. on non-main processes)."""
        self._calls.clear()

    def on_step_end(self, step: int, logs: dict, state) -> None:
        """Callback of the unlearn loop: ``state.batch`` holds the step's records (with ``.id``)."""
        self.record(step, [r.id for r in state.batch], logs)


def trace(model: torch.nn.Module, path: str | os.PathLike, samples: Sequence[TracedSample], *,
          attention: AttentionOptions | bool | None = None, probes=None, attrs: dict | None = None,
          float_dtype: str = "float16", flush_seconds: float = 5.0) -> MLLMTracer:
    """A tracer to use as a context manager: ``with knowtrace.trace(model, path, samples) as tr: ...``.

    ``attention=True`` records the last layer's head-mean maps; pass AttentionOptions for more."""
    if attention is True:
        attention = AttentionOptions()
    return MLLMTracer(model, path, samples, attrs=attrs, float_dtype=float_dtype, attention=attention or None,
                      probes=probes, flush_seconds=flush_seconds)
