"""One Stable Diffusion unlearning run (the skeleton is :class:`unlearn.runs.Run`): what differs for
SD is loading the pipeline and the forget records (with masks), the evaluation (UA, FD in the
classifier's feature space ``fd_space``, K_C / K_N), sample images and the tracer
(:mod:`unlearn.sd_tracing`). Full fine-tuning saves only the trained UNet tensors
(``weights/unet.safetensors``).

Defaults follow the paper's SD setting: full fine-tuning of the UNet with Adam, lr 1e-5, batch 2;
FTTP about 20 steps from 5 images. On the world SD the default lr is 3e-5 (``WORLD_LR``, measured),
and the forget records are rendered images with exact masks
(:func:`unlearn.world.records.world_sd_data`); other models take user records.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from .data.sd_records import SDRecord, check_forget_records
from .eval.sd import PROBE_BATCH
from .loop import TrainConfig
from .models.sd import PIPELINE_FILE, WORLD_MARKER, adapter_class
from .models.source import checked_source
from .runs import Run
from .runs import evaluate_run  # noqa: F401  (unlearn eval RUN: any kind of run)
from .runs import reload as load_run  # noqa: F401  (a finished run's adapter with its trained parameters, manifest)
from .runs import train_config as typed_train_config
from .world.records import world_fd_reference, world_sd_data
from .world.source import classifier_from_spec, resolve_model

SD_DEFAULTS = {"lr": 1e-5, "batch_size": 2, "lora": False}  # the paper's SD setting (full UNet fine-tuning)
# the world SD's UNet has 1M parameters, not 860M: measured FTTP on vorn, 20 steps, 5 images, 20 seeds
# (docs/sd.md): lr 1e-5 UA 5 -> 0 (nothing forgotten); 3e-5 UA 90, other concepts kept 55-95%;
# 5e-5 UA 100 but other concepts 0-70%; 1e-4 UA 100, other concepts 0%. So 3e-5 on the world.
WORLD_LR = 3e-5
N_SAMPLES = 4  # sample images saved per prompt and model


def train_defaults(world: bool = False) -> dict:
    return {**SD_DEFAULTS, **({"lr": WORLD_LR} if world else {})}


def train_config(values: dict, world: bool = False) -> TrainConfig:
    """The TrainConfig of an SD run (its defaults, then ``values``), for code that trains without a run."""
    return typed_train_config({**train_defaults(world), **values})


@dataclasses.dataclass
class EvalTarget:
    """What a run is evaluated on: the concept's classifier label, names and UA prompts, the retained
    concepts (label -> prompt) and, off the world, their FD reference images."""
    key: str  # the concept's key (world) or name (record files)
    names: tuple[str, ...]
    label: str  # the classifier's label for the concept
    prompts: list[str]
    retained: dict[str, str]
    spec: object = None  # SDEvalSpec of a data directory; None on the world

    @classmethod
    def world(cls, key: str, retained: list[str] | None = None) -> EvalTarget:
        from .world.concepts import BY_KEY
        from .world.sd import concept_prompt

        unknown = [k for k in retained or [] if k not in BY_KEY or k == key]
        if unknown:
            raise ValueError(f"retained {unknown} are not other world concepts (see: unlearn world concepts)")
        keys = retained or [k for k in BY_KEY if k != key]
        return cls(key, BY_KEY[key].names, key, [concept_prompt(BY_KEY[key])], {k: concept_prompt(BY_KEY[k]) for k in keys})

    @classmethod
    def from_data(cls, rd, retained: list[str] | None = None) -> EvalTarget:
        spec = rd.eval
        unknown = [k for k in retained or [] if k not in spec.retained]
        if unknown:
            raise ValueError(f"retained {unknown} are not in eval.json's \"retained\" ({', '.join(spec.retained)})")
        kept = {k: spec.retained[k] for k in (retained or spec.retained)}
        return cls(rd.name, rd.names, spec.label, list(spec.prompts), kept, spec)

    def classifier(self, spec: str, world_dir=None):
        """The UA / FD classifier, checked to know the concept's and every retained concept's label."""
        from .world.concepts import BY_KEY

        labels = [self.label, *self.retained, *(self.spec.labels if self.spec is not None else [])]
        names = {k: BY_KEY[k].name for k in labels if k in BY_KEY} if self.spec is None else None
        clf = classifier_from_spec(spec, list(dict.fromkeys(labels)), names=names, world_dir=world_dir)
        missing = [k for k in [self.label, *self.retained] if k not in clf.labels]
        if missing:
            raise ValueError(f"classifier {spec!r} has no label(s) {missing}; its labels: {list(clf.labels)[:30]}; "
                             f"use a classifier that knows them (e.g. clip:PATH) or fix eval.json's labels")
        return clf


def evaluator(adapter, concept_key: str, forget: list[SDRecord], n_seeds: int, fd_seeds: int,
              world_dir=None, retained=None, *, target: EvalTarget | None = None, classifier=None):
    """fn(train_steps) -> metrics of the pipeline as it is now (:func:`unlearn.eval.sd.evaluate_sd_run`):
    UA with ``classifier`` (default: the world's), FD in its feature space against the world's test
    renders or the data directory's reference images, K_C / K_N on the forget records at fixed noise."""
    from .eval.sd import SDEvalSettings, evaluate_sd_run

    target = target or EvalTarget.world(concept_key, retained)
    classifier = classifier or target.classifier("world", world_dir)
    if target.spec is not None:  # the data directory's reference images, fd_seeds per retained label
        references = target.spec.reference_images(target.retained, fd_seeds, adapter.resolution)
        reference_name = "given reference images"
    else:
        references, reference_name = world_fd_reference(target.retained, fd_seeds, adapter.resolution)
    settings = SDEvalSettings(fd_seeds=fd_seeds)
    return lambda train_steps: evaluate_sd_run(
        adapter.pipe, target.label, classifier=classifier, n_seeds=n_seeds, forget_records=forget,
        retained=target.retained, prompts=target.prompts, reference_images=references, reference_name=reference_name,
        train_steps=train_steps, train_images=len(forget), settings=settings, adapter=adapter)


@dataclasses.dataclass
class SDRun(Run):
    """An SD run. ``trace``: per-step ``eps_err``, K_C / K_N of the forget images (a fixed-noise probe
    before training, step -1, and after every step) in ``out/trace.zarr``; ``trace="attention"`` (or
    ``trace_attention``): also the probe's cross-attention maps (``xattn``). ``trace_every``: probe
    after every k-th step (and the last) only. ``trace_batch``: (timestep, image) pairs per probe
    forward. ``trace_source="step"``: each step's own per-pixel errors (and, with attention, its own forward's
    cross-attention maps) instead of a probe (nearly free).
    ``classifier``: ``"world"`` (default on the world SD) or ``"clip:PATH"`` (needed off the world).
    ``retained``: the retained concepts to evaluate (world keys, or labels of eval.json).
    ``forget``/``retain``: records given in Python, for a world concept; on the world they default to
    :func:`world_sd_data` with ``images`` forget images."""
    steps: int = 20
    images: int = 5
    eval_seeds: int = 20
    fd_seeds: int = 10
    retained: list[str] | None = None
    forget: list[SDRecord] | None = None
    retain: list[SDRecord] | None = None
    classifier: str | None = None
    trace_attention: bool = False  # the same as trace="attention"
    trace_every: int = 1
    trace_source: str = "probe"
    trace_batch: int | None = None
    recorded_forget: list[str] | None = None  # re-evaluation: the run's forget record ids, checked on loading
    target: EvalTarget | None = dataclasses.field(default=None, init=False, repr=False)

    kind: ClassVar[str] = "sd"
    world_marker: ClassVar[str] = WORLD_MARKER
    data_help: ClassVar[tuple[str, str]] = ("an SD record directory", "layout: python -c 'import "
                                            "unlearn.data.sd_record_files as m; help(m)'; `unlearn world export-sd "
                                            "--concept vorn --out DIR` writes one")
    weights_file: ClassVar[str] = "unet.safetensors"
    paper_defaults: ClassVar[dict] = SD_DEFAULTS
    world_defaults: ClassVar[dict] = {"lr": WORLD_LR}
    only_trained: ClassVar[bool] = True  # full fine-tuning saves only the trained UNet tensors
    summary: ClassVar[tuple[str, ...]] = ("ua", "fd", "fd_space", "K_C", "K_N")


    def read_records(self):
        from .data.sd_record_files import load_sd_record_data

        if self.forget is not None or self.retain is not None:
            raise ValueError("give the records either as a data directory or as forget/retain lists, not both")
        return load_sd_record_data(self.data, need_masks=self.algo.needs_masks)

    def validate(self) -> None:
        from .eval.sd import check_classifier_spec

        self.trace = "attention" if self.trace_attention else self.trace
        self.algo.needs_masks  # the method's mask options (dilation) checked
        if not self.on_world(self.model):  # a path typo or an unreachable hub id, before the run starts
            source = checked_source(self.model, PIPELINE_FILE)
            if Path(source).is_dir():  # a pipeline of a kind no adapter serves (SD3, Flux, ...)
                adapter_class(source)
        if int(self.trace_every) < 1 or (int(self.trace_every) != 1 and not self.trace):
            raise ValueError(f"trace_every={self.trace_every}: give a number of steps >= 1, together with trace "
                             f"(--trace-every K needs --trace or --trace-attention)")
        self.trace_every = int(self.trace_every)
        if self.trace_source not in ("probe", "step"):
            raise ValueError(f"trace_source must be probe or step, got {self.trace_source!r}")
        self.trace_batch = int(PROBE_BATCH if self.trace_batch is None else self.trace_batch)
        if self.trace_batch < 1:
            raise ValueError(f"trace_batch={self.trace_batch}: give a number of (timestep, image) pairs per probe "
                             f"forward >= 1")
        if self.trace_source == "step" and (not self.trace or self.trace_every != 1 or not self.algo.has_step_errors):
            raise ValueError(f"--trace-source step records each step's own errors (and attention maps): it needs "
                             f"--trace or --trace-attention (no --trace-every) and a method that computes them (fttp, "
                             f"fttp_dilated, ga; got {self.method!r})")
        self.check_eval_settings()  # before the evaluation target, whose world prompts import diffusers
        if self.data is not None:
            self.target = EvalTarget.from_data(self.records, self.retained)
            self.forget, self.retain = self.records.forget, self.records.retain
            if self.algo.needs_retain and not self.retain:
                raise ValueError(f"sd method {self.method!r} needs retain records; add {self.data}/retain.jsonl "
                                 f"(layout: help(unlearn.data.sd_record_files))")
        else:
            self.target = EvalTarget.world(self.key, self.retained)
        self.classifier = self.classifier or ("world" if self.data is None or self.on_world(self.model) else None)
        if self.classifier is None:
            raise ValueError(f"{self.model}: give the UA classifier off the world: --classifier clip:PATH (a local "
                             f"CLIP checkpoint), or --classifier world for a world SD")
        kind, path = check_classifier_spec(self.classifier)
        if kind == "clip":  # a folder that holds no checkpoint would fail only after the SD model is loaded
            checked_source(path, "config.json", what="--classifier clip: checkpoint")

    def check_eval_settings(self) -> None:
        """UA needs a generated image, the FD two on each side (generated: fd_seeds per retained concept;
        references: as many, or the fewer that eval.json gives). Retained: as given, else every other world
        concept, or eval.json's (unknown ones are the evaluation target's to report)."""
        from .world.concepts import BY_KEY

        if self.data is not None:
            references = self.records.eval.references
            given = [len(references[k]) for k in self.retained or references if k in references]
        else:
            given = [self.fd_seeds] * len(self.retained or [k for k in BY_KEY if k != self.key])
        bad = [f"--eval-seeds {self.eval_seeds} (must be >= 1)"] if self.eval_seeds < 1 else []
        if self.fd_seeds < 1 or self.fd_seeds * len(given) < 2 or sum(min(self.fd_seeds, n) for n in given) < 2:
            bad.append(f"--fd-seeds {self.fd_seeds} with {len(given)} retained concept(s) (the FD compares at least 2 "
                       f"generated and 2 reference images: fd-seeds x retained concepts >= 2)")
        if bad:
            raise ValueError(f"invalid evaluation settings: {'; '.join(bad)}")

    @staticmethod
    def load_model(model: str, world_dir=None, world_config=None):
        import torch
        from accelerate import PartialState

        from .models.sd import load_sd_adapter

        adapter = load_sd_adapter(resolve_model(model, "sd", world_dir, world_config))
        # VAE and text encoder beside the UNet (the loop only moves the UNet)
        adapter.pipe.to(PartialState(cpu=not torch.cuda.is_available()).device)
        return adapter

    def load_data(self) -> None:
        from .world.concepts import BY_KEY

        target, needs_masks = self.target, self.algo.needs_masks
        if self.forget is None:
            self.forget, world_retain = world_sd_data(target.key, self.images, self.adapter.resolution)
            self.retain = world_retain if self.retain is None else self.retain
        self.retain = self.retain or []
        self.images, self.key, self.names = len(self.forget), target.key, target.names
        if self.recorded_forget is not None and self.recorded_forget != [r.id for r in self.forget]:
            raise ValueError(f"{self.out}: the forget records {[r.id for r in self.forget]} are not the run's "
                             f"{self.recorded_forget}; was the run made with another world or data directory?")
        check_forget_records(self.forget, target.names, need_masks=needs_masks)
        if needs_masks:
            self.adapter.masks(self.forget, self.algo.mask_options)  # mask errors (size, empty, full)
        if self.algo.needs_retain and not self.retain:
            raise ValueError(f"sd method {self.method!r} needs retain records; none were given"
                             + (f" (add {self.data}/retain.jsonl)" if self.data is not None else ""))
        clf = target.classifier(self.classifier, self.world_dir)  # loaded (and its labels checked) before any write
        self.ua_classifier = clf  # kept: the forgetting audit asks it too
        self.evaluator = evaluator(self.adapter, target.key, self.forget, self.eval_seeds, self.fd_seeds,
                                   self.world_dir, target=target, classifier=clf)
        # one kept concept, to see what unlearning did to the others: on the world one of the same kind
        kind = BY_KEY[target.key].kind if target.spec is None else None
        neighbour = next((k for k in target.retained if k in BY_KEY and BY_KEY[k].kind == kind),
                         next(iter(target.retained)))
        self.sample_prompts = {target.label: target.prompts[0], neighbour: target.retained[neighbour]}

    def evaluate(self, stage: str) -> dict:
        return self.evaluator(0 if stage == "original" else self.cfg.steps)

    def save_samples(self, stage: str) -> None:
        """samples/<stage>_<label>_<i>.png: N_SAMPLES seeds of the concept's prompt and of its neighbour's."""
        from PIL import Image

        (self.out / "samples").mkdir(exist_ok=True)
        for label, prompt in self.sample_prompts.items():
            for i, img in enumerate(self.adapter.generate([prompt] * N_SAMPLES, list(range(N_SAMPLES)))):
                Image.fromarray(img).save(self.out / "samples" / f"{stage}_{label}_{i}.png")

    def attach(self, main, closing) -> list:
        if not (self.trace and main):  # the main process probes the unwrapped UNet; others train only
            return []
        from .loop import precision
        from .sd_tracing import SDStepErrorCallback, SDTraceCallback

        path, attrs = self.out / "trace.zarr", self.trace_attrs()
        if self.trace_source == "step":
            tracer = SDStepErrorCallback(self.adapter, self.algo, self.forget, path, attrs,
                                         attention=self.trace == "attention", names=self.names)
        else:  # records step -1 now
            tracer = SDTraceCallback(self.adapter, self.forget, path, attrs,
                                     attention=self.trace == "attention", names=self.names, every=self.trace_every,
                                     steps=self.cfg.steps, batch_size=self.trace_batch,
                                     precision=precision(self.cfg, self.adapter.model.device))
        closing.callback(tracer.close)
        return [tracer]

    def manifest_extras(self) -> dict:
        return {"records": {"forget": [r.id for r in self.forget], "retain": len(self.retain)},
                "trace": bool(self.trace), "trace_every": self.trace_every if self.trace else None,
                "trace_source": self.trace_source if self.trace else None,
                "trace_batch": self.trace_batch if self.trace and self.trace_source == "probe" else None,
                "eval": {"eval_seeds": self.eval_seeds, "fd_seeds": self.fd_seeds, "retained": self.retained,
                         "classifier": self.classifier}}

    @classmethod
    def from_manifest(cls, run: Path, manifest: dict, world_dir=None, **settings) -> SDRun:
        """The forget records come from the world, or from the run's data directory, which must still
        hold the same records; runs on records given only in Python to a model other than the world SD
        cannot be re-evaluated (their records are not stored)."""
        data = manifest.get("data", "world")
        if data != "world" and not Path(data).is_dir():
            raise FileNotFoundError(f"{run}: the run's data directory {data} is gone; re-evaluating needs its records")
        if data == "world" and not cls.on_world(manifest["model"]):
            raise ValueError(f"{run}: re-evaluating needs the run's forget records, which are stored only for world SD "
                             f"runs and runs from a data directory (--data); for {manifest['model']!r} call "
                             f"unlearn.eval.sd.evaluate_sd_run on load_run(run)[0].pipe with them")
        recorded = manifest.get("records", {}).get("forget")
        return super().from_manifest(run, manifest, world_dir, recorded_forget=recorded, **settings)


def run_sd(concept: str | None, method: str, out: Path, **settings) -> dict:
    """Run SD ``method`` on ``concept`` into ``out`` (``settings``: :class:`SDRun`'s fields); returns the
    metrics written to ``out/metrics.json``."""
    return SDRun(concept, method, out, **settings).run()

