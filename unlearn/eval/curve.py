"""Evaluation during training: the metrics after every k steps (for the token-count study and the
steps figures), as a callback of the unlearn loop."""

from __future__ import annotations

import contextlib

from .mllm import evaluate


class EvalEvery:
    """After steps k, 2k, ... and the last one, evaluate and keep ``{"step": n, **metrics}`` in ``rows``
    (``n`` = steps done). ``pause``: a context manager factory that detaches a tracer meanwhile, so
    evaluation forwards are not traced."""

    def __init__(self, adapter, evalset, names, every: int, total_steps: int, pause=None):
        if every < 1:
            raise ValueError(f"eval_every must be >= 1 step, got {every}")
        self.adapter, self.evalset, self.names = adapter, evalset, tuple(names)
        self.every, self.total, self.pause = every, total_steps, pause
        self.rows: list[dict] = []

    def on_step_end(self, step: int, logs: dict, state) -> None:
        done = step + 1
        if done % self.every and done != self.total:
            return
        with self.pause() if self.pause is not None else contextlib.nullcontext():
            metrics = evaluate(self.adapter, self.evalset, self.names)
        metrics.pop("samples")
        self.rows.append({"step": done, **metrics})

    def state_dict(self) -> dict:  # checkpointed with the run
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])
