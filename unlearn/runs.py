"""One run, start to finish, the same for every kind (MLLM, SD, ...), and its run directory:
``manifest.json`` (resolved config, seed, versions, git commit, timings), ``metrics.json``, the
trained parameters (safetensors; an inference-time method such as SAUCE: what it saves instead,
``intervention.json``), ``samples/``, ``trace.zarr``; each file complete or absent.

A kind is a :class:`Run` subclass in ``unlearn/run_<kind>.py`` (:func:`run_kind`) supplying only
what differs; :func:`evaluate_run` reloads any kind.

A run's state is on disk from its first moment: bad input fails before the directory is touched; then
the manifest says ``running``, ``trained`` (parameters saved, final evaluation under way), ``complete``,
``failed`` (with the error) or ``interrupted`` (Ctrl-C, SIGTERM; a run whose process died without
saying so reads as interrupted, its lock being free: :func:`run_state`). What an unfinished run wrote
stays (its trace up to the last step, its checkpoint): ``--resume`` goes on from the checkpoint
(``checkpoint_every``), ``unlearn eval`` finishes a ``trained`` run, ``--overwrite`` starts again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from knowtrace.files import write_json  # noqa: F401  (unlearn.runs.write_json, as before)
from knowtrace.run_lock import live_state, run_dir_lock

from .intervene import apply_method
from .loop import TrainConfig, run_loop
from .methods import get_method
from .methods.base import _coerce


def versions() -> dict[str, str]:
    from . import __version__

    libraries = ("torch", "transformers", "diffusers", "peft", "accelerate")
    return {"unlearn": __version__, "python": platform.python_version(),
            **{name: importlib.import_module(name).__version__ for name in libraries}}


def git_commit() -> str | None:
    """The toolkit's commit (and "+dirty" with uncommitted changes), or None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def mark_non_finite(metrics: dict) -> dict:
    """A metric that came out NaN or inf is no score: it becomes None and is named in ``invalid``."""
    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    if not bad:
        return metrics
    return {**metrics, **dict.fromkeys(bad), "invalid": bad}


# what a run writes into its directory; --overwrite removes these (and nothing else) first, and so
# does a failed run
RUN_ARTIFACTS = ("manifest.json", "metrics.json", "trace.zarr", "adapter", "weights", "samples", "plots",
                 "report.html", "summary.txt", "checkpoint", ".checkpoint.old", ".checkpoint.partial",
                 "intervention.json", "sae")  # the last two: an inference-time method's (SAUCE)
RUN_ARTIFACT_PATTERNS = ("eval-*.json",)  # cached re-evaluations (figures/sd_common.py)


def remove_run_files(out: Path) -> None:
    """Remove what a run writes into ``out`` (only those names: other files are left alone)."""
    for path in [out / name for name in RUN_ARTIFACTS] + [p for pat in RUN_ARTIFACT_PATTERNS for p in out.glob(pat)]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# the TrainConfig fields a run takes as key=value (steps and seed are arguments of a run)
TRAIN_OPTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("options", "steps", "seed"))


def split_options(method: str, pairs: dict[str, str], modality: str = "mllm") -> tuple[dict, dict]:
    """key=value pairs -> (TrainConfig fields, the method's options); an unknown method or key is an
    error listing the valid ones (``steps`` and ``seed`` are arguments of a run, not settings)."""
    from .methods.base import method_options, methods_of

    registry, train_keys = methods_of(modality), set(TRAIN_OPTIONS)
    what = "method" if modality == "mllm" else f"{modality} method"
    if method not in registry:
        raise KeyError(f"unknown {what} {method!r}; {what}s: {', '.join(sorted(registry))}")
    own = method_options(registry[method])
    train, opts = {}, {}
    for k, v in pairs.items():
        if k in own:
            opts[k] = v
        elif k in train_keys:
            train[k] = v
        else:
            raise KeyError(f"unknown option {k!r}; training options: {', '.join(sorted(train_keys))}; "
                           f"options of {what} {method!r}: {', '.join(own) or 'none'}")
    return train, opts


def train_config(values: dict) -> TrainConfig:
    """A TrainConfig from values given as text (key=value) or typed: text takes its default's type."""
    defaults = TrainConfig()
    return dataclasses.replace(defaults, **{k: _coerce(getattr(defaults, k), v, k) for k, v in values.items()})


