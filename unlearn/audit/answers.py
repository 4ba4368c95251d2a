"""What the attacks ask every model the same way: does its answer identify the concept (batched greedy
generation of short answers, judged as the run's EM judges them: :func:`unlearn.eval.mllm.forgotten`)."""

from __future__ import annotations

import numpy as np

from knowtrace.modes import eval_mode

from ..data.records import Record
from ..eval.mllm import forgotten


def pick(records: list[Record], n: int) -> list[Record]:
    """``n`` records evenly spread over ``records`` (all of them when ``n`` is 0 or at least their number):
    a cheap evaluation that still covers every question type the list holds in order."""
    if n <= 0 or n >= len(records):
        return list(records)
    return [records[i] for i in np.linspace(0, len(records) - 1, num=n).round().astype(int)]


def identifies(adapter, records: list[Record], names, max_new_tokens: int) -> list[bool]:
    """Per record: whether the model's greedy answer identifies the concept (the opposite of EM's "forgotten")."""
    with eval_mode(adapter.model):
        answers = adapter.generate(records, max_new_tokens)
    return [not forgotten(a, r, names) for a, r in zip(answers, records)]


def identification(flags) -> float:
    """Percentage of answers that identify the concept (100 - EM)."""
    return float(100.0 * np.mean(flags)) if len(flags) else float("nan")


def check_at_least(attack: str, values: dict, minimum: dict) -> None:
    """An attack's options (``values``: name -> value) against their least values; a clear error otherwise."""
    bad = [f"{attack}.{k}={values[k]} (must be >= {m})" for k, m in minimum.items() if not values[k] >= m]
    if bad:
        raise ValueError(f"invalid audit options: {', '.join(bad)}")
