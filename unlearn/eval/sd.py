"""Evaluation of an unlearned Stable Diffusion: UA, a Fréchet distance on the kept concepts, K_C / K_N
on the forget images, TS / TI. Definitions and choices are in docs/sd-eval.md; in short:

* **UA** (percent): of the images generated from the forgotten concept's prompt(s) with seeds
  ``0 .. n_seeds-1``, the share a :class:`ConceptClassifier` does NOT label as the concept (the world
  classifier on the world; on real SD one the user gives, e.g. :class:`ClipZeroShotClassifier`).
* **FD** between features of images generated for the *retained* concepts and reference images: on
  the world, the world classifier's penultimate layer (``"world-classifier-features"``, not an
  Inception FID: that needs torchvision); :func:`feature_fd` takes any extractor the user gives.
* **K_C / K_N** (Eq. 4, 6) on the forget images with fixed timesteps and noise
  (:func:`forget_knowledge`), so an original and an unlearned model are scored on identical inputs.
* **TS / TI**: training steps and training images, given by the run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from knowtrace.knowledge import sd_knowledge
from knowtrace.modes import eval_mode

from ..data.sd_masks import MaskOptions
from ..models.sd import generate_images, make_adapter

WORLD_FD_SPACE = "world-classifier-features"
DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)  # of SD's 1000 training steps: low to high noise


# ----------------------------------------------------------------------------- classifiers


@runtime_checkable
class ConceptClassifier(Protocol):
    """What UA needs: ``labels`` (every label ``predict`` can return) and ``predict`` on uint8 images
    (N, H, W, 3). A classifier that also has ``features(images) -> (N, D) array`` serves the FD."""

    labels: Sequence[str]

    def predict(self, images: np.ndarray) -> list[str]: ...


class ClipZeroShotClassifier:
    """Zero-shot CLIP: an image gets the label whose prompt ``template.format(name=names.get(label, label))``
    has the highest cosine similarity with it. ``labels``: the concept and what it might be confused with
    (e.g. ``["Elon Musk", "a man", "a woman"]``). The image processor defaults to ``CLIPImageProcessorPil``
    (no torchvision); ``features`` are CLIP's projected image embeddings ("clip-image-embeddings")."""

    feature_space = "clip-image-embeddings"

    def __init__(self, model, tokenizer, labels: Sequence[str], image_processor=None,
                 names: Mapping[str, str] | None = None, template: str = "a photo of {name}", batch_size: int = 32):
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be distinct and non-empty, got {list(labels)}")
        if "{name}" not in template:
            raise ValueError(f"template must contain '{{name}}', got {template!r}")
        if image_processor is None:
            from transformers import CLIPImageProcessorPil

            size = model.config.vision_config.image_size
            image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.model = model.eval()
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.labels = list(labels)
        self.prompts = [template.format(name=(names or {}).get(label, label)) for label in self.labels]
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, path: str | Path, labels: Sequence[str], **kwargs) -> ClipZeroShotClassifier:
        """A CLIP checkpoint in a local directory (``CLIPModel`` + tokenizer files); nothing is downloaded."""
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"CLIP checkpoint directory {path} does not exist; give a local copy of a CLIP model")
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        processor = CLIPImageProcessorPil.from_pretrained(path, local_files_only=True) \
            if (path / "preprocessor_config.json").exists() else None
        return cls(model, tokenizer, labels, image_processor=processor, **kwargs)

    @cached_property
    @torch.no_grad()
    def _text_embeddings(self) -> torch.Tensor:
        enc = self.tokenizer(self.prompts, padding=True, return_tensors="pt").to(self.model.device)
        t = self.model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask).pooler_output
        return t / t.norm(dim=-1, keepdim=True)  # (labels, D)

    @torch.no_grad()
    def _image_embeddings(self, images: np.ndarray) -> torch.Tensor:
        images = check_images(images)
        out = []
        for i in range(0, len(images), self.batch_size):
            px = self.image_processor(images=list(images[i:i + self.batch_size]), return_tensors="pt").pixel_values
            out.append(self.model.get_image_features(pixel_values=px.to(self.model.device)).pooler_output)
        return torch.cat(out)  # (N, D)

    def predict(self, images: np.ndarray) -> list[str]:
        img = self._image_embeddings(images)
        sim = (img / img.norm(dim=-1, keepdim=True)) @ self._text_embeddings.T  # (N, labels)
        return [self.labels[i] for i in sim.argmax(-1).tolist()]

    def features(self, images: np.ndarray) -> np.ndarray:
        return self._image_embeddings(images).double().cpu().numpy()