def save_trained(model, out: Path, lora: bool, file: str, only_trained: bool) -> None:
    """The trained parameters as safetensors: the LoRA adapter (``adapter/``), or with full
    fine-tuning ``weights/<file>`` holding every parameter, or only the trained ones (``only_trained``)."""
    if lora:
        model.save_pretrained(out / "adapter")
        return
    from safetensors.torch import save_file

    (out / "weights").mkdir(parents=True, exist_ok=True)
    saved = {n: p for n, p in model.named_parameters() if p.requires_grad or not only_trained}
    save_file({n: p.detach().contiguous().cpu() for n, p in saved.items()}, out / "weights" / file)


def load_trained(model, run: Path, lora: bool, file: str, only_trained: bool):
    """``model`` with a run's trained parameters (as :func:`save_trained` wrote them) back on."""
    if lora:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, Path(run) / "adapter").eval()
    from safetensors.torch import load_file

    result = model.load_state_dict(load_file(Path(run) / "weights" / file), strict=False)
    if result.unexpected_keys or (result.missing_keys and not only_trained):
        raise ValueError(f"{run}: weights do not fit the model: unexpected {result.unexpected_keys[:5]}, "
                         f"missing {result.missing_keys[:5]}")
    return model


def read_manifest(run: Path) -> dict:
    from knowtrace.files import read_json

    path = Path(run) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{run} is not a run directory (no manifest.json)")
    manifest = read_json(path, "run manifest")
    if not isinstance(manifest, dict):
        raise ValueError(f"run manifest {path} is not a JSON object: it is damaged")
    return manifest


def run_state(run: Path, manifest: dict | None = None) -> str:
    """running, trained (training saved, final evaluation not done), complete, failed or interrupted (a
    "running" run nobody holds the lock of was killed); runs from before states were recorded are complete."""
    manifest = read_manifest(run) if manifest is None else manifest
    return live_state(run, manifest.get("state", "complete"))


def describe_state(run: Path, manifest: dict) -> str:
    """One line on an unfinished run: its state, how far it got, what to do."""
    state, done = run_state(run, manifest), manifest.get("checkpoint_step")
    where = f"; checkpoint after step {done + 1} of {manifest['train']['steps']}" if done is not None else ""
    why = f" ({manifest['error']})" if manifest.get("error") else ""
    again = (f"`unlearn {manifest.get('kind', 'mllm')} --resume {run}` goes on from its checkpoint, or"
             if done is not None else "it has no checkpoint:") + " run it again with --overwrite"
    todo = {"running": "it is being written now; wait for it",
            "trained": f"its training is saved: finish its evaluation with `unlearn eval {run}`",
            "interrupted": again, "failed": f"once the cause is fixed, {again}"}.get(state, "")
    return f"run {run} is not complete: {state}{why}{where}; {todo}"


def run_kind(kind: str) -> type[Run]:
    """The Run subclass of ``kind`` (the manifest's "kind"), defined in ``unlearn/run_<kind>.py`` (imported
    here on first use)."""
    module = f"{__package__}.run_{kind}"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
    kinds = {cls.kind: cls for cls in Run.__subclasses__()}
    if kind not in kinds:
        raise ValueError(f"unknown run kind {kind!r}; known: {', '.join(kinds)}")
    return kinds[kind]


