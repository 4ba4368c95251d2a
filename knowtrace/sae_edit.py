"""Editing chosen features of a sparse autoencoder inside a model's residual stream, at inference.

A forward hook on the residual module of a decoder layer (:func:`knowtrace.sae_capture.residual_module`)
replaces the layer's output ``x`` (batch, seq, d) by the SAE's *edited* reconstruction plus the SAE's own
error::

    a = encode(x)                 (batch, seq, d_sae): TopK activations
    a' = a with the chosen features edited
    x' = decode(a') + (x - decode(a))  =  x + (a' - a)[..., S] @ W_dec[S]

It is computed in the second form, only over the chosen features ``S``: every feature that is not edited
(and every position where the edit changes nothing) passes through *exactly*, bit for bit, and no
(batch, seq, d_in) reconstruction is made. The edit applies at every position of every forward while the
hook is installed (prompt, image and generated tokens alike).

Interventions (``FeatureEdit.intervention``), applied where a chosen feature is active (``a_j > 0``; a
feature TopK did not keep is 0 and stays 0, so inputs on which the concept's features never fire are
untouched):

- ``clamp``: ``a'_j = value`` (0 removes the feature's contribution; a negative value pushes the residual
  away from its direction);
- ``scale``: ``a'_j = value * a_j`` (1 changes nothing, 0 is the same as clamping to 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .sae_capture import residual_module, text_config

# intervention name -> (active feature activations (..., n), value) -> edited activations (..., n)
INTERVENTIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "clamp": lambda acts, value: torch.full_like(acts, value),
    "scale": lambda acts, value: acts * value,
}


def check_intervention(intervention: str) -> None:
    if intervention not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {intervention!r}; interventions: {', '.join(INTERVENTIONS)}")


@dataclass(frozen=True)
class FeatureEdit:
    """Which features of ``sae`` (a :class:`knowtrace.sae.TopKSAE`) to edit, and how."""

    sae: torch.nn.Module
    features: tuple[int, ...]
    intervention: str = "clamp"
    value: float = 0.0

    def __post_init__(self):
        check_intervention(self.intervention)
        features = tuple(int(f) for f in self.features)
        d_sae = self.sae.W_enc.shape[1]
        bad = [f for f in features if not 0 <= f < d_sae]
        if bad or len(set(features)) != len(features):
            raise ValueError(f"features must be distinct indices in 0..{d_sae - 1} (the SAE's d_sae = {d_sae}), "
                             f"got {list(self.features)}")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "_index", {})  # device -> the features as an index tensor, made once per device

    def chosen(self, device: torch.device) -> torch.Tensor:
        if device not in self._index:  # one host-to-device copy, not one per forward
            with torch.inference_mode(False):  # a normal tensor even if made in inference mode: autograd may save it
                self._index[device] = torch.as_tensor(self.features, device=device)
        return self._index[device]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., d_in) with the chosen features edited (module docstring); ``x`` itself if none are.
        Differentiable in ``x`` (fine-tuning a model under the edit, e.g. a relearning attack, trains through it)."""
        if not self.features:
            return x
        sae = self.sae
        chosen = self.chosen(sae.W_enc.device)
        acts = sae.encode(x.to(sae.W_enc.device, sae.W_enc.dtype))[..., chosen]  # (..., n)
        active = acts > 0
        edited = torch.where(active, INTERVENTIONS[self.intervention](acts, self.value), acts)
        delta = (edited - acts) @ sae.W_dec[chosen]  # (..., d_in): zero where nothing changed
        return x + delta.to(x.device, x.dtype)


def install_feature_edit(model: torch.nn.Module, layer: int, edit: FeatureEdit) -> torch.utils.hooks.RemovableHandle:
    """Hook ``edit`` onto the residual stream of decoder layer ``layer`` of ``model`` (moving the SAE to the
    model's device); returns the handle (``.remove()`` takes it off). A layer the model does not have, or an
    SAE of another width, is a ValueError before anything is hooked."""
    name, module = residual_module(model, layer)  # checks the layer
    width = int(text_config(model).hidden_size)
    if edit.sae.W_enc.shape[0] != width:
        raise ValueError(f"the SAE reads width {edit.sae.W_enc.shape[0]}, but {name} outputs width {width}: it was "
                         f"trained on another model")
    with torch.inference_mode(False):  # the SAE's weights stay usable by autograd (fine-tuning under the edit)
        edit.sae.to(next(model.parameters()).device)

    def hook(module, args, output):
        if isinstance(output, tuple):  # decoder layers of some transformers versions return (hidden, ...)
            return (edit.apply(output[0]), *output[1:])
        return edit.apply(output)

    return module.register_forward_hook(hook)


def feature_statistics(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(frequency, mean) per feature of SAE activations ``acts`` (N, d_sae): the share of rows where it is
    active, and its mean activation over all rows."""
    return (acts > 0).float().mean(0), acts.float().mean(0)


def top_features(scores: torch.Tensor, n: int) -> list[int]:
    """The ``n`` features of highest score among those with a score > 0 (fewer if fewer are), best first."""
    order = torch.argsort(scores, descending=True, stable=True)
    return [int(i) for i in order[:n] if scores[i] > 0]