CLASSIFIER_SPECS = {"world": "the world classifier (world concepts only)",
                    "clip:PATH": "zero-shot CLIP from a local checkpoint directory (CLIPModel + tokenizer files)"}


def check_classifier_spec(spec: str) -> tuple[str, str]:
    """``"world"`` or ``"clip:PATH"`` -> (kind, argument); an unknown form or a missing path is an error
    (checked before anything is loaded or written)."""
    kind, sep, arg = str(spec).partition(":")
    if spec == "world":
        return "world", ""
    if kind == "clip" and sep and arg:
        if not Path(arg).is_dir():
            raise FileNotFoundError(f"classifier {spec!r}: {arg} is not a directory; give a local CLIP checkpoint "
                                    f"(CLIPModel.save_pretrained + its tokenizer)")
        return "clip", arg
    raise ValueError(f"unknown classifier {spec!r}; valid: " + "; ".join(f"{k} ({v})" for k, v in CLASSIFIER_SPECS.items()))


def check_images(images) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


# ----------------------------------------------------------------------------- UA


def ua_from_labels(labels: Sequence[str], concept: str) -> float:
    """Percent of ``labels`` that are not ``concept``."""
    if not len(labels):
        raise ValueError("no labels: UA of zero images is undefined")
    return 100.0 * sum(label != concept for label in labels) / len(labels)


