"""What the SD attacks ask every model the same way: how often does it draw the concept? ``drawn`` = the
share of generated images the run's UA classifier labels as the concept (100 - UA, the run's own
measure), each image from one (prompt, seed) pair, sampled as the run's evaluation samples."""

from __future__ import annotations

import numpy as np

from ..eval.sd import ua_labels


def drawn(adapter, prompts: list[str], seeds, data, guidance_scale: float | None = None,
          inference_steps: int | None = None) -> float:
    """% of the images of every (prompt, seed) pair (prompt-major) labelled as the concept ``data.label``."""
    return float(np.mean(drawn_flags(adapter, prompts, seeds, data, guidance_scale, inference_steps)) * 100.0)


def drawn_flags(adapter, prompts: list[str], seeds, data, guidance_scale: float | None = None,
                inference_steps: int | None = None) -> np.ndarray:
    """Per (prompt, seed) pair (prompt-major): whether its image is labelled as the concept. bool (P * S,)."""
    from knowtrace.modes import eval_mode

    with eval_mode(adapter.model):
        _, labels = ua_labels(adapter.pipe, list(prompts), list(seeds), data.classifier, data.label,
                              data.guidance_scale if guidance_scale is None else guidance_scale,
                              data.inference_steps if inference_steps is None else inference_steps)
    return np.array([label == data.label for label in labels])

