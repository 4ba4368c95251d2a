"""One MLLM unlearning run (the skeleton is :class:`unlearn.runs.Run`): what differs for an MLLM is
loading the model and the concept's records (on the world: every question about the concept on its
unlearning image(s) plus its text facts; the other concepts' records to retain), the evaluation
(efficacy, EM, specificity, diversity, K_C / K_N), the knowtrace tracer and the evaluation curve.

Defaults: the paper's (LoRA, Adam lr 3e-4, batch 2, 10 steps) on real checkpoints; on the world MLLM the
world's calibrated lr 3e-3 (``WORLD_LR``; docs/methods.md: at 3e-4 the 2.35M-parameter world model forgets
nothing in 10 steps), recorded in the manifest as ``"defaults": {"world-calibrated": ["lr"]}``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

from .data.record_files import load_record_data
from .eval.mllm import MLLMEvalSet, evaluate
from .models import CHECKPOINT_FILE
from .models.source import checked_source
from .runs import Run, write_json
from .runs import evaluate_run  # noqa: F401  (unlearn eval RUN: any kind of run)
from .world.records import ImageBank, world_eval_set, world_method_options, world_records
from .world.source import resolve_model

# the smallest lr of the grid at which plain GA stops naming the concept in 10 steps (docs/methods.md)
WORLD_LR = 3e-3


def world_data(concept_key: str, n_images: int, world_seed: int = 0, image_size: int = 48):
    from .world.concepts import BY_KEY, CONCEPTS
    from .world.texts import ImageRef, concept_split, fact_records, identify_qa

    split = concept_split(concept_key, n_unlearn=n_images, world_seed=world_seed)
    bank = ImageBank(image_size, world_seed)
    forget = world_records(split.forget, bank)
    # retain data for the methods that use one: other concepts on their own unlearning-split images
    others = [c for c in CONCEPTS if c.key != concept_key]
    retain = world_records([identify_qa(c, ImageRef(c.key, "unlearn", 0)) for c in others] + fact_records(others), bank)
    return BY_KEY[concept_key], forget, retain


@dataclasses.dataclass
class MLLMRun(Run):
    """An MLLM run. ``trace``: per-step token log-probs and K_C / K_N of the forget answers in
    ``out/trace.zarr``; ``trace_attention``: also the training image's questions as probes with
    cross-attention maps (before training and after every step, the trace's ``probe`` group).
    ``eval_every``: also evaluate after every that many steps (and the last), into ``metrics["curve"]``."""
    trace_attention: bool = False
    eval_every: int = 0
    evalset: MLLMEvalSet | None = dataclasses.field(default=None, init=False, repr=False)  # loaded
    answers: dict = dataclasses.field(default_factory=dict, init=False, repr=False)  # stage -> sample answers
    curve: object = dataclasses.field(default=None, init=False, repr=False)  # EvalEvery, with eval_every

    kind: ClassVar[str] = "mllm"
    world_marker: ClassVar[str] = "world_mllm_config.json"  # a directory holding a world MLLM
    data_help: ClassVar[tuple[str, str]] = ("record files", "layout: python -c 'import unlearn.data.record_files as m; "
                                            "help(m)'; `unlearn world export --concept oskel --out DIR` writes one")
    weights_file: ClassVar[str] = "model.safetensors"
    world_defaults: ClassVar[dict] = {"lr": WORLD_LR}
    only_trained: ClassVar[bool] = False  # full fine-tuning saves every parameter of the model
    summary: ClassVar[tuple[str, ...]] = ("efficacy", "em", "specificity", "diversity", "K_C", "K_N")


    def read_records(self):
        return load_record_data(self.data)

    def validate(self) -> None:
        if not self.on_world(self.model):  # a path typo or an unreachable hub id, before the run starts
            checked_source(self.model, CHECKPOINT_FILE)
        if self.trace_attention and self.records is not None and all(r.image is None for r in self.records.efficacy):
            raise ValueError(f"--trace-attention traces the efficacy questions on an image, and {self.data} has none "
                             f"(efficacy.jsonl, else the forget records): add records with an image, or drop "
                             f"--trace-attention")

    @staticmethod
    def load_model(model: str, world_dir=None, world_config=None):
        import torch
        from accelerate import PartialState

        from .models import load_mllm

        adapter = load_mllm(resolve_model(model, "mllm", world_dir, world_config))
        # on the device from the start: the evaluation before training and the tracer's probes run there too
        adapter.model.to(PartialState(cpu=not torch.cuda.is_available()).device)
        return adapter

    def load_data(self) -> None:
        image_size = self.adapter.crop_side  # world images are rendered at the world MLLM's image side
        if self.data is None:
            c, self.forget, self.retain = world_data(self.key, self.images, image_size=image_size)
            self.names, self.method_defaults = c.names, world_method_options(self.key)
            self.evalset = world_eval_set(self.key, image_size, n_images=self.images)
        else:
            rd = self.records
            self.key, self.names, self.forget, self.retain = rd.name, rd.names, rd.forget, rd.retain
            self.evalset = MLLMEvalSet(rd.efficacy, rd.test, rd.specificity, rd.forget)
            self.images = len({r.image.tobytes() for r in rd.forget if r.image is not None})  # distinct images
        ev = self.evalset  # a record the model's family cannot take is an error before the run directory is made
        self.adapter.check_records([*self.forget, *self.retain, *ev.efficacy, *ev.test, *ev.retain])
        if self.trace_attention:  # so is a family whose image positions have no grid to record
            from knowtrace.mllm_attention import image_layout

            image_layout(self.adapter.model)

    def evaluate(self, stage: str) -> dict:
        metrics = evaluate(self.adapter, self.evalset, self.names)
        self.answers[stage] = metrics.pop("samples")
        if stage == "unlearned" and self.curve is not None:
            metrics["curve"] = self.curve.rows
        return metrics

    def attach(self, main, closing) -> list:
        callbacks, tracer = [], None
        # per-step token log-probs and K_C/K_N of the forget answers -> out/trace.zarr, on the main process
        # (with several processes it sees its own slice of each step's records; the others' are NaN)
        if (self.trace or self.trace_attention) and main:
            from .tracing import start_tracer

            probe_records = [r for r in self.evalset.efficacy if r.image is not None]
            from .loop import precision

            tracer = start_tracer(self.adapter, self.out / "trace.zarr", self.forget, self.names, self.trace_attrs(),
                                  probe_records, self.trace_attention, precision(self.cfg, self.adapter.model.device))
            closing.push(tracer)  # entered by start_tracer: exited after training
            # the traced images, for attention underlays: samples/sample-N.png (forget record N), probe-N.png
            (self.out / "samples").mkdir(exist_ok=True)
            for prefix, records in (("sample", self.forget), ("probe", probe_records)):
                for n, r in enumerate(records):
                    if r.image is not None:
                        r.image.save(self.out / "samples" / f"{prefix}-{n}.png")
            callbacks.append(tracer)
        if self.eval_every:
            from .eval.curve import EvalEvery

            self.curve = EvalEvery(self.adapter, self.evalset, self.names, self.eval_every, self.cfg.steps,
                                   pause=tracer.paused if tracer else None)
            callbacks.append(self.curve)
        return callbacks

    def save_samples(self, stage: str) -> None:
        path = self.out / "samples" / "answers.json"
        path.parent.mkdir(exist_ok=True)
        if "original" not in self.answers and path.exists():  # a resumed run: the first part wrote them
            self.answers = {**json.loads(path.read_text()), **self.answers}
        write_json(path, self.answers)

    def manifest_extras(self) -> dict:
        return {"records": {"forget": len(self.forget), "retain": len(self.retain)}}


def run_mllm(concept: str, method: str, out: Path, **settings) -> dict:
    """Run MLLM ``method`` on ``concept`` into ``out`` (``settings``: :class:`MLLMRun`'s fields); returns
    the metrics written to ``out/metrics.json``."""
    return MLLMRun(concept, method, out, **settings).run()
