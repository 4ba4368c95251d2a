"""The record every Stable Diffusion method trains on: (image, prompt, concept, mask).

World data (:func:`world_sd_data`): the forget images of concept K are rendered world images
(``world_image(K, "unlearn", i)``) with the renderer's exact masks, by default. The paper instead
segments the model's own generated images; that path stays open through records (give generated
images and masks from a segmenter), but on the world the renderer needs no segmenter and its masks
are exact, so a run's result does not depend on segmentation quality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

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
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"record {record.id}: image file {path} does not exist")
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as e:
            raise ValueError(f"record {record.id}: cannot read image {path}: {e}") from None
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


def world_sd_data(concept_key: str, n_images: int, size: int, world_seed: int = 0, n_retain: int = 2,
                  n_surrogate: int = 8) -> tuple[list[SDRecord], list[SDRecord]]:
    """(forget, retain) on the world: ``n_images`` rendered unlearning images of the concept with
    their exact masks and canonical prompt; retain = ``n_retain`` images of every other concept with
    their own prompts, plus ``n_surrogate`` background images (concept None, prompt "a picture")
    that Selective Amnesia uses as the surrogate for the forgotten concept."""
    from ..world.classifier import background_image
    from ..world.concepts import BY_KEY, CONCEPTS
    from ..world.render import world_image
    from ..world.sd import concept_prompt

    c = BY_KEY[concept_key]
    forget = []
    for i in range(n_images):
        r = world_image(c.key, "unlearn", i, size, world_seed)
        forget.append(SDRecord(f"{c.key}:unlearn:{i}", concept_prompt(c), r.image, c.key, r.masks[c.key]))
    retain = [SDRecord(f"{o.key}:unlearn:{i}", concept_prompt(o), world_image(o.key, "unlearn", i, size, world_seed).image, o.key)
              for o in CONCEPTS if o.key != c.key for i in range(n_retain)]
    retain += [SDRecord(f"none:unlearn:{i}", "a picture", background_image("unlearn", i, size, world_seed).image, None)
               for i in range(n_surrogate)]
    return forget, retain
