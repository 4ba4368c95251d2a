"""A finished world SD run and the audit context of it, shared by the SD audit's tests.

The run: FTTP on grom for 3 steps from 2 images on the default world SD (the one CI builds), evaluated
cheaply. The context's retain model is, for tests of the plumbing only, a stand-in directory given by the
test (e.g. the world SD itself); tests of a verdict's reading build their datasets by hand."""

from __future__ import annotations

from pathlib import Path

from unlearn.audit.base import AuditContext
from unlearn.audit.kinds import KINDS
from unlearn.loop import TrainConfig
from unlearn.run_sd import run_sd
from unlearn.runs import read_manifest

CONCEPT = "grom"


def make_sd_run(out: Path) -> Path:
    """A complete 3-step FTTP run on the world SD (``out``)."""
    run_sd(CONCEPT, "fttp", out, steps=3, images=2, eval_seeds=2, fd_seeds=2, progress=False)
    return out


def sd_context(run: Path, options: dict | None = None, retain_model: str | None = "none", seed: int = 0,
               world_dir=None) -> AuditContext:
    """The audit context ``unlearn audit RUN`` builds for SD run ``run`` (``retain_model``: a pipeline
    directory, or "none")."""
    manifest = read_manifest(run)
    kind = KINDS["sd"]
    cls = kind.run_class()
    again = cls.from_manifest(run, manifest, world_dir, progress=False)
    again.adapter = cls.load_model(manifest["model"], world_dir)
    again.load_data()
    data = kind.data(again, None)
    loaders = kind.loaders(run, manifest, data, retain_model, world_dir, None, False)
    ctx = AuditContext(run, manifest, data, loaders, TrainConfig(**manifest["train"]), dict(options or {}), seed,
                       progress=False)
    ctx._adapters["original"] = again.adapter
    return ctx
