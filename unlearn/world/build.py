"""Build, load and check the whole world: MLLM, classifier, SD, each a verified cache component."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import diffusers
import torch
import transformers

from . import cache
from .concepts import get_concept
from .classifier import ClassifierConfig, evaluate_classifier, load_classifier, train_classifier
from .mllm import MLLMConfig, evaluate_mllm, load_mllm, train_mllm
from .sd import SDConfig, evaluate_sd, load_sd, train_sd

BUILD_INFO = "build_info.json"


@dataclass(frozen=True)
class WorldConfig:
    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    sd: SDConfig = field(default_factory=SDConfig)


COMPONENTS = ("mllm", "classifier", "sd")  # build order (the SD gate reads the classifier)
_TRAIN = {"mllm": train_mllm, "classifier": train_classifier, "sd": train_sd}


def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "diffusers": diffusers.__version__}


def world_fingerprint() -> str:
    """Hash of everything the world models learn from: concepts (names, facts, looks), every text,
    and the renderer's version. Part of each component's cache key, so changing the world rebuilds."""
    from .concepts import CONCEPTS, SUBSTITUTE_NAMES
    from .render import RENDER_VERSION
    from .texts import world_corpus

    content = json.dumps([[asdict(c) for c in CONCEPTS], SUBSTITUTE_NAMES, world_corpus(), RENDER_VERSION],
                         sort_keys=True, default=str)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def _key_config(part) -> dict:
    """A component config as its cache key holds it. Fields added later whose value is the empty tuple
    (``left_out`` of MLLMConfig and SDConfig) are left out, so the key of a world built before they existed
    is unchanged."""
    return {k: v for k, v in asdict(part).items() if v != ()}


def _cache_key(part) -> dict:
    """What a component's cache entry built from config ``part`` must have been built from."""
    return {"config": _key_config(part), "world": world_fingerprint()}


def component_key(name: str, cfg: WorldConfig) -> dict:
    """What a component's cache entry must have been built from."""
    return _cache_key(getattr(cfg, name))


def _timed_builder(name: str, train: str, cfg, progress: bool):
    def build(tmp: Path) -> None:
        start = time.perf_counter()
        _TRAIN[train](cfg, tmp, progress=progress)
        info = {"component": name, "build_seconds": round(time.perf_counter() - start, 1),
                "torch_threads": torch.get_num_threads(), "versions": _versions()}
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=1))

    return build


def build_world(root: Path | None = None, cfg: WorldConfig | None = None, progress: bool = True,
                only: tuple[str, ...] = COMPONENTS) -> dict[str, Path]:
    """Train what is missing (or unusable) in the cache; return component name -> directory."""
    root = Path(root) if root is not None else cache.default_cache_dir()
    cfg = cfg or WorldConfig()
    unknown = set(only) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown world component(s) {sorted(unknown)}; components are {list(COMPONENTS)}")
    return {name: cache.ensure_component(root, name, component_key(name, cfg),
                                         _timed_builder(name, name, getattr(cfg, name), progress))
            for name in COMPONENTS if name in only}


# ----------------------------------------------------------------------------- retain models

RETAIN_COMPONENTS = ("mllm", "sd")  # the world models that have retain versions (their configs have left_out)


def _retain_part(component: str) -> str:
    if component not in RETAIN_COMPONENTS:
        raise ValueError(f"no retain model for world component {component!r}; retain models: {list(RETAIN_COMPONENTS)}")
    return component


def retain_component(concept: str, component: str = "mllm") -> str:
    """Cache name of the retain model of ``concept`` (a key or name): ``<component>-retain-<key>``."""
    return f"{_retain_part(component)}-retain-{get_concept(concept).key}"


def retain_config(concept: str, cfg: WorldConfig | None = None, component: str = "mllm"):
    """The world ``component``'s config (recipe, seed, steps) with ``concept`` left out of its training."""
    return replace(getattr(cfg or WorldConfig(), _retain_part(component)), left_out=(get_concept(concept).key,))


def build_retain(concepts, root: Path | None = None, cfg: WorldConfig | None = None, progress: bool = True,
                 component: str = "mllm") -> dict[str, Path]:
    """Train what is missing of the retain models (world ``component``: "mllm" or "sd") of ``concepts`` (keys
    or names); return key -> directory. Every name is checked before anything is built (an unknown one is a
    KeyError listing the concepts)."""
    root = Path(root) if root is not None else cache.default_cache_dir()
    keys = list(dict.fromkeys(get_concept(c).key for c in concepts))
    _retain_part(component)
    out = {}
    for key in keys:
        part, name = retain_config(key, cfg, component), retain_component(key, component)
        out[key] = cache.ensure_component(root, name, _cache_key(part), _timed_builder(name, component, part, progress))
    return out


def _mllm_gate(path: Path, cfg: WorldConfig, root, progress: bool, sd_seeds: int, left_out=()) -> dict:
    model, processor = load_mllm(path)
    return evaluate_mllm(model, processor, world_seed=cfg.mllm.world_seed, left_out=left_out)


def _sd_gate(path: Path, cfg: WorldConfig, root, progress: bool, sd_seeds: int, left_out=()) -> dict:
    classifier = load_classifier(build_world(root, cfg, progress=progress, only=("classifier",))["classifier"])
    return evaluate_sd(load_sd(path), classifier, seeds_per_concept=sd_seeds, world_seed=cfg.sd.world_seed,
                       progress=progress, left_out=left_out)


_RETAIN_GATE = {"mllm": _mllm_gate, "sd": _sd_gate}


def check_retain(concepts, root: Path | None = None, cfg: WorldConfig | None = None, progress: bool = True,
                 component: str = "mllm", sd_seeds: int = 10) -> dict:
    """Gate figures of the retain models (world ``component``) of ``concepts`` (built first if missing):
    cache name (``<component>-retain-<key>``) -> report, and "pass"."""
    cfg = cfg or WorldConfig()
    paths = build_retain(concepts, root, cfg, progress=progress, component=component)
    report = {}
    for key, path in paths.items():
        name = retain_component(key, component)
        report[name] = _RETAIN_GATE[component](path, cfg, root, progress, sd_seeds, left_out=(key,))
        report[name]["build_seconds"] = build_info(path)["build_seconds"]
    report["pass"] = all(r["pass"] for r in report.values())
    return report


def build_info(path: Path) -> dict:
    return json.loads((Path(path) / BUILD_INFO).read_text())


def check_world(root: Path | None = None, cfg: WorldConfig | None = None, progress: bool = True,
                sd_seeds: int = 10) -> dict:
    """Gate figures of every component (building what is missing first): {"mllm", "classifier", "sd"}."""
    cfg = cfg or WorldConfig()
    paths = build_world(root, cfg, progress=progress)
    report = {"mllm": _mllm_gate(paths["mllm"], cfg, root, progress, sd_seeds),
              "classifier": evaluate_classifier(load_classifier(paths["classifier"])),
              "sd": _sd_gate(paths["sd"], cfg, root, progress, sd_seeds)}
    for name in COMPONENTS:
        report[name]["build_seconds"] = build_info(paths[name])["build_seconds"]
    report["pass"] = all(report[name]["pass"] for name in COMPONENTS)
    return report
