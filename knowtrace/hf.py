"""knowtrace as a Hugging Face ``TrainerCallback``.

The tracer's forward hook captures every forward the Trainer makes with labels; ``on_step_end`` writes
them as one step, ``step = state.global_step`` (with gradient accumulation, all micro-batches of the
step). The Trainer does not say which items a batch holds, so rows are matched to traced samples by
their tokens (give ``TracedSample.input_ids`` when two samples share an answer). Enter the tracer
around training, so that hooks are removed even if it fails::

    with knowtrace.trace(model, "trace.zarr", samples) as tracer:
        Trainer(model=model, ..., callbacks=[KnowtraceCallback(tracer)]).train()

With several processes only the main one writes; the others drop their captures.
"""

from __future__ import annotations

from transformers import TrainerCallback

from .tracer import MLLMTracer


class KnowtraceCallback(TrainerCallback):
    def __init__(self, tracer: MLLMTracer):
        if not isinstance(tracer, MLLMTracer):
            raise TypeError(f"KnowtraceCallback takes an MLLMTracer (knowtrace.trace(...)), got {type(tracer).__name__}")
        self.tracer = tracer

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.tracer.attached:
            raise RuntimeError("the tracer is not attached: run training inside `with tracer:` (or "
                               "`with knowtrace.trace(...) as tracer:`) so its hooks are removed after it")

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.tracer.record(state.global_step)
        else:
            self.tracer.clear()
