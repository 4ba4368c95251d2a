"""One Stable Diffusion unlearning run, start to finish: load, evaluate the starting model, train,
evaluate, write the run directory (manifest, metrics, trained parameters, sample images).

Same layout as the MLLM side (:mod:`unlearn.run_mllm`): ``manifest.json``, ``metrics.json``,
``adapter/`` (LoRA) or ``weights/unet.safetensors`` (full fine-tuning: only the trained UNet
tensors), ``samples/*.png``. ``metrics.json`` holds ``ua``, ``fd`` (and ``fd_space``, the feature
space it is computed in), ``steps``, ``images``, ``K_C``, ``K_N``, and the same for the starting
model under ``original``.

Defaults follow the paper's SD setting: full fine-tuning of the UNet with Adam, lr 1e-5, batch 2;
FTTP about 20 steps from 5 images. On the world SD the default lr is 3e-5 (``WORLD_LR``, measured),
and the forget records are rendered images with exact masks
(:func:`unlearn.world.records.world_sd_data`); other models take user records.

Bad input stops the run before the run directory is created (unknown concept/method/option,
missing image, prompt that does not name the concept, mask of the wrong size, empty/full mask);
if training or evaluation fails later, a run directory this call created is removed again.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import torch

from .data.sd_records import SDRecord, check_forget_records
from .eval.sd import PROBE_BATCH
from .loop import TrainConfig, run_loop
from .methods import get_method
from .runs import git_commit, prepare_run_dir, run_dir_lock, split_options, versions, write_json
from .world.records import world_fd_reference, world_sd_data
from .world.source import classifier_from_spec, resolve_model

SD_DEFAULTS = {"lr": 1e-5, "batch_size": 2, "lora": False}  # the paper's SD setting (full UNet fine-tuning)
# the world SD's UNet has 1M parameters, not 860M: measured FTTP on vorn, 20 steps, 5 images, 20 seeds
# (docs/sd.md): lr 1e-5 UA 5 -> 0 (nothing forgotten); 3e-5 UA 90, other concepts kept 55-95%;
# 5e-5 UA 100 but other concepts 0-70%; 1e-4 UA 100, other concepts 0%. So 3e-5 on the world.
WORLD_LR = 3e-5
N_SAMPLES = 4  # sample images saved per prompt and model


def train_config(values: dict, world: bool = False) -> TrainConfig:
    from .run_mllm import _train_config

    defaults = {**SD_DEFAULTS, **({"lr": WORLD_LR} if world else {})}
    return _train_config({**defaults, **values})


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


def evaluator(adapter, concept_key: str, forget: list[SDRecord], n_seeds: int, fd_seeds: int, steps: int,
              world_dir=None, retained=None, *, target: EvalTarget | None = None, classifier=None):
    """fn(train_steps) -> metrics of the pipeline as it is now, by :func:`unlearn.eval.sd.evaluate_sd_run`:
    UA with ``classifier`` (default: the world classifier), FD in the classifier's feature space
    (named in ``fd_space``) against the world's test renders or the data directory's reference
    images, K_C / K_N on the forget records at fixed noise."""
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


def save_samples(adapter, prompts: dict[str, str], out: Path, tag: str) -> None:
    from PIL import Image

    for label, prompt in prompts.items():
        images = adapter.generate([prompt] * N_SAMPLES, list(range(N_SAMPLES)))
        for i, img in enumerate(images):
            Image.fromarray(img).save(out / f"{tag}_{label}_{i}.png")


def save_weights(model, out: Path, lora: bool) -> Path:
    """Only the trained parameters, as safetensors: the LoRA adapter, or the trained UNet tensors."""
    if lora:
        model.save_pretrained(out / "adapter")
        return out / "adapter"
    from safetensors.torch import save_file

    (out / "weights").mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad},
              out / "weights" / "unet.safetensors")
    return out / "weights"


def run_sd(concept: str | None, method: str, out: Path, steps: int = 20, seed: int = 0, model: str = "world",
           images: int = 5, options: dict | None = None, world_dir=None, eval_seeds: int = 20, fd_seeds: int = 10,
           retained: list[str] | None = None,
           forget: list[SDRecord] | None = None, retain: list[SDRecord] | None = None, progress: bool = True,
           overwrite: bool = False, callbacks=(), trace: bool | str = False, data: Path | None = None,
           classifier: str | None = None, trace_every: int = 1, trace_source: str = "probe",
           trace_batch: int | None = None) -> dict:
    """Run SD ``method`` on ``concept``; returns the metrics written to ``out/metrics.json``.

    ``trace``: per-step ``eps_err``, K_C / K_N of the forget images (a fixed-noise probe before
    training, step -1, and after every step; :mod:`unlearn.sd_tracing`) in ``out/trace.zarr``;
    ``trace="attention"``: also the probe's cross-attention maps over the prompt tokens (``xattn``).
    ``trace_every``: probe after every k-th step (and the last) only; one probe costs about 1.8
    training steps on the world SD. ``trace_batch``: (timestep, image) pairs per probe forward
    (default :data:`unlearn.eval.sd.PROBE_BATCH`; lower it if the probe runs out of memory on a
    large model). ``trace_source="step"``: record each step's own per-pixel errors
    instead of probing (nearly free; FTTP, FwD and GA only; :class:`unlearn.sd_tracing.SDStepErrorCallback`).

    ``data``: an SD record directory (:mod:`unlearn.data.sd_record_files`: forget/retain records,
    UA prompts, retained concepts with FD reference images); the way to run on a real checkpoint.
    ``concept`` may then be None (the name in ``concept.json``). ``classifier``: ``"world"`` (the
    default on the world SD) or ``"clip:PATH"`` (zero-shot CLIP from a local checkpoint; needed off
    the world). ``retained``: a subset of the retained concepts to evaluate (world keys, or labels of
    eval.json). ``forget``/``retain``: records given in Python, for a world concept; on the world they
    default to :func:`world_sd_data` with ``images`` forget images.
    """
    from accelerate import PartialState

    from .eval.sd import check_classifier_spec
    from .models.sd import WORLD_MARKER, load_sd_adapter
    from .world.concepts import get_concept

    timings = {}
    train_opts, method_opts = split_options(method, dict(options or {}), "sd")
    is_world = model == "world" or (Path(model) / WORLD_MARKER).exists()
    cfg = train_config({**train_opts, "steps": steps, "seed": seed}, world=is_world)
    algo = get_method(method, modality="sd", **method_opts)  # validates before anything is loaded or written
    if int(trace_every) < 1 or (int(trace_every) != 1 and not trace):
        raise ValueError(f"trace_every={trace_every}: give a number of steps >= 1, together with trace "
                         f"(--trace-every K needs --trace or --trace-attention)")
    if trace_source not in ("probe", "step"):
        raise ValueError(f"trace_source must be probe or step, got {trace_source!r}")
    trace_batch = PROBE_BATCH if trace_batch is None else trace_batch
    if int(trace_batch) < 1:
        raise ValueError(f"trace_batch={trace_batch}: give a number of (timestep, image) pairs per probe forward >= 1")
    if trace_source == "step" and (trace is not True or int(trace_every) != 1 or not algo.has_step_errors):
        raise ValueError(f"--trace-source step records each step's own errors: it needs --trace (no attention, no "
                         f"--trace-every) and a method that computes them (fttp, fttp_dilated, ga; got {method!r})")
    needs_masks = algo.needs_masks
    if data is not None:
        from .data.sd_record_files import load_sd_record_data

        if forget is not None or retain is not None:
            raise ValueError("give the records either as a data directory or as forget/retain lists, not both")
        data = Path(data).resolve()
        rd = load_sd_record_data(data, need_masks=needs_masks)  # every record checked, nothing loaded yet
        if concept is not None and concept.lower() not in {n.lower() for n in rd.names}:
            raise ValueError(f"concept {concept!r} is not the concept of {data} ({rd.name}; aliases: "
                             f"{', '.join(rd.aliases) or 'none'}); pass --concept {rd.name!r} or leave it out")
        target = EvalTarget.from_data(rd, retained)
        forget, retain = rd.forget, rd.retain
    else:
        if forget is None and not is_world:
            raise ValueError(f"{model}: runs on models other than the world SD need their data as an SD record "
                             f"directory: give --data DIR (layout: python -c 'import unlearn.data.sd_record_files as m; "
                             f"help(m)'; `unlearn world export-sd --concept vorn --out DIR` writes an example)")
        if concept is None:
            raise ValueError("give the concept (a world concept key or name), or a data directory")
        target = EvalTarget.world(get_concept(concept).key, retained)
    classifier = classifier or ("world" if data is None or is_world else None)
    if classifier is None:
        raise ValueError(f"{model}: give the UA classifier off the world: --classifier clip:PATH (a local CLIP "
                         f"checkpoint), or --classifier world for a world SD")
    check_classifier_spec(classifier)
    t = time.perf_counter()
    adapter = load_sd_adapter(resolve_model(model, "sd", world_dir))
    if forget is None:
        forget, world_retain = world_sd_data(target.key, images, adapter.resolution)
        retain = world_retain if retain is None else retain
    retain = retain or []
    images = len(forget)
    check_forget_records(forget, target.names, need_masks=needs_masks)
    if needs_masks:
        adapter.masks(forget, algo.mask_options)  # mask errors (size, empty, full) before any write
    if algo.needs_retain and not retain:
        raise ValueError(f"sd method {method!r} needs retain records; none were given"
                         + (f" (add {data}/retain.jsonl)" if data is not None else ""))
    clf = target.classifier(classifier, world_dir)  # loaded (and its labels checked) before any write
    timings["load"] = time.perf_counter() - t
    state = PartialState(cpu=not torch.cuda.is_available())
    adapter.pipe.to(state.device)  # VAE and text encoder beside the UNet (the loop only moves the UNet)
    # one process at a time writes a run directory (a second gets a clear error instead of a mixed run)
    with run_dir_lock(out, enabled=state.is_main_process):
        created = not Path(out).exists() or not any(Path(out).iterdir())
        with state.main_process_first():
            out = prepare_run_dir(out, overwrite)
        try:
            evaluate = evaluator(adapter, target.key, forget, eval_seeds, fd_seeds, cfg.steps, world_dir,
                                 target=target, classifier=clf)
            eval_settings = {"eval_seeds": eval_seeds, "fd_seeds": fd_seeds, "retained": retained,
                             "classifier": classifier}
            return _run(adapter, algo, target, method, out, cfg, forget, retain, images, model, seed, evaluate,
                        timings, progress, callbacks, eval_settings, trace, data, int(trace_every), trace_source,
                        int(trace_batch))
        except BaseException:
            if created and state.is_main_process:
                shutil.rmtree(out, ignore_errors=True)  # nothing half-written is left
            raise


def _run(adapter, algo, target, method, out, cfg, forget, retain, images, model, seed, evaluate, timings, progress,
         callbacks, eval_settings, trace=False, data=None, trace_every=1, trace_source="probe",
         trace_batch=PROBE_BATCH) -> dict:
    t = time.perf_counter()
    original = evaluate(0)
    timings["eval_original"] = time.perf_counter() - t
    from .world.concepts import BY_KEY

    # one kept concept, to see what unlearning did to the others: on the world one of the same kind
    kind = BY_KEY[target.key].kind if target.spec is None else None
    neighbour = next((k for k in target.retained if k in BY_KEY and BY_KEY[k].kind == kind), next(iter(target.retained)))
    sample_prompts = {target.label: target.prompts[0], neighbour: target.retained[neighbour]}
    from accelerate import PartialState

    if PartialState().is_main_process:
        (out / "samples").mkdir(exist_ok=True)
        save_samples(adapter, sample_prompts, out / "samples", "original")
    tracer = None
    if trace and PartialState().is_main_process:  # the main process probes the unwrapped UNet; others train only
        from .sd_tracing import SDStepErrorCallback, SDTraceCallback

        attrs = {"model": model, "method": {"name": method, **dataclasses.asdict(algo)}, "seed": seed,
                 "versions": versions(), "git_commit": git_commit()}
        if trace_source == "step":
            tracer = SDStepErrorCallback(adapter, algo, forget, out / "trace.zarr", attrs)
        else:
            tracer = SDTraceCallback(adapter, forget, out / "trace.zarr", attrs, attention=trace == "attention",
                                     names=target.names, every=trace_every, steps=cfg.steps,
                                     batch_size=trace_batch)  # records step -1 now
        callbacks = [*callbacks, tracer]
    try:
        result = run_loop(adapter, algo, forget, retain if algo.needs_retain else [], cfg, target.key, target.names,
                          callbacks=callbacks, progress=progress)
    finally:
        if tracer is not None:
            tracer.close()
    timings["train"] = result["train_seconds"]
    accelerator = result["accelerator"]
    t = time.perf_counter()
    after = evaluate(cfg.steps)
    timings["eval"] = time.perf_counter() - t
    metrics = {**after, "steps": cfg.steps, "images": images, "method": method, "concept": target.key,
               "original": original}
    if accelerator.is_main_process:
        save_weights(adapter.model, out, cfg.lora)
        save_samples(adapter, sample_prompts, out / "samples", "unlearned")
        write_json(out / "metrics.json", metrics)
        write_json(out / "manifest.json", {
            "kind": "sd", "model": model, "concept": target.key, "names": list(target.names), "method": method,
            "data": str(data) if data is not None else "world",
            "method_options": dataclasses.asdict(algo), "train": dataclasses.asdict(cfg), "seed": seed,
            "images": images, "records": {"forget": [r.id for r in forget], "retain": len(retain)}, "trace": bool(trace),
            "trace_every": trace_every if trace else None, "trace_source": trace_source if trace else None,
            "trace_batch": trace_batch if trace and trace_source == "probe" else None,
            "eval": eval_settings, "versions": versions(), "git_commit": git_commit(), "timings_seconds": timings,
            "world_size": result["world_size"], "mixed_precision": result["mixed_precision"],
            "history": result["history"],
        })
    return metrics


def load_run(run: Path, world_dir=None):
    """The SD adapter of a finished run: the starting pipeline plus the run's trained parameters."""
    import json

    from .models.sd import load_sd_adapter

    run = Path(run)
    if not (run / "manifest.json").exists():
        raise FileNotFoundError(f"{run} is not a run directory (no manifest.json)")
    manifest = json.loads((run / "manifest.json").read_text())
    adapter = load_sd_adapter(resolve_model(manifest["model"], "sd", world_dir))
    if manifest["train"]["lora"]:
        from peft import PeftModel

        adapter.model = PeftModel.from_pretrained(adapter.model, run / "adapter").eval()
    else:
        from safetensors.torch import load_file

        missing = adapter.model.load_state_dict(load_file(run / "weights" / "unet.safetensors"), strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"{run}: weights do not fit the model's UNet: {missing.unexpected_keys[:5]}")
    return adapter, manifest


