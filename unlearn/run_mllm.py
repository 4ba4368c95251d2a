"""One MLLM unlearning run, start to finish: load, evaluate the starting model, train, evaluate,
write the run directory (manifest, metrics, trained parameters, samples).

On the world (the default) the concept's data comes from the world's splits: the forget set is
every question about the concept on its unlearning image(s) plus its text facts; retain data (for
the methods that use it) is the other concepts' records. Any other model (LLaVA-1.5, Qwen2-VL, a
world MLLM directory) takes its data from a directory of record files
(:mod:`unlearn.data.record_files`; ``unlearn world export`` writes a world concept that way).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from .data.record_files import load_record_data
from .eval.mllm import MLLMEvalSet, evaluate
from .loop import TrainConfig, run_loop, save_trained
from .methods import get_method
from .runs import git_commit, prepare_run_dir, run_dir_lock, split_options, versions, write_json
from .world.records import ImageBank, world_eval_set, world_method_options, world_records
from .world.source import resolve_model

WORLD_MARKER = "world_mllm_config.json"  # a directory holding a world MLLM


def _train_config(values: dict) -> TrainConfig:
    defaults = TrainConfig()
    typed = {}
    for k, v in values.items():
        d = getattr(defaults, k)
        if isinstance(v, str) and isinstance(d, bool):
            typed[k] = v.lower() in ("1", "true", "yes")
        elif isinstance(v, str) and not isinstance(d, str):
            try:
                typed[k] = type(d)(v)
            except ValueError:
                raise ValueError(f"{k} must be a {type(d).__name__}, got {v!r}") from None
        else:
            typed[k] = v
    return dataclasses.replace(defaults, **typed)


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


def _record_data(concept: str, data: Path):
    rd = load_record_data(data)
    if concept.lower() not in {n.lower() for n in rd.names}:
        raise ValueError(f"concept {concept!r} is not the concept of {data} ({rd.name}; aliases: "
                         f"{', '.join(rd.aliases) or 'none'}); pass --concept {rd.name!r}")
    return rd


@dataclasses.dataclass
class RunData:
    key: str  # the concept's key (world) or name (record files)
    names: tuple[str, ...]
    forget: list
    retain: list
    evalset: MLLMEvalSet
    images: int  # distinct training images
    method_defaults: dict = dataclasses.field(default_factory=dict)  # options the data fills where the user gave none


def load_run_data(concept: str, data: Path | None, image_size: int | None, images: int = 1) -> RunData:
    """The concept's training and evaluation records: from the world, or from a record directory."""
    if data is None:
        from .world.concepts import get_concept

        c, forget, retain = world_data(get_concept(concept).key, images, image_size=image_size)
        return RunData(c.key, c.names, forget, retain, world_eval_set(c.key, image_size, n_images=images), images,
                       world_method_options(c.key))
    rd = _record_data(concept, data)
    n_images = len({r.image.tobytes() for r in rd.forget if r.image is not None})
    return RunData(rd.name, rd.names, rd.forget, rd.retain,
                   MLLMEvalSet(rd.efficacy, rd.test, rd.specificity, rd.forget), n_images)


