"""SAUCE: unlearning that edits no weight. A sparse autoencoder (SAE) on one decoder layer's residual
stream, the SAE features most tied to the concept, and at inference a hook that edits those features.

Li et al., "SAUCE: Selective Concept Unlearning in Vision-Language Models with Sparse Autoencoders"
(ICCV 2025, arXiv 2503.14530). No code of theirs is public, and the paper's layer, feature rule and
intervention values are not published: each choice below is ours, measured on the world (docs/sauce.md).

- **The SAE** (``sae``): an SAELens-layout directory (:func:`knowtrace.sae.load_sae`; checked to be trained
  for this model (``model_name`` = the run's ``--model``), this layer's module and this width), or ""
  to train a TopK SAE (:func:`knowtrace.sae.train_sae`: ``sae_expansion`` x d_in features, ``sae_k`` active,
  ``sae_steps`` Adam steps, the run's seed) on the residuals of the run's forget and retain records, saved in
  the run directory (``RUN/sae``, reusable by later runs as ``sae=RUN/sae``).
- **The layer** (``layer``, negative from the end): the residual stream of that decoder layer
  (``hidden_states[layer + 1]``; :func:`knowtrace.sae_capture.residual_module`).
- **The features** (``features`` of them, by ``rule``): the SAE's activations at ``positions`` of the
  forget records (the concept) against the retain records (everything else); per feature, ``frequency``:
  the share of positions where it is active, forget minus retain; ``mean``: its mean activation, forget
  minus retain; ``ratio``: log((mean_forget + eps) / (mean_retain + eps)). The highest scores, among the
  positive ones, are chosen.
- **The intervention** (``intervention``, ``value``; :mod:`knowtrace.sae_edit`): where a chosen feature is
  active, ``clamp`` sets it to ``value``, ``scale`` multiplies it by ``value``; the residual becomes the
  SAE's edited reconstruction plus the SAE's error, so every other feature passes through exactly.

The run directory holds ``intervention.json`` (the SAE's path and SHA-256, layer, features with their
scores, intervention) instead of trained weights; reloading the run installs the hook on the original
model (:meth:`restore`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .base import MLLMMethod, register

INTERVENTION_FILE = "intervention.json"
RUN_SAE_DIR = "sae"  # where a run saves the SAE it trained
ENCODE_BATCH = 16  # records per forward when capturing residuals
EPS = 1e-6


def _frequency(forget: tuple, retain: tuple) -> torch.Tensor:
    return forget[0] - retain[0]


def _mean(forget: tuple, retain: tuple) -> torch.Tensor:
    return forget[1] - retain[1]


def _ratio(forget: tuple, retain: tuple) -> torch.Tensor:
    return torch.log((forget[1] + EPS) / (retain[1] + EPS))


# rule -> ((frequency, mean) on the forget records, the same on the retain records) -> score per feature
RULES = {"frequency": _frequency, "mean": _mean, "ratio": _ratio}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@register
@dataclass
class SAUCE(MLLMMethod):
    name: ClassVar[str] = "sauce"
    needs_retain: ClassVar[bool] = True
    trains_weights: ClassVar[bool] = False
    sae: str = ""  # an SAE directory (SAELens layout); "": train one on the run's records (saved in RUN/sae)
    # defaults: the world's measured choice (docs/sauce.md, benchmarks/sauce_world.py); the paper gives none
    layer: int = 0  # decoder layer (negative: from the end)
    features: int = 128
    rule: str = "ratio"
    intervention: str = "clamp"
    value: float = 0.0
    positions: str = "image,question,answer"  # where features are scored (and a run's SAE is trained)
    sae_k: int = 32
    sae_expansion: int = 8
    sae_steps: int = 1000

    def __post_init__(self):
        from knowtrace.sae_edit import check_intervention

        if self.rule not in RULES:
            raise ValueError(f"unknown feature rule {self.rule!r}; rules: {', '.join(RULES)}")
        check_intervention(self.intervention)
        if not self.kinds:  # (an unknown position kind raises in kinds)
            raise ValueError("positions: give some of image, question, answer")
        bad = [f"{k}={getattr(self, k)} (must be >= 1)" for k in ("features", "sae_k", "sae_expansion", "sae_steps")
               if getattr(self, k) < 1]
        bad += [f"value={self.value} (must be finite)"] if not math.isfinite(self.value) else []
        if bad:
            raise ValueError(f"invalid sauce options: {', '.join(bad)}")
        self.model_name = "?"  # the run's --model, set by check_model
        self.chosen: list[int] = []
        self.scores: list[float] = []
        self.trained_sae = None  # (sae, context size, quality) when the run trained it
        self.statistics: dict[str, list[float]] = {}  # frequency / mean of the chosen features on both sets

    @property
    def kinds(self) -> tuple[str, ...]:
        from knowtrace.sae_capture import check_kinds

        return check_kinds(tuple(p.strip() for p in self.positions.split(",")))

    def check_model(self, adapter, model: str) -> None:
        """The layer exists and a given SAE was trained for this model, layer and width (before anything is written)."""
        from knowtrace.sae_capture import layer_index

        self.model_name = model
        index = layer_index(adapter.model, self.layer)
        if self.sae:
            self._load_sae(adapter.model, index, model)

    def _load_sae(self, model, index: int, model_name: str | None):
        from knowtrace.sae import load_sae
        from knowtrace.sae_capture import residual_module, text_config

        sae, _ = load_sae(self.sae, model_name=model_name, hook_name=residual_module(model, index)[0], layer=index)
        width = int(text_config(model).hidden_size)
        if sae.d_in != width:
            raise ValueError(f"the SAE in {self.sae} reads width {sae.d_in}, the model's residual stream has width "
                             f"{width}: it was trained on another model")
        return sae

    def setup(self, ctx, forget, retain, sae=None) -> None:
        """Capture the residuals, train the SAE if none was given, choose the features, install the hook.
        ``sae``: a TopKSAE already in memory for this layer (sweeps over the other options), used as given."""
        from knowtrace.sae import sae_quality, train_sae
        from knowtrace.sae_capture import capture_residuals, layer_index, residual_module
        from knowtrace.sae_edit import FeatureEdit, feature_statistics, install_feature_edit, top_features

        adapter, model = ctx.adapter, ctx.adapter.model
        index = layer_index(model, self.layer)

        def residuals(records):
            batches = [adapter.encode(records[s:s + ENCODE_BATCH], train=True, cache=False)
                       for s in range(0, len(records), ENCODE_BATCH)]
            return capture_residuals(model, batches, index, self.kinds, progress=False)

        res_forget, res_retain = residuals(forget), residuals(retain)  # rows on the CPU
        device = next(model.parameters()).device
        if sae is None and self.sae:
            sae = self._load_sae(model, index, None)  # the model was checked by check_model
        elif sae is None:  # trained where the model is (a GPU when there is one)
            rows = torch.cat([res_forget.acts, res_retain.acts]).to(device)
            sae = train_sae(rows, self.sae_expansion * rows.shape[1], self.sae_k, steps=self.sae_steps, seed=ctx.seed,
                            progress=ctx.progress)
            self.trained_sae = (sae, max(res_forget.context_size, res_retain.context_size), sae_quality(sae, rows))
        sae = sae.to(device)
        with torch.no_grad():
            stats = [feature_statistics(sae.encode(r.acts.to(device))) for r in (res_forget, res_retain)]
        scores = RULES[self.rule](*stats)
        self.chosen = top_features(scores, self.features)
        if not self.chosen:
            raise ValueError(f"no SAE feature is more active on the concept's records than on the retain records "
                             f"(rule {self.rule!r}, layer {index}): try another layer or rule")
        self.scores = [float(scores[f]) for f in self.chosen]
        self.statistics = {f"{stat}_{part}": [float(s[i][f]) for f in self.chosen]
                           for part, s in (("forget", stats[0]), ("retain", stats[1]))
                           for i, stat in enumerate(("frequency", "mean"))}
        self.layer_index, self.hook_name = index, residual_module(model, index)[0]
        self.handle = install_feature_edit(model, index, FeatureEdit(sae, tuple(self.chosen), self.intervention,
                                                                    self.value))  # .remove() takes it off

    def save(self, out: Path) -> None:
        """``intervention.json`` (and the SAE the run trained, in ``sae/``) into run directory ``out``."""
        from knowtrace.files import write_json
        from knowtrace.sae import SAE_WEIGHTS_FILE, save_sae

        if self.trained_sae is not None:
            sae, context, quality = self.trained_sae
            save_sae(sae, out / RUN_SAE_DIR, model_name=self.model_name, hook_name=self.hook_name,
                     layer=self.layer_index, positions=self.kinds, context_size=context,
                     dataset_path="the run's forget and retain records", extra={"quality": quality})
            where, path = RUN_SAE_DIR, out / RUN_SAE_DIR
        else:
            where = path = Path(self.sae).resolve()
        write_json(out / INTERVENTION_FILE, {
            "sae": str(where), "sae_sha256": sha256(path / SAE_WEIGHTS_FILE), "layer": self.layer_index,
            "hook_name": self.hook_name, "features": self.chosen, "scores": self.scores,
            "statistics": self.statistics, "rule": self.rule, "intervention": self.intervention, "value": self.value,
            "positions": list(self.kinds), **({"sae_quality": self.trained_sae[2]} if self.trained_sae else {})})

    @staticmethod
    def saved(run: Path) -> tuple[dict, Path]:
        """(the run's intervention.json, its SAE's directory), checked: the files exist and the SAE is the one
        the run chose its features with (SHA-256)."""
        from knowtrace.files import read_json
        from knowtrace.sae import SAE_WEIGHTS_FILE, read_sae_cfg

        path = Path(run) / INTERVENTION_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{run} holds no {INTERVENTION_FILE}: the sauce run did not finish writing")
        saved = read_json(path, "sauce intervention")
        lacking = [k for k in ("sae", "sae_sha256", "layer", "features", "intervention", "value") if k not in saved]
        if lacking:
            raise ValueError(f"{path} lacks {', '.join(lacking)}: it is damaged")
        sae_dir = Path(run) / saved["sae"]  # relative: inside the run; absolute: where it was given
        read_sae_cfg(sae_dir)  # a missing or broken SAE names itself
        if sha256(sae_dir / SAE_WEIGHTS_FILE) != saved["sae_sha256"]:
            raise ValueError(f"the SAE in {sae_dir} is not the one run {run} chose its features with (its weights "
                             f"changed since): restore it, or run sauce again with --overwrite")
        return saved, sae_dir

    @classmethod
    def restore(cls, adapter, run: Path) -> None:
        """Install the run's intervention on ``adapter.model`` (the run's original model)."""
        from knowtrace.sae import load_sae
        from knowtrace.sae_capture import residual_module
        from knowtrace.sae_edit import FeatureEdit, install_feature_edit

        saved, sae_dir = cls.saved(run)
        layer = saved["layer"]
        sae, _ = load_sae(sae_dir, hook_name=residual_module(adapter.model, layer)[0], layer=layer)
        edit = FeatureEdit(sae, tuple(saved["features"]), saved["intervention"], float(saved["value"]))
        install_feature_edit(adapter.model, layer, edit)