@dataclass
class Run:
    """A run's settings (the keyword arguments of ``run_mllm`` / ``run_sd``), checked when it is made
    (an error then writes nothing), and the skeleton every kind runs through (:meth:`run`); a kind adds
    fields and the hooks below."""
    concept: str | None
    method: str
    out: Path
    steps: int = 10
    seed: int = 0
    model: str = "world"
    images: int = 1  # training images of the concept; after loading: the number trained on
    options: dict | None = None  # key=value: training options (TrainConfig) and the method's options
    world_dir: Path | None = None
    world_config: object = None
    data: Path | None = None  # a directory of the kind's record files; None: the world's data
    trace: bool | str = False
    progress: bool = True
    overwrite: bool = False
    checkpoint_every: int = 0  # write a checkpoint after every that many steps (0: none)
    resume: bool = False  # go on from the checkpoint in ``out`` (see :meth:`resumed`)
    callbacks: Sequence = ()
    records: object = field(default=None, init=False, repr=False)  # the data directory's, read when the run is made
    # set by load_model / load_data
    adapter: object = field(default=None, init=False, repr=False)
    key: str = field(default="", init=False)  # the concept's key (world) or name (record files)
    names: tuple[str, ...] = field(default=(), init=False)
    forget: list | None = field(default=None, init=False, repr=False)
    retain: list | None = field(default=None, init=False, repr=False)
    # options the data fills where the user gave none (e.g. SIU's substitute name on the world)
    method_defaults: dict = field(default_factory=dict, init=False, repr=False)

    kind: ClassVar[str]  # the manifest's "kind"; also the methods' modality
    world_marker: ClassVar[str]  # the file marking a directory that holds a world model of this kind
    data_help: ClassVar[tuple[str, str]]  # what --data holds and where its layout is documented
    weights_file: ClassVar[str]  # full fine-tuning: the trained parameters in weights/<weights_file>,
    only_trained: ClassVar[bool]  # only the trained tensors (True) or every parameter of the model
    summary: ClassVar[tuple[str, ...]]  # the metrics the CLI prints
    paper_defaults: ClassVar[dict] = {}  # the paper's training settings for this kind (over TrainConfig's)
    world_defaults: ClassVar[dict] = {}  # on a world model: the world's calibrated settings (recorded as such)

    def __post_init__(self):
        from .world.concepts import get_concept

        if self.images < 1:
            raise ValueError(f"images={self.images}: a run trains on at least 1 image of the concept (--images N)")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every={self.checkpoint_every}: give a number of steps >= 1, or 0 for none")
        self.out = Path(self.out)
        self.data = None if self.data is None else Path(self.data).resolve()
        train, options = split_options(self.method, dict(self.options or {}), self.kind)
        self.cfg = train_config({**self.train_defaults(), **train, "steps": self.steps, "seed": self.seed})
        self.algo = get_method(self.method, modality=self.kind, **options)
        if not self.algo.trains_weights and self.checkpoint_every:
            raise ValueError(f"method {self.method!r} trains no weight, so it has no checkpoints: drop --checkpoint-every")
        if self.data is not None:  # every record checked, nothing loaded yet
            self.records = rd = self.read_records()
            if self.concept is not None and self.concept.lower() not in {n.lower() for n in rd.names}:
                raise ValueError(f"concept {self.concept!r} is not the concept of {self.data} ({rd.name}; aliases: "
                                 f"{', '.join(rd.aliases) or 'none'}); pass --concept {rd.name!r}")
        elif self.forget is None and not self.on_world(self.model):
            raise ValueError(f"{self.model}: a model other than the world's needs its data as {self.data_help[0]}: "
                             f"give --data DIR ({self.data_help[1]})")
        elif self.concept is None:
            raise ValueError("give the concept (--concept: a world concept key or name; see: unlearn world "
                             "concepts), or its data (--data DIR)")
        else:
            self.key = get_concept(self.concept).key  # an unknown concept fails before anything is written
        self.validate()
        self.settings = self.own_settings()

    # init fields a resumed run takes from the caller, not from the manifest
    NOT_SETTINGS: ClassVar[frozenset] = frozenset({"out", "world_dir", "world_config", "progress", "overwrite",
                                                   "resume", "callbacks"})

    def own_settings(self) -> dict | str:
        """The run's settings (its init fields) as JSON, to resume it; a reason when one is not JSON
        (records given in Python)."""
        settings = {}
        for f in dataclasses.fields(self):
            if f.init and f.name not in self.NOT_SETTINGS:
                value = getattr(self, f.name)
                settings[f.name] = str(value) if isinstance(value, Path) else value
                try:
                    json.dumps(settings[f.name], allow_nan=False)
                except (TypeError, ValueError):
                    return f"its {f.name} were given in Python"
        return settings

    @classmethod
    def resumed(cls, run: Path, world_dir=None, progress: bool = True, callbacks: Sequence = (),
                world_config=None) -> Run:
        """The interrupted (or failed) run in ``run``, to go on from its checkpoint with :meth:`run`."""
        manifest = read_manifest(run)
        settings = manifest.get("settings")
        if not isinstance(settings, dict):
            raise ValueError(f"{run} cannot be resumed: " + (settings or "it was made before runs were resumable"))
        return run_kind(manifest["kind"])(**settings, out=Path(run), world_dir=world_dir, progress=progress,
                                          callbacks=callbacks, world_config=world_config, resume=True)

    @classmethod
    def on_world(cls, model: str) -> bool:
        """Whether ``model`` is a world model (the cached one, or a world model's directory)."""
        return model == "world" or (Path(model) / cls.world_marker).exists()

    # what a kind supplies
    def train_defaults(self) -> dict:
        return {**self.paper_defaults, **(self.world_defaults if self.on_world(self.model) else {})}

    def read_records(self):
        """The records of the ``data`` directory, every one checked (no model loaded)."""

    def validate(self) -> None:
        """Check the kind's own settings, loading nothing."""

    @staticmethod
    def load_model(model: str, world_dir=None, world_config=None):
        """The adapter of ``model`` (a run's ``model`` setting)."""

    def load_data(self) -> None:
        """Set key, names, forget, retain and what evaluating needs; check what needs the model."""

    def evaluate(self, stage: str) -> dict:
        """Metrics of the model as it is now; ``stage``: "original" (before training) or "unlearned"."""

    def attach(self, main: bool, closing: contextlib.ExitStack) -> list:
        """Loop callbacks: the tracer (main process only; its closing pushed on ``closing``) and others."""
        return []

    def save_samples(self, stage: str) -> None:
        """Write the stage's samples under out/samples (main process)."""

    def manifest_extras(self) -> dict:
        return {}

    @classmethod
    def from_manifest(cls, run: Path, manifest: dict, world_dir=None, **settings) -> Run:
        """The run of a manifest, to evaluate again: its evaluation settings (``manifest["eval"]``) unless
        ``settings`` (the kind's fields) override them."""
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls) if f.init})
        if unknown:
            raise ValueError(f"{run} is a {cls.kind} run, which takes no {', '.join(unknown)}")
        data = manifest.get("data", "world")
        return cls(manifest["concept"], manifest["method"], Path(run), steps=manifest["train"]["steps"],
                   seed=manifest["seed"], model=manifest["model"], images=manifest["images"], world_dir=world_dir,
                   data=None if data == "world" else Path(data), **{**manifest.get("eval", {}), **settings})

    # the skeleton
    def trace_attrs(self) -> dict:
        """The trace's attributes (knowtrace's schema): what was trained how."""
        return {"model": self.model, "method": {"name": self.method, **dataclasses.asdict(self.algo)},
                "seed": self.seed, "versions": versions(), "git_commit": git_commit()}

    def run(self) -> dict:
        """lock -> load model and data -> create the run directory (manifest: running) -> evaluate ->
        attach the tracer -> train (checkpoints) -> close the tracer (also after an exception) -> write
        the trained parameters (trained) -> evaluate -> metrics (complete). Returns the metrics written to
        ``out/metrics.json``; an exception or signal on the way is recorded as the state (failed,
        interrupted) and raised."""
        from accelerate import PartialState

        from knowtrace.cli import sigterm_interrupts

        state = PartialState(cpu=not torch.cuda.is_available())
        self.main = main = state.is_main_process  # only the main process writes the run directory
        check_out_dir(self.out)
        with run_dir_lock(self.out, enabled=main):
            empty = not (self.out.exists() and any(self.out.iterdir()))
            checkpoint = self.checkpoint_to_resume() if self.resume else None
            if not empty and not (self.overwrite or self.resume):  # an old run in the way: an error before loading
                raise FileExistsError(f"run directory {self.out} exists and is not empty; choose another --out, pass "
                                      f"--overwrite, or --resume it if it was interrupted")
            t = time.perf_counter()
            with state.main_process_first():  # the main process builds the world first; the others reuse it
                self.adapter = self.load_model(self.model, self.world_dir, self.world_config)
                self.load_data()
                self.algo.check_model(self.adapter, self.model)
            timings = {"load": time.perf_counter() - t}
            if main and checkpoint is None:  # a new run never appends to or mixes with an old one's files
                remove_run_files(self.out)
                self.out.mkdir(parents=True, exist_ok=True)
            self.manifest = self.start_manifest() if checkpoint is None else self.previous
            if checkpoint is not None:
                self.manifest.setdefault("resumed_after_steps", []).append(checkpoint.step + 1)
            self.record("running", error=None)
            try:  # SIGTERM ends a run as Ctrl-C does: trace flushed, state recorded, lock released
                with sigterm_interrupts():
                    return self._train_and_write(main, timings, checkpoint)
            except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (knowtrace.cli.Terminated)
                self.stopped("interrupted", signal.Signals(getattr(e, "signum", signal.SIGINT)).name)
                raise
            except BaseException as e:
                self.stopped("failed", f"{type(e).__name__}: {e}")
                raise

    def checkpoint_to_resume(self):
        """The checkpoint of the interrupted run in ``out`` (and its manifest in ``self.previous``)."""
        from .checkpoints import find_checkpoint, load_checkpoint

        self.previous = manifest = read_manifest(self.out)
        state = manifest.get("state", "complete")
        state = "interrupted" if state == "running" else state  # this process holds the lock: the writer is gone
        path = find_checkpoint(self.out)
        if state not in ("interrupted", "failed") or path is None:
            raise ValueError(f"{describe_state(self.out, manifest)}" if state != "complete" else
                             f"run {self.out} is complete: there is nothing to resume")
        return load_checkpoint(path, "cpu")

    def start_manifest(self) -> dict:
        world = self.world_defaults if self.on_world(self.model) else {}
        calibrated = sorted(set(world) - set(self.options or {}))  # the world's settings the user kept
        return {"kind": self.kind, "model": self.model, "concept": self.key, "names": list(self.names),
                "method": self.method, "data": str(self.data) if self.data is not None else "world",
                "method_options": dataclasses.asdict(self.algo), "train": dataclasses.asdict(self.cfg),
                "seed": self.seed, "images": self.images, "versions": versions(), "git_commit": git_commit(),
                "trains_weights": self.algo.trains_weights,
                "settings": self.settings, "checkpoint_every": self.checkpoint_every,
                "defaults": {"world-calibrated": calibrated} if calibrated else "paper", **self.manifest_extras()}

    def stopped(self, state: str, error: str) -> None:
        # once its parameters are saved a run stays "trained": its evaluation is what is missing (unlearn eval)
        trained = getattr(self, "manifest", None) is not None and self.manifest.get("state") == "trained"
        self.record("trained" if trained else state, error=error)

    def record(self, state: str, **fields) -> None:
        """The run's state (and ``fields``) into its manifest, now (main process)."""
        if getattr(self, "manifest", None) is None or not self.main:
            return
        self.manifest.update(state=state, **fields)
        write_json(self.out / "manifest.json", self.manifest)

    def _train_and_write(self, main: bool, timings: dict, checkpoint) -> dict:
        if checkpoint is None:
            t = time.perf_counter()
            original = self.evaluate("original")
            timings["eval_original"] = time.perf_counter() - t
            if main:
                self.save_samples("original")
            self.record("running", original=original)
        else:  # the first part of the run evaluated the starting model; its trace goes up to the checkpoint
            original = self.manifest["original"]
            if main and (self.out / "trace.zarr").exists():
                from knowtrace.store import truncate_steps

                truncate_steps(self.out / "trace.zarr", checkpoint.step)
        with contextlib.ExitStack() as closing:
            callbacks = [*self.callbacks, *self.attach(main, closing)]
            # the manifest keeps the options as given; training sees the data's defaults for the empty ones
            filled = {k: v for k, v in self.method_defaults.items() if getattr(self.algo, k, None) == ""}
            algo = dataclasses.replace(self.algo, **filled) if filled else self.algo
            apply = run_loop if algo.trains_weights else apply_method  # apply_method: an inference-time method
            result = apply(self.adapter, algo, self.forget, self.retain if self.algo.needs_retain else [],
                           self.cfg, self.key, self.names, callbacks=callbacks, progress=self.progress,
                           checkpoint_every=self.checkpoint_every, checkpoint_dir=self.out, resume=checkpoint,
                           on_checkpoint=lambda step: self.record("running", checkpoint_step=step))
        timings["train"] = result["train_seconds"]
        if main:  # saved before the final evaluation: an evaluation that fails can be done again (unlearn eval)
            if algo.trains_weights:
                save_trained(self.adapter.model, self.out, self.cfg.lora, self.weights_file, self.only_trained)
            else:
                algo.save(self.out)
            self.record("trained", history=result["history"], world_size=result["world_size"],
                        mixed_precision=result["mixed_precision"], timings_seconds=timings)
        t = time.perf_counter()
        metrics = self.evaluate("unlearned")
        timings["eval"] = time.perf_counter() - t
        steps = self.cfg.steps if algo.trains_weights else 0  # an inference-time method takes no training step
        metrics = mark_non_finite({**metrics, "steps": steps, "images": self.images, "method": self.method,
                                   "concept": self.key, "original": original})
        if main:
            self.save_samples("unlearned")
            finish_run(self.out, self.manifest, metrics, timings_seconds=timings)
        return metrics


