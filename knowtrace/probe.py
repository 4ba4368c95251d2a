"""Probe mode: every k training steps a fixed probe set runs through the model being trained under
``torch.inference_mode()`` and ``eval()`` (each module's flag restored after), into the ``probe`` group
of the same trace (``<trace>/probe``, same schema; ``step`` = the training step after which it ran).
Unlike the step trace, which sees only each step's batch, every probe sample is measured at every probe
step on the same inputs: a clean trajectory at a k-fold lower cost.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import xarray as xr

from .modes import eval_mode
from .schema import PROBE_GROUP
from .store import open_trace

if TYPE_CHECKING:  # annotations only: open_probe_trace does not import transformers
    from .answers import SampleTrace, TracedSample
    from .logprobs import LogProbCapture


@dataclass
class ProbeSet:
    """``batches``: model inputs with ``labels`` (tensors; moved to the model's device when run);
    ``samples``: one TracedSample per batch row, in order over all batches; ``every``: run after
    every step with ``step % every == 0``; ``precision``: a function returning the context the probe
    forwards run in, e.g. the training steps' autocast (a probe then measures the model as the steps
    compute it, at their cost)."""

    batches: Sequence[dict]
    samples: Sequence[TracedSample]
    every: int = 10
    precision: Callable[[], AbstractContextManager] = nullcontext

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"probe every must be >= 1 step, got {self.every}")
        rows = sum(int(b["labels"].shape[0]) if "labels" in b else -10**9 for b in self.batches)
        if rows < 0:
            raise ValueError("every probe batch needs labels (the answer tokens to score)")
        if rows != len(self.samples):
            raise ValueError(f"the probe batches have {rows} rows but {len(self.samples)} probe samples were given; "
                             f"give one sample per row, in order")


class ProbeRunner:
    """Runs a :class:`ProbeSet` through the model ``forwards`` is attached to and writes it to ``trace``.

    The probe forwards are captured apart from the training step's (:meth:`LogProbCapture.separately`);
    the forwards' attention capture, when training steps do not attach it, is attached for the probe
    alone (training forwards keep the original attention function and pay nothing for it). ``attribution``:
    a :class:`~knowtrace.attribution.ImageAttribution` run on the probe batches at the probe steps its
    options' ``every`` divides (gradients: outside inference mode, in eval mode and the probes' precision)."""

    def __init__(self, probes: ProbeSet, trace: SampleTrace, forwards: LogProbCapture, attribution=None):
        self.probes, self.trace, self.forwards, self.attribution = probes, trace, forwards, attribution

    def run(self, step: int) -> None:
        model = self.forwards.model
        device = next(model.parameters()).device
        # the probe batches on the model's device, once for the probe forwards and the attribution
        batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                   for batch in self.probes.batches]
        with ExitStack() as stack:
            for capture in (self.forwards.attention, self.forwards.sae):  # those attached for probes alone
                if capture is not None and not capture.attached:
                    stack.enter_context(capture)
            calls = stack.enter_context(self.forwards.separately())
            stack.enter_context(eval_mode(model))
            stack.enter_context(torch.inference_mode())
            stack.enter_context(self.probes.precision())
            for batch in batches:
                model(**batch)
        if len(calls) != len(self.probes.batches):
            raise RuntimeError(f"{len(self.probes.batches)} probe batches ran but {len(calls)} forwards were captured; "
                               f"is the tracer attached (inside its `with` block)?")
        if self.attribution is not None and step % (self.attribution.options.every or self.probes.every) == 0:
            for call, batch in zip(calls, batches):
                call.attr = self.attribution.attribute(batch, self.probes.precision)
        rows, i = [], 0
        for call in calls:
            for r in range(call.labels.shape[0]):
                sample = self.probes.samples[i]
                if call.answer(r) != list(sample.token_ids):
                    raise ValueError(f"probe sample {sample.id!r}: its answer tokens differ from row {r} of its batch's "
                                     f"labels; give the samples in the order of the batch rows")
                rows.append((i, call, r))
                i += 1
        self.trace.write(step, rows)


def open_probe_trace(path: str | os.PathLike) -> xr.Dataset:
    """The probe group of a trace, lazily, attrs decoded (like :func:`knowtrace.store.open_trace`)."""
    probe = Path(path) / PROBE_GROUP
    if not probe.exists():
        raise FileNotFoundError(f"{path} has no probe group: it was traced without a ProbeSet")
    return open_trace(probe)
