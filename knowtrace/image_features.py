"""Reusing a multimodal model's image-encoder output across forwards of the same images.

Integrated gradients runs the model on many copies of one batch (the path's points); the images, and so the
vision tower's and projector's output, are the same in every copy, and no gradient is wanted there. transformers
5 lets a model take that output instead of ``pixel_values`` (``mm_encoder_outputs={"image": ...}``, the value
``get_image_features`` returns; LLaVA, Qwen2-VL and most image-text-to-text families). :class:`ImageFeatureReuse`
records that value in one forward and gives it back, tiled to ``k`` copies of the batch, to later forwards.

Tiling must follow what each field of the encoder output holds; the fields whose layout is known are tiled, and
an output with any other field is not reused (the forwards then run the encoder as before): a wrong tiling would
be silent.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch

# How each known field of ``get_image_features``' output is laid out, so that k copies of the batch get k copies of
# their images in batch order (copy 0's images, then copy 1's, ...).
PER_IMAGE = ("pooler_output",)  # a sequence with one tensor per image (forwards concatenate it)
PER_LAYER = ("hidden_states", "attentions", "deepstack_features")  # a sequence over layers, each as PER_IMAGE or ONE_TENSOR
ONE_TENSOR = ("last_hidden_state",)  # (images | patches, ...)
KNOWN = set(PER_IMAGE + PER_LAYER + ONE_TENSOR)


def _tile_images(x, k: int):
    """k copies, in batch order, of ``x``: a (images | patches, ...) tensor, or a sequence of one tensor per image
    (None: a layer an output leaves out, e.g. ``hidden_states[0]``)."""
    if x is None or k == 1:
        return x
    return tuple(x) * k if isinstance(x, (list, tuple)) else torch.cat([x] * k)


def _tile_field(name: str, value, k: int):
    if name in PER_LAYER:  # each layer's entry: a tensor, or one tensor per image (Qwen3-VL's deepstack features)
        return value if value is None or k == 1 else tuple(_tile_images(v, k) for v in value)
    return _tile_images(value, k)  # PER_IMAGE, ONE_TENSOR


def _tileable(name: str, value) -> bool:
    """Whether ``value`` has the layout :func:`_tile_field` knows for ``name`` (else a wrong tiling would be silent)."""
    def images(x):
        return x is None or torch.is_tensor(x) or (isinstance(x, (list, tuple)) and all(torch.is_tensor(t) for t in x))

    if value is None:
        return True
    if name in PER_LAYER:
        return isinstance(value, (list, tuple)) and all(images(v) for v in value)
    return name in KNOWN and images(value)


def _encoder_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module whose forward calls ``get_image_features`` and accepts ``mm_encoder_outputs`` (the base model under
    a ``...ForConditionalGeneration``), or None."""
    if "mm_encoder_outputs" not in inspect.signature(type(model).forward).parameters:
        return None
    for module in (getattr(model, "model", None), model):
        if module is not None and callable(getattr(module, "get_image_features", None)) and \
                "mm_encoder_outputs" in inspect.signature(type(module).forward).parameters:
            return module
    return None


class ImageFeatureReuse:
    """Records the image encoder's output of one forward of a batch (:meth:`recording`) and returns model inputs
    for ``k`` copies of that batch that use it instead of ``pixel_values`` (:meth:`inputs`). ``available``: the
    model supports it and the batch has images and no videos; ``ready``: an output was recorded and its layout is
    known."""

    def __init__(self, model: torch.nn.Module, inputs: dict):
        self.module = _encoder_module(model)
        self.available = (self.module is not None and inputs.get("pixel_values") is not None
                          and inputs.get("pixel_values_videos") is None)
        self.output = None

    @property
    def ready(self) -> bool:
        return self.output is not None

    @contextmanager
    def recording(self):
        """A context in which the model's ``get_image_features`` calls are recorded (the first whose fields are all
        known is kept)."""
        if not self.available or self.ready:
            yield
            return
        original = self.module.get_image_features

        def record(*args, **kwargs):
            out = original(*args, **kwargs)
            fields = {name for name, value in out.items() if value is not None} if hasattr(out, "items") else set()
            if self.output is None and "pooler_output" in fields and fields <= KNOWN and \
                    all(_tileable(name, value) for name, value in out.items()):
                self.output = out
            return out

        self.module.get_image_features = record  # an instance attribute: shadows the method until the end
        try:
            yield
        finally:
            del self.module.get_image_features

    def inputs(self, inputs: dict, k: int) -> dict:
        """``inputs`` (already ``k`` copies of the recorded batch) with the recorded output in place of the
        pixels."""
        if not self.ready:
            return inputs
        out = self.output
        tiled = type(out)(**{name: _tile_field(name, value, k) for name, value in out.items()})
        return {**{key: v for key, v in inputs.items() if key != "pixel_values"}, "mm_encoder_outputs": {"image": tiled}}