def finish_run(run: Path, manifest: dict, metrics: dict, **fields) -> None:
    """Write a trained run's metrics and mark it complete (its checkpoint is no longer needed)."""
    write_json(Path(run) / "metrics.json", metrics)
    manifest.update(state="complete", **fields)
    if metrics.get("invalid"):
        manifest["invalid"] = metrics["invalid"]
    write_json(Path(run) / "manifest.json", manifest)
    for name in ("checkpoint", ".checkpoint.old"):
        shutil.rmtree(Path(run) / name, ignore_errors=True)


def check_out_dir(out: Path) -> None:
    """A run directory that can be made and written, checked before anything is loaded."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a directory; choose another --out")
    existing = next(p for p in (out.resolve(), *out.resolve().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: {existing} is not a writable directory; choose a writable --out")


def reload(run: Path, world_dir=None, world_config=None):
    """(a finished run's adapter: its starting model with the run's trained parameters back on, its manifest)."""
    manifest = read_manifest(run)
    kind = run_kind(manifest.get("kind", "mllm"))  # runs from before "kind" existed were MLLM runs
    adapter = kind.load_model(manifest["model"], world_dir, world_config)
    method = run_method(manifest)
    if method.trains_weights:
        adapter.model = load_trained(adapter.model, run, manifest["train"]["lora"], kind.weights_file,
                                     kind.only_trained)
    else:  # an inference-time method: the original model with the run's change (a hook) put back on
        method.restore(adapter, Path(run))
    return adapter, manifest


def run_method(manifest: dict):
    """The method class of a run's manifest."""
    from .methods import methods_of

    kind, name = manifest.get("kind", "mllm"), manifest.get("method")
    table = methods_of(kind)
    if name not in table:
        raise ValueError(f"the run's method {name!r} is not a {kind} method of this toolkit ({', '.join(sorted(table))})")
    return table[name]