def run_mllm(concept: str, method: str, out: Path, steps: int = 10, seed: int = 0, model: str = "world",
             images: int = 1, options: dict | None = None, world_dir=None, world_config=None, progress: bool = True,
             overwrite: bool = False, callbacks=(), trace: bool = False, data: Path | None = None,
             trace_attention: bool = False, eval_every: int = 0) -> dict:
    """Run ``method`` on ``concept``; returns the metrics written to ``out/metrics.json``.

    ``trace``: per-step token log-probs and K_C / K_N of the forget answers in ``out/trace.zarr``;
    ``trace_attention``: also the training image's questions as probes with cross-attention maps
    (before training and after every step, the trace's ``probe`` group).
    ``eval_every``: also evaluate after every that many steps (and the last), into ``metrics["curve"]``.
    ``data``: a directory of record files (:mod:`unlearn.data.record_files`); required for models
    other than the world's, optional for the world (default: the world's own splits, ``images``
    training images).
    """
    from accelerate import PartialState

    from .models import load_mllm
    from .world.concepts import get_concept

    timings = {}
    train_opts, method_opts = split_options(method, dict(options or {}))
    cfg = _train_config({**train_opts, "steps": steps, "seed": seed})
    algo = get_method(method, **method_opts)  # validates before anything is loaded or written
    if data is None and model != "world" and not (Path(model) / WORLD_MARKER).exists():
        raise ValueError(f"{model}: a model other than the world MLLM needs its data as record files: give "
                         f"--data DIR (layout: python -c 'import unlearn.data.record_files as m; help(m)'; "
                         f"`unlearn world export --concept oskel --out DIR` writes an example)")
    if data is None:
        get_concept(concept)  # an unknown world concept fails before anything is loaded or written
    else:
        data = Path(data).resolve()
        _record_data(concept, data)  # bad records fail before anything is loaded or written
    state = PartialState(cpu=not torch.cuda.is_available())
    # one process at a time writes a run directory (a second gets a clear error instead of a mixed run)
    with run_dir_lock(out, enabled=state.is_main_process):
        t = time.perf_counter()
        # the main process builds the world / creates the run directory first; the others then reuse them
        with state.main_process_first():
            out = prepare_run_dir(out, overwrite)
            adapter = load_mllm(resolve_model(model, "mllm", world_dir, world_config))
        rd = load_run_data(concept, data, _image_size(adapter), images)
        forget, retain, evalset, images = rd.forget, rd.retain, rd.evalset, rd.images
        timings["load"] = time.perf_counter() - t
        t = time.perf_counter()
        original = evaluate(adapter, evalset, rd.names)
        timings["eval_original"] = time.perf_counter() - t
        tracer = None
        # per-step token log-probs and K_C/K_N of the forget answers -> out/trace.zarr, on the main process
        # (with several processes it sees its own slice of each step's records; the others' are NaN)
        if (trace or trace_attention) and state.is_main_process:
            from .tracing import start_tracer

            attrs = {"model": model, "method": {"name": method, **dataclasses.asdict(algo)}, "seed": seed,
                     "versions": versions(), "git_commit": git_commit()}
            probe_records = [r for r in evalset.efficacy if r.image is not None]
            tracer = start_tracer(adapter, out / "trace.zarr", forget, rd.names, attrs, probe_records, trace_attention)
            _save_sample_images(out, forget, probe_records)
            callbacks = [*callbacks, tracer]
        curve = None
        if eval_every:
            from .eval.curve import EvalEvery

            curve = EvalEvery(adapter, evalset, rd.names, eval_every, cfg.steps,
                              pause=tracer.paused if tracer else None)
            callbacks = [*callbacks, curve]
        # the manifest keeps the options as given; training sees the data's defaults for the empty ones
        filled = {k: v for k, v in rd.method_defaults.items() if getattr(algo, k, None) == ""}
        trained = dataclasses.replace(algo, **filled) if filled else algo
        try:
            result = run_loop(adapter, trained, forget, retain if algo.needs_retain else [], cfg, rd.key, rd.names,
                              callbacks=callbacks, progress=progress)
        finally:
            if tracer is not None:
                tracer.__exit__(None, None, None)
        timings["train"] = result["train_seconds"]
        accelerator = result["accelerator"]
        t = time.perf_counter()
        after = evaluate(adapter, evalset, rd.names)
        timings["eval"] = time.perf_counter() - t
        metrics = {k: v for k, v in after.items() if k != "samples"}
        metrics.update(steps=cfg.steps, images=images, method=method, concept=rd.key,
                       original={k: v for k, v in original.items() if k != "samples"})
        if curve is not None:
            metrics["curve"] = curve.rows
        if accelerator.is_main_process:
            save_trained(adapter.model, out, cfg.lora)
            (out / "samples").mkdir(exist_ok=True)
            write_json(out / "samples" / "answers.json",
                       {"original": original["samples"], "unlearned": after["samples"]})
            write_json(out / "metrics.json", metrics)
            write_json(out / "manifest.json", {
                "kind": "mllm", "model": model, "concept": rd.key, "names": list(rd.names), "method": method,
                "data": str(data) if data is not None else "world",
                "method_options": dataclasses.asdict(algo), "train": dataclasses.asdict(cfg), "seed": seed,
                "images": images, "records": {"forget": len(forget), "retain": len(retain)},
                "versions": versions(), "git_commit": git_commit(), "timings_seconds": timings,
                "world_size": result["world_size"], "mixed_precision": result["mixed_precision"],
                "history": result["history"],
            })
        return metrics


def evaluate_run(run: Path, world_dir=None, world_config=None) -> dict:
    """Re-evaluate a finished run from its directory: the starting model plus the trained parameters."""
    import json

    from .models import load_mllm

    run = Path(run)
    manifest_path = run / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{run} is not a run directory (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    adapter = load_mllm(resolve_model(manifest["model"], "mllm", world_dir, world_config))
    if manifest["train"]["lora"]:
        from peft import PeftModel

        adapter.model = PeftModel.from_pretrained(adapter.model, run / "adapter").eval()
    else:
        from safetensors.torch import load_file

        adapter.model.load_state_dict(load_file(run / "weights" / "model.safetensors"))
    data = manifest.get("data", "world")
    rd = load_run_data(manifest["concept"], None if data == "world" else Path(data), _image_size(adapter),
                       manifest["images"])
    metrics = evaluate(adapter, rd.evalset, rd.names)
    metrics.pop("samples")
    return metrics


def _image_size(adapter) -> int | None:
    """The world MLLM's image side (world images are rendered at it); None for other processors."""
    crop = getattr(adapter.processor.image_processor, "crop_size", None)
    try:
        return int(crop["height"])
    except (TypeError, KeyError):
        return None


def _save_sample_images(out: Path, forget, probes) -> None:
    """The traced samples' images, for attention underlays: samples/sample-N.png (forget record N)
    and samples/probe-N.png (probe N)."""
    (out / "samples").mkdir(exist_ok=True)
    for prefix, records in (("sample", forget), ("probe", probes)):
        for n, r in enumerate(records):
            if r.image is not None:
                r.image.save(out / "samples" / f"{prefix}-{n}.png")
