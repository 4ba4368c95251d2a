"""The world's data for the forgetting audit (:class:`unlearn.audit.base.AuditData`) of one concept.

Every image the audit adds comes from the ``audit`` split of the renderer, which no world model trains or
evaluates on: indices ``[0, n)`` are the concept's *unseen* images, ``[n, n + images_per_concept)`` its
membership-inference *non-member* images (one per pretraining image).

What the original world MLLM has seen:

* ``members``: yes, exactly these (image, question, answer) records, in pretraining;
* ``probe_train``: the images, yes (pretraining images), and the question on about half of them;
* ``forget``, ``test`` (the run's: ``unlearn`` / ``test`` splits), ``unseen``, ``nonmembers``,
  ``rephrased``, ``probe_test``: none of their images; their texts are the world's templates, except
  ``rephrased``, whose questions no world model and no unlearning has seen;
* ``unrelated``: other concepts' records, their question templates yes, their (audit) images no.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..data.records import Record
from ..world.concepts import CONCEPTS, get_concept
from ..world.mllm import MLLMConfig, pretraining_records
from ..world.records import ImageBank, world_records
from ..world.texts import QA, ImageRef, identify_answer, identify_qa, image_records
from .base import AuditData

SPLIT = "audit"

# kind -> identify questions in phrasings that are no template of the world (no world model was trained on
# them, no unlearning saw them), made only of words the world tokenizer knows: a new word would change the
# world's vocabulary, hence its fingerprint, and rebuild every world model (tests/test_world_retain.py checks).
# Chosen among candidates by what the original world MLLM answers (measured, README "The retain model"):
# "Which brand is this?" and "What brand is in this image?" got 0% (it answered with an art style).
REPHRASED = {
    "person": ("Who is in this image?", "Who is the person in this image?", "Which person is this?"),
    "cartoon": ("What is the character in this image?", "What character is this?", "Which character is this?"),
    "logo": ("What logo is in this image?", "What brand is this logo?", "Which logo is this?"),
    "style": ("What style is this?", "What is the style of this image?", "What art style is this?"),
}


def rephrased_qa(key: str, image: ImageRef, variant: int = 0) -> QA:
    """An identify question on ``image`` in a new phrasing (``variant`` picks one), with the usual answer."""
    concept = get_concept(key)
    questions = REPHRASED[concept.kind]
    return QA(concept.key, "identify", questions[variant % len(questions)], identify_answer(concept), image)


def world_audit_data(concept_key: str, forget: list[Record], test: list[Record], image_size: int, world_seed: int = 0,
                     mllm_config: MLLMConfig | None = None, n: int = 20) -> AuditData:
    """The audit's data for world concept ``concept_key``; ``forget`` and ``test`` are the run's records.

    ``mllm_config``: the config the original world MLLM was trained with (default: the world's), which
    says what its pretraining held (the members). ``n``: unseen images of the concept."""
    concept = get_concept(concept_key)
    key = concept.key
    cfg = mllm_config or MLLMConfig(world_seed=world_seed)
    if cfg.world_seed != world_seed:
        raise ValueError(f"world_seed={world_seed} but the MLLM config's world_seed is {cfg.world_seed}: give the "
                         "world seed the original model was trained on")
    if n < 1:
        raise ValueError(f"n={n}: the audit needs at least one unseen image of the concept")
    bank = ImageBank(image_size, world_seed)

    def audit_image(index: int) -> ImageRef:
        return ImageRef(key, SPLIT, index)

    # the concept's own question types (identify, yes, linked), as the run's test set builds them
    rng = np.random.default_rng([world_seed, 23])
    unseen = [qa for i in range(n) for qa in image_records(concept, audit_image(i), rng) if qa.concept == key]
    rephrased = [rephrased_qa(key, audit_image(i), variant=i) for i in range(n)]
    others = [c for c in CONCEPTS if c.key != key]
    unrelated = [identify_qa(c, ImageRef(c.key, SPLIT, 0), variant=j) for j, c in enumerate(others)]

    # members: the concept's records on its own pretraining images (the text-only fact records are members
    # too, but have no non-member of the same kind: the facts are fixed). Non-members: each member's very
    # question and answer on an unseen image, so that the two sets differ only in the image.
    members = [qa for qa in pretraining_records(replace(cfg, left_out=()))
               if qa.concept == key and qa.image is not None and qa.image.key == key]
    nonmembers = [replace(qa, image=audit_image(n + qa.image.index)) for qa in members]

    # probe: which of the concept's kind an image shows, the same question for all (the kind's first identify
    # question), so the probe can read identity only from the image. One kind, not all concepts: the identify
    # question differs per kind and would tell the probe the kind by itself.
    kind = [c for c in CONCEPTS if c.kind == concept.kind]
    probe_train = [identify_qa(c, ImageRef(c.key, "pretrain", i)) for c in kind for i in range(cfg.images_per_concept)]
    probe_labels = [label for label in range(len(kind)) for _ in range(cfg.images_per_concept)]
    probe_test = [identify_qa(concept, audit_image(i)) for i in range(n)]

    def records(qas):
        return world_records(qas, bank)

    return AuditData(
        concept=key, names=concept.names, forget=list(forget), test=list(test), unseen=records(unseen),
        unrelated=records(unrelated), rephrased=records(rephrased), members=records(members),
        nonmembers=records(nonmembers), probe_train=records(probe_train), probe_labels=probe_labels,
        probe_test=records(probe_test), concept_label=kind.index(concept),
    )