def evaluate_run(run: Path, world_dir=None, eval_seeds: int | None = None, fd_seeds: int | None = None) -> dict:
    """Re-evaluate a finished SD run from its directory (``unlearn eval RUN``): the starting pipeline plus
    the run's trained parameters, the same evaluation as at the end of the run (the run's own
    ``eval_seeds`` / ``fd_seeds`` / retained concepts / classifier unless given), so on the same
    machine it reproduces the run's ``metrics.json``. The forget records come from the world, or
    from the run's data directory (``manifest["data"]``), which must still hold the same records.
    Runs on records given only in Python to a model other than the world SD cannot be re-evaluated
    (their records are not stored): that is an error saying so.
    """
    from .models.sd import WORLD_MARKER
    from .world.concepts import get_concept

    adapter, manifest = load_run(run, world_dir=world_dir)
    if manifest.get("kind") != "sd":
        raise ValueError(f"{run} is a {manifest.get('kind')!r} run, not an SD run")
    model, data = manifest["model"], manifest.get("data", "world")
    settings = manifest.get("eval", {})
    if data != "world":
        from .data.sd_record_files import load_sd_record_data

        if not Path(data).is_dir():
            raise FileNotFoundError(f"{run}: the run's data directory {data} is gone; re-evaluating needs its records")
        rd = load_sd_record_data(Path(data))
        target, forget = EvalTarget.from_data(rd, settings.get("retained")), rd.forget
    else:
        if not (model == "world" or (Path(model) / WORLD_MARKER).exists()):
            raise ValueError(f"{run}: re-evaluating needs the run's forget records, which are stored only for world SD "
                             f"runs and runs from a data directory (--data); for {model!r} call "
                             f"unlearn.eval.sd.evaluate_sd_run on load_run(run)[0].pipe with them")
        c = get_concept(manifest["concept"])
        forget, _ = world_sd_data(c.key, manifest["images"], adapter.resolution, n_retain=0, n_surrogate=0)
        target = EvalTarget.world(c.key, settings.get("retained"))
    recorded = manifest.get("records", {}).get("forget")
    if recorded is not None and recorded != [r.id for r in forget]:
        raise ValueError(f"{run}: the forget records {[r.id for r in forget]} are not the run's {recorded}; "
                         f"was the run made with another world or data directory?")
    clf = target.classifier(settings.get("classifier", "world"), world_dir)
    evaluate = evaluator(adapter, target.key, forget, eval_seeds or settings.get("eval_seeds", 20),
                         fd_seeds or settings.get("fd_seeds", 10), manifest["train"]["steps"], world_dir,
                         target=target, classifier=clf)
    after = evaluate(manifest["train"]["steps"])
    return {**after, "steps": manifest["train"]["steps"], "images": manifest["images"], "method": manifest["method"],
            "concept": target.key}
