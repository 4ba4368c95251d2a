"""What differs between auditing an MLLM run and an SD run: which attacks apply, where the audit's data
comes from, how the three models load, which file makes a directory a model. Everything else
(checks, lock, atomic output, merging, verdicts, report) is :mod:`unlearn.audit.run`'s, written once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar


class AuditKind:
    """The audit of one kind of run (``kind``: the manifest's "kind")."""

    kind: ClassVar[str]
    attack_modules: ClassVar[tuple[str, ...]]  # modules of unlearn.audit that register its attacks, in run order
    data_files: ClassVar[dict[str, str]]  # data field -> the optional record file it is read from

    def run_class(self):
        """The run class (:class:`unlearn.runs.Run`) that reloads such a run."""
        raise NotImplementedError

    def model_file(self) -> str:
        """The file that makes a directory a model of this kind (``--retain-model`` is checked for it)."""
        raise NotImplementedError

    def data(self, again, audit_data: Path | None):
        """The audit's data of a run reloaded as ``again`` (its model and data loaded)."""
        raise NotImplementedError

    def world_retain(self, key: str, world_dir, world_config, progress: bool) -> Path:
        """The directory of the world's retain model of concept ``key`` (built if missing)."""
        raise NotImplementedError

    def unlearned(self, run: Path, world_dir, world_config):
        """The unlearned model: the run reloaded, a LoRA merged into the weights it adapts."""
        from ..runs import reload

        adapter, _ = reload(run, world_dir, world_config)
        if hasattr(adapter.model, "merge_and_unload"):
            merged = adapter.model.merge_and_unload()
            adapter.model = merged
            if hasattr(adapter, "pipe"):  # SD: the pipeline samples with the merged UNet
                adapter.pipe.unet = merged
        return adapter

    def loaders(self, run: Path, manifest: dict, data, retain_model, world_dir, world_config, progress: bool) -> dict:
        """model name -> a function loading a fresh adapter of it: the run's starting model, the run reloaded,
        and the retain model (the given directory; on the world by default the world's; "none": no retain)."""
        from .run import NO_RETAIN

        cls = self.run_class()

        def original():
            return cls.load_model(manifest["model"], world_dir, world_config)

        loaders = {"original": original, "unlearned": lambda: self.unlearned(run, world_dir, world_config)}
        if retain_model is None and cls.on_world(manifest["model"]) and manifest.get("data", "world") == "world":
            if progress:
                print(f"audit: the retain model (the world {self.kind.upper()} trained without {data.concept}) is built "
                      f"now if it is not cached yet (minutes, once)", file=sys.stderr)
            retain_model = self.world_retain(data.concept, world_dir, world_config, progress)
        if retain_model not in (None, NO_RETAIN):
            loaders["retain"] = lambda: cls.load_model(str(retain_model))
        elif progress:
            print("audit: no retain model: the attacks that compare with one are inconclusive", file=sys.stderr)
        return loaders


class MLLMAudit(AuditKind):
    kind = "mllm"
    attack_modules = ("relearn", "rephrase", "quantize", "mia", "probes", "lens")

    @property
    def data_files(self) -> dict[str, str]:
        from .data import FILES

        return FILES

    def run_class(self):
        from ..run_mllm import MLLMRun

        return MLLMRun

    def model_file(self) -> str:
        from ..models import CHECKPOINT_FILE

        return CHECKPOINT_FILE

    def data(self, again, audit_data):
        from .data import run_audit_data

        return run_audit_data(again, audit_data)

    def world_retain(self, key, world_dir, world_config, progress):
        from ..world.source import retain_mllm

        return retain_mllm(key, world_dir=world_dir, world_config=world_config, progress=progress)


class SDAudit(AuditKind):
    kind = "sd"
    attack_modules = ("sd_knowledge", "sd_sampling", "sd_relearn", "sd_inversion", "sd_adversarial")

    @property
    def data_files(self) -> dict[str, str]:
        from .sd_data import FILES

        return FILES

    def run_class(self):
        from ..run_sd import SDRun

        return SDRun

    def model_file(self) -> str:
        from ..models.sd import PIPELINE_FILE

        return PIPELINE_FILE

    def data(self, again, audit_data):
        from .sd_data import run_sd_audit_data

        return run_sd_audit_data(again, audit_data)

    def world_retain(self, key, world_dir, world_config, progress):
        from ..world.source import retain_sd

        return retain_sd(key, world_dir=world_dir, world_config=world_config, progress=progress)


KINDS: dict[str, AuditKind] = {"mllm": MLLMAudit(), "sd": SDAudit()}
