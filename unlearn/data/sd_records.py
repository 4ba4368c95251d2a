"""The record every Stable Diffusion method trains on: (image, prompt, concept, mask).

The world's records (rendered images, exact masks) come from :func:`unlearn.world.records.world_sd_data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knowtrace.files import read_image

from .names import names_in


@dataclass(frozen=True)
class SDRecord:
    id: str  # stable identifier, used in error messages
    prompt: str
    image: object  # (H, W, 3) uint8 array or a path to an image file
    concept: str | None = None  # the concept shown (key or name); None: no concept (e.g. a background)
    mask: object = None  # (H, W) bool array, PNG path or labelme JSON path; None: no mask


def load_image(record: SDRecord) -> np.ndarray:
    """The record's image as (H, W, 3) uint8; a missing or unreadable file is a clear error."""
    image = record.image
    if isinstance(image, (str, Path)):
        return np.asarray(read_image(image, f"record {record.id}: image"))
    if image is None:
        raise ValueError(f"record {record.id}: no image; SD records need one")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"record {record.id}: an image array must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    return arr


def check_forget_records(records: list[SDRecord], names, need_masks: bool = False) -> None:
    """Forget records must show the concept: images present, prompts naming it, masks where needed."""
    if not records:
        raise ValueError("the forget set is empty: give at least one record")
    for r in records:
        load_image(r)
        if not names_in(r.prompt, names):
            raise ValueError(f"record {r.id}: prompt {r.prompt!r} does not name the concept ({', '.join(names)}); "
                             f"a forget prompt must contain its name or an alias")
        if need_masks and r.mask is None:
            raise ValueError(f"record {r.id}: this method needs a concept mask; give one (array, PNG or labelme JSON)")