MANIFEST_KEYS = ("concept", "method", "model", "seed", "images", "train")  # what re-evaluating reads


def check_trained_files(run: Path, manifest: dict | None = None) -> None:
    """A run's trained parameters (an inference-time method: its own files), checked before a model loads:
    missing or damaged files name themselves."""
    from knowtrace.files import read_json

    from .models.source import check_weights

    method = run_method(read_manifest(run) if manifest is None else manifest)
    if not method.trains_weights:
        method.saved(Path(run))
        return
    if (run / "adapter").is_dir():
        read_json(run / "adapter" / "adapter_config.json", "adapter configuration")
    trained = sorted((run / "adapter").glob("*.safetensors")) + sorted((run / "weights").glob("*.safetensors"))
    if not trained:
        raise FileNotFoundError(f"{run} holds no trained parameters (adapter/ or weights/)")
    for path in trained:
        check_weights(path)


def evaluate_run(run: Path, world_dir=None, **settings) -> dict:
    """Re-evaluate a finished run of any kind (``unlearn eval RUN``) as it was evaluated: on the same
    machine this reproduces ``metrics.json`` (less ``original``). A run whose final evaluation did not
    finish (state ``trained``) is finished: its metrics written, its state complete. ``settings``: the
    kind's overrides (SD: ``eval_seeds``, ``fd_seeds``; MLLM: ``world_config``); None: the run's own."""
    manifest = read_manifest(run)
    lacking = [k for k in MANIFEST_KEYS if k not in manifest]
    if lacking:
        raise ValueError(f"run manifest {Path(run) / 'manifest.json'} lacks {', '.join(lacking)}: it is damaged")
    state = run_state(run, manifest)
    if state not in ("complete", "trained"):
        raise ValueError(describe_state(run, manifest))
    check_trained_files(Path(run), manifest)
    settings = {k: v for k, v in settings.items() if v is not None}
    again = run_kind(manifest.get("kind", "mllm")).from_manifest(Path(run), manifest, world_dir, **settings)
    again.adapter, _ = reload(run, world_dir, again.world_config)
    again.load_data()
    metrics = again.evaluate("unlearned")
    steps = manifest["train"]["steps"] if run_method(manifest).trains_weights else 0
    metrics = mark_non_finite({**metrics, "steps": steps, "images": manifest["images"],
                               "method": manifest["method"], "concept": again.key})
    own = all(manifest.get("eval", {}).get(k) == v for k, v in settings.items() if k != "world_config")
    if state == "trained" and own:  # evaluated as the run itself would have been
        with run_dir_lock(run):
            finish_run(run, manifest, {**metrics, "original": manifest["original"]})
    return metrics
