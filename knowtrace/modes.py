"""Evaluation mode for a probe, by the modules' flags.

``model.eval()`` then restoring every module's previous flag walks the module tree through
``train()`` twice: on a small model as costly as the probe's bookkeeping should be (about 1 ms on the
world MLLM, 3 ms on the world SD UNet). :func:`eval_mode` flips only the modules that are in training
mode, and flips back exactly those, also after an exception. The ``train()`` overrides of transformers
and peft are not called: they only refresh caches that training mode refreshes anyway.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout and similar off inside the block; each module's own train/eval flag restored after."""
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield model
    finally:
        for m in training:
            m.training = True
