"""Tracing per-token log-probs, K_C / K_N and cross-attention of a training run, from the forwards its
steps already make (no extra forward pass).

A forward hook (:class:`~knowtrace.logprobs.LogProbCapture`) keeps, for every forward with labels
during a step, the detached per-token log-probs, labels, input ids and, when attention is traced, the
maps :mod:`knowtrace.mllm_attention` recorded in that forward. At the end of the step the rows of
traced samples are written to the Zarr trace (:mod:`knowtrace.schema`) with K_C / K_N. Drive it as

* a context manager: ``with knowtrace.trace(model, path, samples) as tr:`` then ``tr.record(step,
  sample_ids)`` after each step (hooks removed on exit, also after an exception);
* a callback of the unlearn loop (``on_step_end(step, logs, state)``, ``state.batch`` the records);
* an HF ``Trainer`` callback: :class:`knowtrace.hf.KnowtraceCallback`.

Probes (:mod:`knowtrace.probe`, ``trace(..., probes=)``) run every k steps into the ``probe`` group;
the probe knows nothing of the tracer (the import goes one way, tracer -> probe).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from .answers import SampleTrace, TracedSample
from .attribution import AttributionOptions, ImageAttribution
from .logprobs import Forward, LogProbCapture
from .mllm_attention import AttentionCapture, AttentionOptions
from .probe import ProbeRunner, ProbeSet
from .sae_capture import SAEActCapture, SAEOptions
from .schema import PROBE_GROUP

__all__ = ["MLLMTracer", "TracedSample", "trace"]


class MLLMTracer:
    """Per-step token log-probs, K_C / K_N and (optionally) cross-attention of ``samples``.

    ``attention``: :class:`~knowtrace.mllm_attention.AttentionOptions` (None: none); ``probes``: a
    :class:`~knowtrace.probe.ProbeSet`; ``map_dtype``: storage type of the attention maps; steps are
    buffered and written at most every ``flush_seconds`` (0: at once; always on exit); ``sae``:
    :class:`~knowtrace.sae_capture.SAEOptions`, whose features' activations the probes record (``sae_act``);
    ``attribution``: :class:`~knowtrace.attribution.AttributionOptions`, integrated-gradients maps the probes
    record (``attr``, ``attr_delta``).
    """

    def __init__(self, model: torch.nn.Module, path: str | os.PathLike, samples: Sequence[TracedSample],
                 attrs: dict | None = None, map_dtype: str = "float32", attention: AttentionOptions | None = None,
                 probes: ProbeSet | None = None, flush_seconds: float = 5.0, sae: SAEOptions | None = None,
                 attribution: AttributionOptions | None = None):
        if sae is not None and probes is None:
            raise ValueError("sae_act is recorded by the probes (probe mode): give probes= with sae=")
        attributor = None if attribution is None else self._attributor(model, attribution, probes)
        self.model = model
        self.attention = AttentionCapture(model, attention) if attention is not None else None
        self.sae = SAEActCapture(model, sae) if sae is not None else None  # attached for the probes alone
        self.forwards = LogProbCapture(model, self.attention, self.sae)
        # attached with the tracer: the log-prob hook, and the attention function when steps record it
        # (else the probe attaches it for its own forwards only)
        on_steps = self.attention if attention is not None and attention.on_steps else None
        self._captures = [c for c in (self.forwards, on_steps) if c is not None]
        self.trace = SampleTrace(path, samples, attrs, map_dtype, on_steps, flush_seconds)
        self.samples, self.index, self.store = self.trace.samples, self.trace.index, self.trace.store
        self.probe = None
        if probes is not None:
            grid = None if attributor is None else attributor.grid(probes.batches)
            probe_trace = SampleTrace(Path(path) / PROBE_GROUP, probes.samples, attrs, map_dtype, self.attention,
                                      flush_seconds, self.sae, grid)
            self.probe = ProbeRunner(probes, probe_trace, self.forwards, attributor)
        self._warned = False

    @staticmethod
    def _attributor(model, options: AttributionOptions, probes: ProbeSet | None) -> ImageAttribution:
        """The probes' attribution, checked against them before anything is written."""
        if probes is None:
            raise ValueError("attr is recorded by the probes (probe mode): give probes= with attribution=")
        if options.every is not None and options.every % probes.every:
            raise ValueError(f"attribution every={options.every} must be a multiple of the probes' every="
                             f"{probes.every} (attribution runs at probe steps)")
        attributor = ImageAttribution(model, options)
        attributor.check_tokens([len(s.token_ids) for s in probes.samples], [s.id for s in probes.samples])
        return attributor

    @property
    def attached(self) -> bool:
        return self.forwards.attached

    # ------------------------------------------------------------------ hooks
    def __enter__(self):
        self._attach()
        return self

    def __exit__(self, *exc):
        self._detach()
        self.forwards.read()  # captured forwards of an unrecorded step are dropped
        self.flush()
        return False

    def _attach(self):
        try:
            for capture in self._captures:
                capture.attach()
        except BaseException:
            self._detach()
            raise

    def _detach(self):
        for capture in reversed(self._captures):
            capture.detach()

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

    # ------------------------------------------------------------------ steps
    def _match(self, sample_ids: Sequence[str], forwards: Sequence[Forward]):
        """The captured call whose rows are these samples' answers (same labelled token ids)."""
        want = [list(self.samples[self.index[i]].token_ids) for i in sample_ids]
        for call in forwards:
            if call.labels.shape[0] == len(want) and [call.answer(r) for r in range(len(want))] == want:
                return call
        return None

    def _match_rows(self, calls: Sequence[Forward]) -> list[tuple[int, Forward, int]]:
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
        unknown = [i for i in sample_ids or () if i not in self.index]
        if unknown:
            raise KeyError(f"samples {unknown} are not traced; traced: {list(self.index)[:10]}...")
        forwards = self.forwards.read()
        if sample_ids is not None:
            call = self._match(sample_ids, forwards)
            rows = [] if call is None else [(self.index[s], call, r) for r, s in enumerate(sample_ids)]
        else:
            rows = self._match_rows(forwards)
        self.trace.write(step, rows, losses)
        if self.probe is not None and step % self.probe.probes.every == 0:
            self.probe.run(step)
        return bool(rows)

    def clear(self) -> None:
        """Forget this step's captured forwards without writing (e.g. on non-main processes)."""
        self.forwards.read()

    def on_step_end(self, step: int, logs: dict, state) -> None:
        """Callback of the unlearn loop: ``state.batch`` holds the step's records (with ``.id``)."""
        self.record(step, [r.id for r in state.batch], logs)


def trace(model: torch.nn.Module, path: str | os.PathLike, samples: Sequence[TracedSample], *,
          attention: AttentionOptions | bool | None = None, probes: ProbeSet | None = None,
          attrs: dict | None = None, map_dtype: str = "float32", flush_seconds: float = 5.0,
          sae: SAEOptions | None = None, attribution: AttributionOptions | None = None) -> MLLMTracer:
    """A tracer to use as a context manager: ``with knowtrace.trace(model, path, samples) as tr: ...``.

    ``attention=True`` records the last layer's head-mean maps; pass AttentionOptions for more; ``sae``:
    SAE feature activations in probe mode (SAEOptions); ``attribution``: integrated-gradients maps of answer
    tokens over the image patches in probe mode (AttributionOptions)."""
    if attention is True:
        attention = AttentionOptions()
    return MLLMTracer(model, path, samples, attrs=attrs, map_dtype=map_dtype, attention=attention or None,
                      probes=probes, flush_seconds=flush_seconds, sae=sae, attribution=attribution)
