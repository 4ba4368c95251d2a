"""The world as a source of models: the spec ``"world"`` resolved to what a user would give instead.

The run layer resolves a model spec here before the loaders, which take only local directories and hub
ids: ``resolve_model("world", "mllm")`` is the cached world MLLM's directory (built if missing), and
``retain_mllm(key)`` / ``retain_sd(key)`` that of the MLLM / SD that never saw concept ``key`` (the forgetting
audit's reference). The UA classifier spec ``"world"`` is the world classifier; ``"clip:PATH"`` a zero-shot
CLIP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ..eval.sd import WORLD_FD_SPACE, ClipZeroShotClassifier, ConceptClassifier, check_classifier_spec, check_images
from .classifier import CLASSES, load_classifier


def resolve_model(model, component: str, world_dir=None, world_config=None):
    """``"world"`` -> the directory of the world's ``component`` ("mllm", "sd", "classifier"), built
    if missing; any other spec (a local path, a hub id) as given."""
    if model != "world":
        return model
    from .build import build_world  # local: it loads every world model's module (diffusers among them)

    return build_world(world_dir, world_config, only=(component,))[component]


def retain_mllm(concept_key: str, world_dir=None, world_config=None, progress: bool = True) -> Path:
    """The directory of the retain MLLM of ``concept_key`` (key or name): the world MLLM's recipe with the
    concept left out of its training (:func:`unlearn.world.build.build_retain`), built if missing."""
    return _retain(concept_key, "mllm", world_dir, world_config, progress)


def retain_sd(concept_key: str, world_dir=None, world_config=None, progress: bool = True) -> Path:
    """The directory of the retain SD of ``concept_key`` (key or name): the world SD's recipe with the
    concept's images, scenes and prompts left out of its training, built if missing."""
    return _retain(concept_key, "sd", world_dir, world_config, progress)


def _retain(concept_key: str, component: str, world_dir, world_config, progress: bool) -> Path:
    from .build import build_retain
    from .concepts import get_concept

    key = get_concept(concept_key).key
    return build_retain([key], world_dir, world_config, progress=progress, component=component)[key]


class WorldConceptClassifier:
    """The world classifier (:mod:`unlearn.world.classifier`): labels are concept keys and ``"none"``."""

    feature_space = WORLD_FD_SPACE

    def __init__(self, model, batch_size: int = 256):
        self.model = model.eval()
        self.labels = list(CLASSES)
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: str | Path | None = None, world_dir: str | Path | None = None) -> WorldConceptClassifier:
        """From a saved classifier directory, or the world cache's (built there if missing)."""
        return cls(load_classifier(Path(path or resolve_model("world", "classifier", world_dir))))

    def predict(self, images: np.ndarray) -> list[str]:
        return self.model.predict_keys(check_images(images))

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, D) float64 penultimate features (eval mode)."""
        images = check_images(images)
        out = [self.model.features(images[i:i + self.batch_size]).double().cpu().numpy()
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out)


def classifier_from_spec(spec: str, labels: Sequence[str], names: Mapping[str, str] | None = None,
                         world_dir=None) -> ConceptClassifier:
    """The classifier named by ``spec`` (:func:`unlearn.eval.sd.check_classifier_spec`). ``labels``
    (and ``names``, label -> name in the prompt template) are the zero-shot label set; the world
    classifier has its own labels (concept keys and "none")."""
    kind, arg = check_classifier_spec(spec)
    if kind == "world":
        return WorldConceptClassifier.load(world_dir=world_dir)
    return ClipZeroShotClassifier.from_pretrained(arg, list(labels), names=names)
