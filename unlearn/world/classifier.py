"""The world classifier: a small CNN that names the concept in a world image, with its quality gate.

Classes: the 24 concept keys in ``CONCEPTS`` order, then ``"none"`` (a background with its clutter
and no concept). It is trained on the ``classifier`` image stream, one freshly rendered image per
sample (no image is seen twice), and gated on the unseen ``test`` stream.

Uses downstream: the share of generated images labelled as the erased concept (unlearning
accuracy), and the penultimate features (:meth:`WorldClassifier.features`) for a Frechet distance
on the world. Any image size works (global average pooling), but it is only trained, and gated,
at ``image_size``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from knowtrace.modes import eval_mode
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .concepts import CONCEPTS
from .render import SPLITS, render_background, world_image
from .schedule import optimizer_step

CLASSES: tuple[str, ...] = tuple(c.key for c in CONCEPTS) + ("none",)
NONE = len(CONCEPTS)  # index of the "none" class
GATES = {"accuracy": 98.0}  # percent of unseen test images classified correctly


@dataclass(frozen=True)
class ClassifierConfig:
    seed: int = 0
    world_seed: int = 0
    image_size: int = 32
    width: int = 32  # channels of the first stage; 2x and 4x in the next two
    steps: int = 700
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    blur_share: float = 0.3  # share of training images softened (generated images are softer than renders)


# ----------------------------------------------------------------------------- data


def background_image(split: str, index: int, size: int = 32, world_seed: int = 0):
    """Image ``index`` of the "none" class in ``split``: its own stream, disjoint from every concept's."""
    return render_background(size, seed=[world_seed, SPLITS[split], len(CONCEPTS), index])


def class_image(label: int, split: str, index: int, size: int, world_seed: int) -> np.ndarray:
    """(H, W, 3) uint8 image ``index`` of class ``label`` in ``split``."""
    if label == NONE:
        return background_image(split, index, size, world_seed).image
    return world_image(CLASSES[label], split, index, size, world_seed).image


def as_input(images) -> torch.Tensor:
    """Classifier input (N, 3, H, W) float in [0, 1] from uint8 (N, H, W, 3) / (H, W, 3) or a float tensor."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.ndim == 3:
        images = images[None]
    if images.dtype == torch.uint8:
        return images.permute(0, 3, 1, 2).float() / 255.0
    if images.shape[1] != 3:
        raise ValueError(f"float images must be (N, 3, H, W) in [0, 1]; got shape {tuple(images.shape)}")
    return images.float()


# ----------------------------------------------------------------------------- model


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class WorldClassifier(nn.Module):
    """Three conv stages (full, 1/2, 1/4 resolution), global average pooling, a linear head."""

    def __init__(self, width: int = 32, image_size: int = 32, num_classes: int = len(CLASSES)):
        super().__init__()
        self.image_size = image_size  # the size it is trained and gated at
        self.body = nn.Sequential(
            _stage(3, width), nn.MaxPool2d(2),
            _stage(width, 2 * width), nn.MaxPool2d(2),
            _stage(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)
        self.feature_dim = 4 * width

    def features(self, images) -> torch.Tensor:
        """Penultimate features (N, 4 * width), e.g. for a Frechet distance."""
        x = as_input(images).to(self.head.weight.device)
        return self.body(x * 2 - 1)  # centre the input around 0

    def forward(self, images) -> torch.Tensor:
        """Logits (N, len(CLASSES))."""
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> np.ndarray:
        """Class indices (N,) into ``CLASSES``; the model is used in eval mode."""
        x = as_input(images)
        with eval_mode(self):
            return torch.cat([self(x[i:i + batch_size]).argmax(1).cpu() for i in range(0, len(x), batch_size)]).numpy()

    def predict_keys(self, images) -> list[str]:
        return [CLASSES[i] for i in self.predict(images)]


def _soften(x: torch.Tensor, rng: np.random.Generator, share: float) -> torch.Tensor:
    """Blend a random ``share`` of the batch (N, 3, H, W) with its 3x3 box blur, by a random amount."""
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = torch.from_numpy(rng.uniform(0, 1, len(x)) * (rng.random(len(x)) < share)).float()
    amount = amount[:, None, None, None]  # (N, 1, 1, 1)
    return x * (1 - amount) + blurred * amount


# ----------------------------------------------------------------------------- training


def train_classifier(cfg: ClassifierConfig, out_dir: Path, progress: bool = True) -> WorldClassifier:
    """Train from scratch on freshly rendered ``classifier`` images; save ``model.safetensors`` + ``config.json``."""
    torch.manual_seed(cfg.seed)
    model = WorldClassifier(cfg.width, cfg.image_size)
    rng = np.random.default_rng([cfg.seed, 17])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    next_index = np.zeros(len(CLASSES), dtype=np.int64)  # per class: the next unseen image of the stream
    model.train()
    bar = tqdm(range(cfg.steps), desc="world classifier", disable=not progress)
    for step in bar:
        labels = rng.integers(0, len(CLASSES), cfg.batch_size)
        images = []
        for y in labels:
            images.append(class_image(int(y), "classifier", int(next_index[y]), cfg.image_size, cfg.world_seed))
            next_index[y] += 1
        x = _soften(as_input(np.stack(images)), rng, cfg.blur_share)  # (B, 3, H, W)
        loss = F.cross_entropy(model(x), torch.from_numpy(labels))
        optimizer_step(loss, opt, sched, "world classifier", step, bar)
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps({**asdict(cfg), "classes": list(CLASSES)}, indent=1))
    return model


def load_classifier(path: Path) -> WorldClassifier:
    """The classifier saved by :func:`train_classifier` in ``path``, in eval mode."""
    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    if tuple(meta["classes"]) != CLASSES:
        raise ValueError(f"classifier at {path} was trained on classes {meta['classes']}, the world has {list(CLASSES)}")
    model = WorldClassifier(meta["width"], meta["image_size"])
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval()


# ----------------------------------------------------------------------------- evaluation


def evaluate_classifier(model: WorldClassifier, world_seed: int = 0, n_test: int = 50) -> dict:
    """Accuracy (percent) on ``n_test`` unseen test images per class, overall and per class."""
    labels = np.repeat(np.arange(len(CLASSES)), n_test)
    images = np.stack([class_image(int(y), "test", i % n_test, model.image_size, world_seed)
                       for i, y in enumerate(labels)])
    pred = model.predict(images)
    ok = pred == labels
    per_class = {k: round(100.0 * float(ok[labels == i].mean()), 2) for i, k in enumerate(CLASSES)}
    accuracy = round(100.0 * float(ok.mean()), 2)
    confusions = dict(Counter(f"{CLASSES[y]}->{CLASSES[p]}" for y, p in zip(labels[~ok], pred[~ok])))  # true->predicted
    gates = {"accuracy": accuracy >= GATES["accuracy"]}
    return {"accuracy": accuracy, "per_class": per_class, "min_class": min(per_class.values()),
            "confusions": confusions, "thresholds": GATES, "gates": gates, "pass": all(gates.values()),
            "n": int(len(labels))}
