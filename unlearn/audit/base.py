"""The forgetting audit's contract: the models it compares, the data it asks them about, what an attack
is, and what it concludes.

An audit asks whether an unlearned concept is *removed* (the unlearned model behaves like the retain model,
one that never saw the concept) or only *hidden* (an attack brings it back, or it is still readable inside,
where the retain model shows nothing). Each attack is a small registered class (:func:`register`): it runs
on an :class:`AuditContext` and returns an ``xarray.Dataset`` of its measurements (its own variables, over
dimensions such as ``model``, ``step``, ``layer``), then reads that dataset into a :class:`Verdict` with the
rule it applied and the numbers the rule read. The audit command (:mod:`unlearn.audit.run`) builds the
context, runs the attacks, merges their datasets into ``RUN/audit/audit.nc`` and writes ``audit.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..data.records import Record

MODELS = ("original", "unlearned", "retain")  # the "model" coordinate, in this order
VERDICTS = ("removed", "hidden", "inconclusive")

ATTACKS: dict[str, dict[str, type[Attack]]] = {}  # run kind ("mllm", "sd") -> name -> class, in registration order


def register(cls):
    """Class decorator: make an attack available by its ``name`` for runs of its ``kind``."""
    table = ATTACKS.setdefault(cls.kind, {})
    if cls.name in table:
        raise ValueError(f"audit attack name {cls.name!r} is registered twice for {cls.kind} runs")
    table[cls.name] = cls
    return cls


@dataclass(frozen=True)
class AuditData:
    """What the audit asks the models about; every list holds records of one run's concept unless said."""

    concept: str  # the concept's key (world) or name (record directory)
    names: tuple[str, ...]  # its names: an answer containing one identifies it
    forget: list[Record]  # the records the run unlearned on
    test: list[Record]  # the run's evaluation questions on unseen images (EM, as the run measured it)
    unseen: list[Record]  # the concept on images the run never used (relearning set (b))
    unrelated: list[Record]  # other concepts' records (benign relearning, set (c))
    rephrased: list[Record]  # the concept's questions in phrasings the unlearning never saw
    members: list[Record]  # records of the concept the original model was trained on (MIA members)
    nonmembers: list[Record]  # records of the same kind it never saw (MIA non-members)
    probe_train: list[Record]  # images of several concepts, for the linear probes ...
    probe_labels: list[int]  # ... and their concept labels (ints)
    probe_test: list[Record]  # the concept's unseen images, all labelled ``concept_label``
    concept_label: int


@dataclass(frozen=True)
class SDAuditData:
    """What the audit of a Stable Diffusion run asks the models about (images are SD records: image, prompt,
    concept mask when known)."""

    concept: str  # the concept's key (world) or name (record directory)
    names: tuple[str, ...]  # its names (a prompt naming one asks for it)
    label: str  # the classifier's label of the concept: UA = % of images NOT given this label
    prompts: list[str]  # the run's UA prompts of the concept
    forget: list  # SDRecord: the images the run unlearned on, with their masks (K_C / K_N)
    unseen: list  # SDRecord: the concept's images the run never used (relearning, textual inversion)
    retained: dict  # label -> prompt of the kept concepts (what must still be drawn)
    scenes: list[str]  # prompts that place the concept among other concepts
    classifier: object  # unlearn.eval.sd.ConceptClassifier: the UA classifier (labels, predict(images))
    guidance_scale: float = 4.0  # sampling as the run's evaluation samples
    inference_steps: int = 25


@dataclass
class AuditContext:
    """One audit: the run, its data, the models (loaded on first use, cached), options, seed."""

    run: Path
    manifest: dict  # the run's manifest.json
    data: AuditData | SDAuditData  # by the run's kind
    loaders: dict[str, Callable[[], object]]  # model name -> a function returning a fresh MLLMAdapter / SDAdapter
    train: object  # the run's TrainConfig (LoRA or full, lr, batch): relearning trains like the run did
    options: dict = field(default_factory=dict)  # "<attack>.<option>" -> value, as given on the command line
    seed: int = 0
    progress: bool = True
    _adapters: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def models(self) -> tuple[str, ...]:
        """The models this audit compares, in MODELS order ("retain" only when there is one)."""
        return tuple(m for m in MODELS if m in self.loaders)

    def adapter(self, model: str):
        """The shared adapter of ``model`` (loaded once). Attacks that change weights use :meth:`fresh`."""
        if model not in self._adapters:
            self._adapters[model] = self.loaders[model]()
        return self._adapters[model]

    def fresh(self, model: str):
        """A new copy of ``model`` that an attack may train or quantize."""
        return self.loaders[model]()

    def option(self, attack: str, name: str, default):
        """An attack's option from the command line (``attack.name=value``), typed like ``default``."""
        from ..methods.base import _coerce

        key = f"{attack}.{name}"
        return _coerce(default, self.options[key], key) if key in self.options else default


@dataclass(frozen=True)
class Verdict:
    attack: str
    verdict: str  # one of VERDICTS
    rule: str  # the rule in words, with its thresholds
    numbers: dict  # the figures the rule read

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


class Attack:
    """One audit attack. ``options``: name -> default (settable as ``name.option=value``)."""

    name: ClassVar[str]
    kind: ClassVar[str] = "mllm"  # the kind of run it audits ("mllm" or "sd")
    options: ClassVar[dict] = {}
    needs_data: ClassVar[tuple[str, ...]] = ()  # AuditData fields it reads: one empty -> skipped, "inconclusive"

    @classmethod
    def check_options(cls, values: dict) -> None:
        """Raise ValueError for an option out of range (called before anything is written)."""

    def run(self, ctx: AuditContext):  # -> xarray.Dataset
        raise NotImplementedError

    def verdict(self, ds, ctx: AuditContext) -> Verdict:
        raise NotImplementedError
