"""The record every MLLM method trains and evaluates on: (image, question, answer) about a concept."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class Record:
    id: str  # stable identifier, used in error messages and traces
    question: str
    answer: str
    image: Image.Image | None = None  # None: a text-only record
    concept: str | None = None  # the concept the answer is about (key or name), if any
    qtype: str = ""  # "yesno" for a yes/no question about the concept; evaluation reads "no" as forgotten


def world_records(qas, bank) -> list[Record]:
    """World QA records (:mod:`unlearn.world.texts`) with their images rendered by ``bank``."""
    out = []
    for i, qa in enumerate(qas):
        where = f"{qa.image.split}/{qa.image.key}/{qa.image.index}" if qa.image else "text"
        out.append(Record(f"{qa.concept}:{qa.qtype}:{where}:{i}", qa.question, qa.answer,
                          bank[qa.image] if qa.image is not None else None, qa.concept, qa.qtype))
    return out
