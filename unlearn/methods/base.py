"""Methods are small classes registered by name; their options are dataclass fields.

A method turns a batch of forget records (and, if it needs them, retain records and the frozen
reference model, through :class:`StepContext`) into one loss. The loop owns everything else
(optimizer, steps, accumulation, devices), so a method is only its objective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..data.records import Record

METHODS: dict[str, type[MLLMMethod]] = {}


def register(cls):
    """Class decorator: make a method available by its ``name``."""
    if cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def method_options(cls) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def get_method(name: str, **options) -> MLLMMethod:
    """The method ``name`` with ``options``; unknown names or options are errors listing valid ones."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    valid = method_options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise KeyError(f"unknown option(s) {unknown} for method {name!r}; its options: "
                       + (", ".join(f"{k} (default {v})" for k, v in valid.items()) or "none"))
    return cls(**{k: _coerce(valid[k], v, f"{name}.{k}") for k, v in options.items()})


def _coerce(default, value, what: str):
    """Options given as text (command line) take the type of their default."""
    if not isinstance(value, str) or default is None or isinstance(default, str):
        return value
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{what} must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    try:
        return type(default)(value)
    except ValueError:
        raise ValueError(f"{what} must be a {type(default).__name__}, got {value!r}") from None


@dataclass
class StepContext:
    """What a method may use at a step."""

    adapter: object  # the MLLMAdapter of the model being trained
    concept: str  # the concept's key or name, for messages
    names: tuple[str, ...]  # the concept's name and aliases, to find its tokens
    next_retain: Callable[[], list[Record]] | None = None  # a batch of retain records
    reference_logits: Callable[[dict], torch.Tensor] | None = None  # frozen starting model, no grad
    step: int = 0

    def retain_batch(self, method: str) -> list[Record]:
        if self.next_retain is None:
            raise ValueError(f"method {method!r} needs retain data: give retain records")
        return self.next_retain()


@dataclass
class MLLMMethod:
    name: ClassVar[str]
    needs_retain: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False

    def setup(self, ctx: StepContext, forget: list[Record], retain: list[Record]) -> None:
        """Once before training (saliency masks, constructed targets, ...)."""

    def loss(self, ctx: StepContext, forget: list[Record]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def gradient_hook(self) -> Callable[[], None] | None:
        """Called after backward and before the optimizer step (e.g. to mask gradients)."""
        return None


def retain_iterator(records: list[Record], batch_size: int, seed: int) -> Iterator[list[Record]]:
    """Endless shuffled batches of retain records (reshuffled each pass, seeded)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(records), generator=g).tolist()
        for s in range(0, len(order) - batch_size + 1, batch_size):
            yield [records[i] for i in order[s:s + batch_size]]
