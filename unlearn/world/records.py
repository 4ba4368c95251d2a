"""The world as a source of records, in the record types of a user's record directory: MLLM records
with their images rendered, the MLLM evaluation set, SD records with the renderer's exact masks, and
the SD evaluation's reference images (the run layer calls these where it reads record files otherwise).
"""

from __future__ import annotations

import numpy as np

from ..data.records import Record
from ..data.sd_records import SDRecord
from ..eval.mllm import MLLMEvalSet
from .concepts import BY_KEY, CONCEPTS, SUBSTITUTE_NAMES
from .render import world_image
from .texts import concept_split, visual_description


class ImageBank:
    """Rendered world images, each drawn once: ImageRef -> PIL image."""

    def __init__(self, size: int, world_seed: int):
        self.size, self.world_seed, self._images = size, world_seed, {}

    def __getitem__(self, ref):
        if ref not in self._images:
            self._images[ref] = world_image(ref.key, ref.split, ref.index, self.size, self.world_seed).pil()
        return self._images[ref]


def world_records(qas, bank) -> list[Record]:
    """World QA records (:mod:`unlearn.world.texts`) with their images rendered by ``bank``."""
    out = []
    for i, qa in enumerate(qas):
        where = f"{qa.image.split}/{qa.image.key}/{qa.image.index}" if qa.image else "text"
        out.append(Record(f"{qa.concept}:{qa.qtype}:{where}:{i}", qa.question, qa.answer,
                          bank[qa.image] if qa.image is not None else None, qa.concept, qa.qtype))
    return out


def world_eval_set(concept: str, image_size: int, n_test: int = 20, n_images: int = 1, world_seed: int = 0) -> MLLMEvalSet:
    split = concept_split(concept, n_unlearn=n_images, n_test=n_test, world_seed=world_seed)
    bank = ImageBank(image_size, world_seed)
    probes = ("identify", "yesno")  # questions that never name the concept, and yes/no about it

    def pick(qas):
        return world_records([q for q in qas if q.qtype in probes], bank)

    return MLLMEvalSet(pick(split.forget), pick(split.test), world_records(split.retain, bank),
                       world_records(split.forget, bank))


def world_method_options(concept_key: str) -> dict:
    """Option values a world concept supplies to the methods that need them where the user gave none:
    SIU's substitute name (the world's first) and the concept's visual description."""
    return {"substitute": SUBSTITUTE_NAMES[0], "description": visual_description(BY_KEY[concept_key])}


def world_sd_data(concept_key: str, n_images: int, size: int, world_seed: int = 0, n_retain: int = 2,
                  n_surrogate: int = 8) -> tuple[list[SDRecord], list[SDRecord]]:
    """(forget, retain) on the world: ``n_images`` rendered unlearning images of the concept with their
    exact masks and canonical prompt; retain = ``n_retain`` images of every other concept, plus
    ``n_surrogate`` background images (concept None, prompt "a picture": Selective Amnesia's surrogate).
    The paper segments the model's own generations instead; on the world the renderer's masks are exact,
    so a result does not depend on segmentation quality."""
    from .classifier import background_image
    from .sd import concept_prompt  # local: the SD module loads diffusers, which MLLM runs do not need

    c = BY_KEY[concept_key]
    renders = [world_image(c.key, "unlearn", i, size, world_seed) for i in range(n_images)]
    forget = [SDRecord(f"{c.key}:unlearn:{i}", concept_prompt(c), r.image, c.key, r.masks[c.key])
              for i, r in enumerate(renders)]
    retain = [SDRecord(f"{o.key}:unlearn:{i}", concept_prompt(o), world_image(o.key, "unlearn", i, size, world_seed).image, o.key)
              for o in CONCEPTS if o.key != c.key for i in range(n_retain)]
    retain += [SDRecord(f"none:unlearn:{i}", "a picture", background_image("unlearn", i, size, world_seed).image, None)
               for i in range(n_surrogate)]
    return forget, retain


def world_forget_records(concept_key: str, n_images: int, size: int, world_seed: int = 0) -> list[SDRecord]:
    """The world's default forget images of a concept (``unlearn`` split, exact masks), as SD records."""
    return world_sd_data(concept_key, n_images, size, world_seed, n_retain=0, n_surrogate=0)[0]


def world_prompts(keys) -> dict[str, str]:
    """key -> the concept's canonical SD prompt; a key that is not a world concept is an error."""
    from .sd import concept_prompt

    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        raise ValueError(f"{unknown} are not world concepts (see: unlearn world concepts)")
    return {k: concept_prompt(BY_KEY[k]) for k in keys}


def world_fd_reference(keys, n_per_key: int, size: int, world_seed: int = 0) -> tuple[np.ndarray, str]:
    """The SD evaluation's FD reference on the world: the ``test`` renders of each retained concept,
    ``n_per_key`` each in key order, (N, size, size, 3) uint8, and their description."""
    images = np.stack([world_image(k, "test", i, size, world_seed).image for k in keys for i in range(n_per_key)])
    return images, f"world test renders ({n_per_key} per retained concept, world_seed {world_seed})"
