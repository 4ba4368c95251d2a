"""Methods are small classes registered by name; their options are dataclass fields.

A method turns a batch of forget records (and, if it needs them, retain records and the frozen
reference model, through :class:`StepContext`) into a :class:`StepOutput`, and declares what it
needs on its class (``needs_retain``, ``needs_reference``, SD: ``mask_options``). The loop owns
everything else (optimizer, steps, accumulation, devices, reading the logs), so a method is only its objective.

One registry per modality ("mllm", "sd"): a method class declares its ``modality`` and the same
name may exist once per modality (MLLM "fttp" and SD "fttp" are different objectives).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..data.records import Record
from ..data.sd_masks import MaskOptions

MODALITIES = ("mllm", "sd")
REGISTRY: dict[str, dict[str, type[Method]]] = {m: {} for m in MODALITIES}
METHODS = REGISTRY["mllm"]  # the MLLM methods (kept under their historical name)
SD_METHODS = REGISTRY["sd"]


def register(cls):
    """Class decorator: make a method available by its ``name`` in its ``modality``'s registry."""
    table = methods_of(cls.modality)
    if cls.name in table:
        raise ValueError(f"{cls.modality} method name {cls.name!r} is registered twice")
    table[cls.name] = cls
    return cls


def methods_of(modality: str) -> dict[str, type[Method]]:
    if modality not in REGISTRY:
        raise KeyError(f"unknown modality {modality!r}; modalities: {', '.join(MODALITIES)}")
    return REGISTRY[modality]


def method_options(cls) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def get_method(name: str, modality: str = "mllm", **options) -> Method:
    """The ``modality`` method ``name`` with ``options``; unknown names or options are errors listing valid ones."""
    table = methods_of(modality)
    if name not in table:
        raise KeyError(f"unknown {modality} method {name!r}; {modality} methods: {', '.join(sorted(table))}")
    cls = table[name]
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

    adapter: object  # the adapter of the model being trained (MLLMAdapter, SDAdapter)
    concept: str  # the concept's key or name, for messages
    names: tuple[str, ...]  # the concept's name and aliases, to find its tokens
    next_retain: Callable[[], list] | None = None  # a batch of retain records
    reference_logits: Callable[[dict], torch.Tensor] | None = None  # frozen starting model, no grad
    step: int = 0
    # fn(frozen starting model) under no_grad (LoRA: the same model with its adapters disabled;
    # full fine-tuning: a frozen copy); set by the loop for methods with needs_reference
    run_reference: Callable[[Callable], object] | None = None
    generator: torch.Generator | None = None  # seeded randomness of the step (diffusion noise, timesteps)
    seed: int = 0  # the run's seed, the same on every process: for setup draws that all processes must share
    progress: bool = True  # show progress bars of long setup work (e.g. training an SAE)

    def reference(self, fn: Callable, method: str = "") -> object:
        """``fn(reference_model)`` without gradients: the frozen starting model's view of anything."""
        if self.run_reference is None:
            raise ValueError(f"method {method or '?'!r} uses the reference model: declare needs_reference = True")
        return self.run_reference(fn)

    def retain_batch(self, method: str) -> list[Record]:
        if self.next_retain is None:
            raise ValueError(f"method {method!r} needs retain data: give retain records")
        return self.next_retain()


@dataclass
class StepOutput:
    """What a method's ``loss`` returns for one (micro-)batch."""

    loss: torch.Tensor  # scalar, with gradient
    # logged values, kept as tensors (detached) or numbers: the loop reads them once per step
    logs: dict[str, torch.Tensor | float]
    per_element: torch.Tensor | None = None  # SD: (B, h, w) detached per-latent-pixel errors of the forget batch
    ids: list[str] | None = None  # the record ids of ``per_element``'s rows


@dataclass
class Method:
    name: ClassVar[str]
    modality: ClassVar[str] = "mllm"
    needs_retain: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False
    # True for methods whose StepOutput carries per_element values (a step-source trace records them)
    has_step_errors: ClassVar[bool] = False
    # attributes (plain numbers) that change as training goes on, e.g. a cursor through constructed
    # targets: a checkpoint stores them so that a resumed run goes on where it stopped
    resume_state: ClassVar[tuple[str, ...]] = ()
    # False for inference-time methods (SAUCE): ``setup`` changes how the model computes (a hook), no
    # weight is trained; the run saves the method's own files (``save``) and a reload calls ``restore``
    trains_weights: ClassVar[bool] = True

    def check_model(self, adapter, model: str) -> None:
        """Checks that need the loaded model (``model``: the run's --model), before the run writes anything."""

    def save(self, out: Path) -> None:
        """An inference-time method: write what reproduces it into run directory ``out``."""
        raise NotImplementedError

    @classmethod
    def restore(cls, adapter, run: Path) -> None:
        """An inference-time method: put run ``run``'s change back on ``adapter.model`` (its original model)."""
        raise NotImplementedError

    @staticmethod
    def saved(run: Path) -> object:
        """An inference-time method: check run ``run``'s files (before a model loads)."""
        raise NotImplementedError

    def train_targets(self, adapter, lora: bool) -> str | None:
        """Which parts this method trains: a peft target-module regex (``lora``) or a regex searched in
        parameter names (full fine-tuning); None = the adapter's default (everything, for full FT)."""
        return None

    def setup(self, ctx: StepContext, forget: list[Record], retain: list[Record]) -> None:
        """Once before training (saliency masks, constructed targets, ...)."""

    def loss(self, ctx: StepContext, forget: list[Record]) -> StepOutput:
        raise NotImplementedError

    def gradient_hook(self, ctx: StepContext) -> None:
        """Called after backward and before the optimizer step (e.g. to mask gradients)."""


MLLMMethod = Method  # MLLM methods subclass it as before (modality "mllm")


@dataclass
class SDMethod(Method):
    """A Stable Diffusion method: ``loss`` gets :class:`unlearn.data.sd_records.SDRecord` batches and
    ``ctx.adapter`` is an :class:`unlearn.models.sd.SDAdapter`."""

    modality: ClassVar[str] = "sd"

    @property
    def mask_options(self) -> MaskOptions | None:
        """How the concept masks of this method's forget batches are built; None: it uses none."""
        return None

    @property
    def needs_masks(self) -> bool:
        return self.mask_options is not None


def retain_iterator(records: list, batch_size: int, seed: int) -> Iterator[list]:
    """Endless shuffled batches of retain records (reshuffled each pass, seeded)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(records), generator=g).tolist()
        for s in range(0, len(order) - batch_size + 1, batch_size):
            yield [records[i] for i in order[s:s + batch_size]]
