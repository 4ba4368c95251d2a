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