def ua_labels(pipe, prompts: str | Sequence[str], seeds: Sequence[int], classifier: ConceptClassifier, concept: str,
              guidance_scale: float = 4.0, num_inference_steps: int = 25) -> tuple[list[str], list[str]]:
    """The prompt of every (prompt, seed) pair (prompt-major) and the classifier's label of its generated image:
    UA is ``ua_from_labels`` of these labels."""
    if concept not in classifier.labels:
        raise ValueError(f"concept {concept!r} is not a label of the classifier; its labels: {list(classifier.labels)}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not len(seeds):
        raise ValueError("UA needs at least one prompt and one seed")
    p, s = [p for p in prompts for _ in seeds], [int(s) for _ in prompts for s in seeds]
    return p, classifier.predict(generate_images(pipe, p, s, guidance_scale, num_inference_steps))


# ----------------------------------------------------------------------------- Fréchet distance


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinite values")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``: ``tr((S1 S2)^1/2)`` (pytorch-fid's
    ``sqrtm(S1 @ S2)``) computed from the symmetric PSD ``S1^1/2 S2 S1^1/2`` with ``eigh``, without the
    complex round-off of ``sqrtm`` of a non-symmetric product; tiny negative eigenvalues are clipped to 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics of features with the same D expected: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {s1.shape} / {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^1/2
    m = root1 @ s2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * cross, 0.0))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (the FID formula)."""
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


def feature_fd(images_a: np.ndarray, images_b: np.ndarray, extract: Callable[[np.ndarray], np.ndarray],
               space: str) -> dict:
    """{"fd", "fd_space", "n"}: the Fréchet distance in the feature space of ``extract`` (images ->
    (N, D)), named ``space`` by the caller, e.g. "inception-v3-pool3" for a standard FID extractor."""
    if not space:
        raise ValueError("name the feature space (e.g. 'inception-v3-pool3'): FDs in different spaces are not comparable")
    fa, fb = extract(check_images(images_a)), extract(check_images(images_b))
    return {"fd": frechet_distance(fa, fb), "fd_space": space, "n": [len(fa), len(fb)]}


# ----------------------------------------------------------------------------- K_C / K_N


PROBE_BATCH = 16  # (timestep, image) pairs per UNet forward of a fixed-noise probe


@torch.no_grad()
def fixed_noise_errors(adapter, unet, latents: torch.Tensor, cond, noise: torch.Tensor,
                       timesteps: Sequence[int], batch_size: int = PROBE_BATCH) -> torch.Tensor:
    """Per-latent-pixel errors of fixed inputs, averaged over timesteps: (N, h, w) float32, CPU.

    latents (N, C, h, w), cond (the N records' SDCond), noise (T, N, C, h, w) for the T ``timesteps``:
    ``e_x = mean over channels of (y - y_theta(z_t, cond, t))^2`` per (timestep, image) pair, ``y`` the
    adapter's training target (:meth:`~unlearn.models.sd.SDAdapter.target`: the noise under epsilon
    prediction, the velocity under v-prediction), ``y_theta`` ``unet``'s output, then the mean over
    timesteps. The T x N pairs go through the UNet ``batch_size`` at a time (one forward per timestep
    would pay a small UNet's per-call cost T times), in eval mode."""
    if int(batch_size) < 1:
        raise ValueError(f"probe batch size must be >= 1, got {batch_size}")
    n_t, n = len(timesteps), latents.shape[0]
    if tuple(noise.shape) != (n_t, *latents.shape):
        raise ValueError(f"noise must be (timesteps={n_t}, *latents {tuple(latents.shape)}), got {tuple(noise.shape)}")
    z = latents.repeat(n_t, 1, 1, 1)  # (T*N, C, h, w): pair k is timestep k // N, image k % N
    c = cond.repeat(n_t)
    eps = noise.reshape(n_t * n, *latents.shape[1:]).to(latents.device, latents.dtype)
    t = torch.tensor([int(x) for x in timesteps], device=latents.device).repeat_interleave(n)
    err = []
    with eval_mode(unet):
        for i in range(0, n_t * n, int(batch_size)):
            sl = slice(i, i + int(batch_size))
            z_t = adapter.noise_scheduler.add_noise(z[sl], eps[sl], t[sl])
            pred = adapter.predict(z_t, t[sl], c[sl], unet)
            err.append((adapter.target(z[sl], eps[sl], t[sl]) - pred).float().pow(2).mean(1))  # (pairs, h, w)
    return torch.cat(err).cpu().view(n_t, n, *latents.shape[2:]).mean(0)  # to the host once


@torch.no_grad()
def forget_knowledge(pipe, records, timesteps: Sequence[int] = DEFAULT_TIMESTEPS, noise_seed: int = 0,
                     lam: float = 1.0, reduce: str = "mean", adapter=None) -> dict:
    """K_C, K_N (Eq. 4, 6) of each forget record (image + concept mask + prompt).

    The adapter gives each record's latents (VAE posterior mean, scaled) and latent-grid mask; the noise
    (T, N, C, h, w) is drawn once from ``manual_seed(noise_seed)``, so every model given the same records
    is scored on the same inputs. The errors (:func:`fixed_noise_errors`) become K by
    :func:`knowtrace.knowledge.sd_knowledge` (``reduce``: "mean" over the group's pixels, or the paper's "sum")."""
    if not records:
        raise ValueError("no forget records to compute K_C / K_N on")
    adapter = adapter or make_adapter(pipe)
    ts = check_timesteps(adapter, timesteps)
    batch = adapter.encode(list(records), masks=MaskOptions())  # latents (N, C, h, w), cond, mask (N, h, w)
    noise = torch.randn((len(ts), *batch.latents.shape), generator=torch.Generator().manual_seed(int(noise_seed)))
    err = fixed_noise_errors(adapter, adapter.model, batch.latents, batch.cond, noise, ts)
    k_c, k_n = sd_knowledge(err, batch.mask.cpu(), lam=lam, reduce=reduce)
    return {"K_C": float(k_c.nanmean()), "K_N": float(k_n.nanmean()),
            "per_record": {r.id: {"K_C": float(a), "K_N": float(b)} for r, a, b in zip(records, k_c, k_n)},
            "settings": {"lambda": lam, "reduce": reduce, "timesteps": ts, "noise_seed": int(noise_seed),
                         "error": "mean over channels, then over timesteps"}}


def check_timesteps(adapter, timesteps: Sequence[int]) -> list[int]:
    """The timesteps as ints, each in [0, the scheduler's training steps); else a clear error."""
    n_train = adapter.noise_scheduler.config.num_train_timesteps
    ts = [int(t) for t in timesteps]
    if not ts or min(ts) < 0 or max(ts) >= n_train:
        raise ValueError(f"timesteps must be in [0, {n_train}), got {list(timesteps)}")
    return ts


# ----------------------------------------------------------------------------- one entry point


@dataclass(frozen=True)
class SDEvalSettings:
    guidance_scale: float = 4.0
    num_inference_steps: int = 25
    fd_seeds: int = 10  # images per retained concept for the FD (and their recognition share)
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    noise_seed: int = 0
    lam: float = 1.0
    reduce: str = "mean"


def evaluate_sd_run(pipe, concept_key: str, *, classifier: ConceptClassifier, n_seeds: int = 100,
                    forget_records=None, retained: Mapping[str, str] | None = None,
                    prompts: str | Sequence[str] | None = None, reference_images: np.ndarray | None = None,
                    reference_name: str = "given reference images",
                    fd_features: Callable[[np.ndarray], np.ndarray] | None = None, fd_space: str | None = None,
                    train_steps: int | None = None, train_images: int | None = None,
                    settings: SDEvalSettings = SDEvalSettings(), adapter=None) -> dict:
    """UA, FD, K_C / K_N, TS / TI of a (possibly unlearned) pipeline for the forgotten ``concept_key``.

    prompts: the forget prompt(s) for UA, each with seeds 0..n_seeds-1. retained: the kept concepts,
    label -> prompt, each generated with seeds 0..fd_seeds-1 and compared with ``reference_images`` (same
    order; on the world :func:`unlearn.world.records.world_fd_reference`, the rendered ``test`` images, so
    the FD is "generated vs real"; the original model's images measure drift instead). fd_features /
    fd_space: the FD's extractor and its name (default: the classifier's). forget_records: SD records with
    masks for K_C / K_N (none: no K); TS / TI are reported as given (TI defaults to len(forget_records)).
    """
    s = settings
    if n_seeds < 1:
        raise ValueError(f"n_seeds must be >= 1, got {n_seeds}")
    if retained is not None and concept_key in retained:
        raise ValueError(f"the forgotten concept {concept_key!r} cannot also be retained")
    if prompts is None:
        raise ValueError(f"give the forget prompt(s) of {concept_key!r} with prompts= "
                         f"(world concepts: unlearn.world.records.world_prompts)")
    if retained is None or reference_images is None:
        raise ValueError("give the retained concepts (label -> prompt) and their reference_images for the FD "
                         "(world concepts: unlearn.world.records.world_prompts and world_fd_reference)")

    p, labels = ua_labels(pipe, prompts, range(n_seeds), classifier, concept_key, s.guidance_scale,
                          s.num_inference_steps)
    ua = ua_from_labels(labels, concept_key)

    # retained concepts: recognition and FD
    keys = list(retained)
    kept_prompts = [retained[k] for k in keys for _ in range(s.fd_seeds)]
    kept_seeds = [i for _ in keys for i in range(s.fd_seeds)]
    kept = generate_images(pipe, kept_prompts, kept_seeds, s.guidance_scale, s.num_inference_steps)
    kept_labels = classifier.predict(kept)
    per_concept = {k: 100.0 * float(np.mean([lab == k for lab in kept_labels[i * s.fd_seeds:(i + 1) * s.fd_seeds]]))
                   for i, k in enumerate(keys)}
    extract = fd_features or getattr(classifier, "features", None)
    space = fd_space or getattr(classifier, "feature_space", None)
    if extract is None or not space:
        raise ValueError("the FD needs features: give a classifier with features()/feature_space, or fd_features "
                         "and fd_space")
    fd = feature_fd(kept, reference_images, extract, space)

    # K_C / K_N on the forget images
    knowledge = forget_knowledge(pipe, forget_records, s.timesteps, s.noise_seed, s.lam, s.reduce, adapter) \
        if forget_records else None

    return {
        "concept": concept_key, "ua": ua, "fd": fd["fd"], "fd_space": fd["fd_space"], "fd_reference": reference_name,
        "K_C": None if knowledge is None else knowledge["K_C"], "K_N": None if knowledge is None else knowledge["K_N"],
        "TS": train_steps, "TI": train_images if train_images is not None else (len(forget_records) if forget_records else None),
        "ua_detail": {"n": len(labels), "prompts": sorted(set(p)), "labels": dict(Counter(labels))},
        "retained": per_concept, "retained_mean": float(np.mean(list(per_concept.values()))),
        "fd_n": fd["n"], "knowledge": knowledge,
        "settings": {"n_seeds": n_seeds, "guidance_scale": s.guidance_scale, "num_inference_steps": s.num_inference_steps,
                     "fd_seeds": s.fd_seeds},
    }
