"""Sparse autoencoders on a language model's residual stream: a TopK SAE, its training, its quality, and
SAELens' on-disk layout (``cfg.json`` + ``sae_weights.safetensors``).

The SAE is the TopK autoencoder of Gao et al. 2024 ("Scaling and evaluating sparse autoencoders"), with
parameters named and shaped as SAELens stores them::

    pre  = (x - b_dec) @ W_enc + b_enc          W_enc (d_in, d_sae), b_enc (d_sae), b_dec (d_in)
    acts = the k largest of pre, through ReLU; every other feature 0
    x^   = acts @ W_dec + b_dec                 W_dec (d_sae, d_in), rows of unit norm

Choices (each written into ``cfg.json`` under ``"knowtrace"``):

- **unit-norm decoder rows**, as Gao et al.: after every optimiser step the rows are renormalised, and
  before it the gradient component parallel to each row is removed (otherwise Adam spends part of its
  step growing a row's norm, which the renormalisation then undoes, and a row's scale would trade
  against its feature's activation). A feature's activation is then the length of its contribution to
  the reconstruction, comparable across features.
- **initialisation** as Gao et al.: random unit decoder rows, ``W_enc = W_dec^T``, ``b_enc = 0``; ``b_dec``
  the *mean* of the data (Gao et al. take the geometric median; the mean costs one pass and, the
  decoder bias being trained anyway, only the start differs).
- **input normalisation**: training sees the activations scaled by one scalar ``s`` so that the mean
  squared norm is ``d_in`` (SAELens' "expected_average_only_in"), so that one learning rate fits models
  whose residual norms differ by orders of magnitude. ``s`` is folded back before the SAE is returned
  (``b_enc / s``, ``b_dec / s``; TopK is positively homogeneous and the decoder stays unit-norm, so the
  fold is exact): the saved SAE reads raw activations and its ``normalize_activations`` is "none".
- **no auxiliary loss** (Gao et al.'s AuxK): dead features are measured and reported instead
  (:func:`sae_quality`).

SAELens' layout was read at jbloomAus/SAELens commit 91ca16ccd0684e4dd6323cd4f23ded734339ec54 (6.18.0:
``SAE.load_from_disk``, ``handle_pre_6_0_config``, ``TopKSAEConfig``) and tag v5.11.0 (commit
a616abc57c7ada7090542270bb731f0c6da43567: the flat ``SAEConfig``). :func:`save_sae` writes the flat 5.x
form (``architecture`` "topk", ``activation_fn_str`` "topk", ``activation_fn_kwargs`` {"k": k},
``hook_name``, ``hook_layer``, ...) plus the 6.x field ``k`` and no ``sae_lens_version``: SAELens 5.x
reads it as it is, and 6.x converts it through its pre-6.0 path into a ``TopKSAE`` whose ``state_dict``
keys are exactly ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

SAE_CFG_FILE = "cfg.json"
SAE_WEIGHTS_FILE = "sae_weights.safetensors"
PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_dec")


class TopKSAE(torch.nn.Module):
    """A TopK sparse autoencoder (module docstring). ``encode`` keeps ``k`` features per row."""

    def __init__(self, d_in: int, d_sae: int, k: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if d_in < 1 or d_sae < 1:
            raise ValueError(f"d_in and d_sae must be >= 1, got d_in={d_in}, d_sae={d_sae}")
        if not 1 <= k <= d_sae:
            raise ValueError(f"k must be in 1..d_sae={d_sae}, got {k}")
        self.k = int(k)
        empty = dict(dtype=dtype, device=device)
        self.W_enc = torch.nn.Parameter(torch.zeros(d_in, d_sae, **empty))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae, **empty))
        self.W_dec = torch.nn.Parameter(torch.zeros(d_sae, d_in, **empty))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in, **empty))

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_sae): the encoder's pre-activations of x (..., d_in)."""
        return (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) feature activations: per row the k largest pre-activations through ReLU, others 0."""
        pre = self.pre_acts(x)
        top, index = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, index, top.relu())

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """(..., d_in): the reconstruction ``acts @ W_dec + b_dec``."""
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction (..., d_in), feature activations (..., d_sae))."""
        acts = self.encode(x)
        return self.decode(acts), acts


# ---------------------------------------------------------------------------------------------- training
def _check_acts(acts: torch.Tensor) -> None:
    if not torch.is_tensor(acts) or acts.ndim != 2 or acts.shape[0] < 1 or not acts.is_floating_point():
        shape = tuple(acts.shape) if torch.is_tensor(acts) else type(acts).__name__
        raise ValueError(f"acts must be a floating (N, d_in) tensor with N >= 1, got {shape}")
    if not torch.isfinite(acts).all():
        raise ValueError("acts hold NaN or infinite values: capture them again (a model in float16 overflowing?)")


@torch.no_grad()
def _unit_rows(w: torch.Tensor) -> None:
    w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))


def train_sae(acts: torch.Tensor, d_sae: int, k: int, steps: int = 1000, lr: float = 1e-3, batch_size: int = 1024,
              seed: int = 0, progress: bool = True) -> TopKSAE:
    """A TopK SAE trained on ``acts`` (N, d_in) with Adam on the mean squared reconstruction error, on the
    device of ``acts``. Batches are drawn uniformly with replacement; the initialisation and the batches
    come from a generator seeded with ``seed`` (on the CPU: the same SAE for a seed, run after run).
    Choices and why: the module docstring."""
    _check_acts(acts)
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"steps and batch_size must be >= 1 and lr > 0, got steps={steps}, batch_size={batch_size}, "
                         f"lr={lr}")
    n, d_in = acts.shape
    device = acts.device
    sae = TopKSAE(d_in, d_sae, k, device=device)  # checks k and d_sae
    gen = torch.Generator().manual_seed(seed)
    # one scalar: mean squared norm d_in during training (folded back at the end)
    scale = math.sqrt(d_in) / float(acts.float().pow(2).sum(1).mean().sqrt().clamp_min(1e-12))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen))
        _unit_rows(sae.W_dec)
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(acts.float().mean(0) * scale)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    bar = tqdm(range(steps), desc=f"SAE d_sae={d_sae} k={k}", disable=not progress, leave=False)
    for _ in bar:
        x = acts[torch.randint(n, (batch_size,), generator=gen).to(device)].float() * scale
        top, index = sae.pre_acts(x).topk(k, dim=-1, sorted=False)  # (batch, k)
        # decode from the k active rows only: a weighted sum of k decoder rows per input (embedding_bag;
        # measured 1.6x faster per step than the dense product with d_sae - k zeros on the world MLLM's sizes)
        recon = torch.nn.functional.embedding_bag(index, sae.W_dec, per_sample_weights=top.relu(), mode="sum")
        recon = recon + sae.b_dec
        loss = (recon - x).pow(2).sum(1).mean() / d_in  # per-element MSE in normalised units
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # keep only the gradient that turns each decoder row, not the one that grows it
            w, g = sae.W_dec, sae.W_dec.grad
            g.sub_((g * w).sum(1, keepdim=True) * w)
        opt.step()
        _unit_rows(sae.W_dec.data)
        bar.set_postfix(mse=f"{loss.item():.4f}", refresh=False)
    with torch.no_grad():  # fold the scale: the SAE reads raw activations
        sae.b_enc.div_(scale)
        sae.b_dec.div_(scale)
    sae.zero_grad(set_to_none=True)  # a trained SAE carries no gradients (they would follow it across devices)
    return sae.requires_grad_(False)


@torch.no_grad()
def sae_quality(sae: TopKSAE, acts: torch.Tensor, batch_size: int = 4096) -> dict:
    """How well ``sae`` reconstructs ``acts`` (N, d_in), in batches:

    ``explained_variance`` 1 - sum ||x - x^||^2 / sum ||x - mean(x)||^2; ``l0`` the mean number of
    nonzero features per row; ``dead_fraction`` the share of features nonzero on no row of ``acts``;
    ``mse`` sum ||x - x^||^2 / (N * d_in); ``rows`` N."""
    _check_acts(acts)
    if acts.shape[1] != sae.d_in:
        raise ValueError(f"acts have width {acts.shape[1]}, the SAE reads {sae.d_in}")
    n = acts.shape[0]
    mean = acts.double().mean(0)
    sq_err = sq_dev = nonzero = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.W_enc.device)
    for start in range(0, n, batch_size):
        x = acts[start:start + batch_size].to(sae.W_enc.device, sae.W_enc.dtype)
        recon, z = sae(x)
        sq_err += float((x - recon).double().pow(2).sum())
        sq_dev += float((x.double() - mean.to(x.device)).pow(2).sum())
        active = z != 0
        nonzero += float(active.sum())
        fired |= active.any(0)
    return {"explained_variance": 1.0 - sq_err / sq_dev if sq_dev > 0 else float("nan"),
            "l0": nonzero / n, "dead_fraction": float((~fired).float().mean()), "mse": sq_err / (n * sae.d_in),
            "rows": n}


# ---------------------------------------------------------------------------------------------- SAELens layout
def save_sae(sae: TopKSAE, directory: str | os.PathLike, *, model_name: str, hook_name: str, layer: int,
             positions: tuple[str, ...] | list[str], context_size: int | None = None, dataset_path: str = "",
             prepend_bos: bool = True, extra: dict | None = None) -> Path:
    """Write ``sae`` to ``directory`` in SAELens' layout (module docstring): ``cfg.json`` and
    ``sae_weights.safetensors``. ``model_name``: what the SAE was trained on (checked by :func:`load_sae`);
    ``hook_name``: the module whose output it reads (:func:`knowtrace.sae_capture.residual_module`);
    ``layer``: the decoder layer (SAELens' ``hook_layer``); ``positions``: the kinds of positions of the
    training data; ``context_size``: the longest training sequence; ``extra``: more JSON under
    ``"knowtrace"`` (e.g. the quality). Everything is checked before anything is written."""
    if not isinstance(sae, TopKSAE):
        raise ValueError(f"save_sae takes a TopKSAE, got {type(sae).__name__}")
    if not model_name or not hook_name:
        raise ValueError("give model_name and hook_name: load_sae checks an SAE against them")
    if not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a decoder layer index >= 0, got {layer!r}")
    dtype = str(sae.W_enc.dtype).removeprefix("torch.")
    knowtrace = {"layer": layer, "positions": list(positions), "decoder_rows": "unit norm",
                 "b_dec_init": "mean", "training_normalisation": "scalar to mean squared norm d_in, folded",
                 **(extra or {})}
    cfg = {
        "architecture": "topk", "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k,
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": sae.k},
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "normalize_activations": "none",
        "rescale_acts_by_decoder_norm": False, "reshape_activations": "none",
        "model_name": model_name, "hook_name": hook_name, "hook_layer": layer, "hook_head_index": None,
        "context_size": context_size, "prepend_bos": prepend_bos, "dataset_path": dataset_path,
        "dataset_trust_remote_code": False, "dtype": dtype, "device": "cpu", "sae_lens_training_version": None,
        "neuronpedia_id": None, "model_from_pretrained_kwargs": {}, "seqpos_slice": [None],
        "knowtrace": knowtrace,
    }
    text = json.dumps(cfg, indent=1)  # fails here, before writing, on a value JSON cannot hold
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: getattr(sae, name).detach().contiguous().cpu() for name in PARAMETERS},
              out / SAE_WEIGHTS_FILE, metadata={"format": "pt"})
    (out / SAE_CFG_FILE).write_text(text)
    return out


def _cfg_value(cfg: dict, key: str):
    """A cfg field, flat (SAELens 5.x, what save_sae writes) or under ``metadata`` (SAELens 6.x)."""
    return cfg[key] if key in cfg else (cfg.get("metadata") or {}).get(key)


def read_sae_cfg(directory: str | os.PathLike) -> dict:
    """The ``cfg.json`` of an SAE directory, checked to be a TopK SAE's."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: give the directory save_sae wrote")
    for name in (SAE_CFG_FILE, SAE_WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an SAE directory: it has no {name} (SAELens layout: {SAE_CFG_FILE} "
                                    f"+ {SAE_WEIGHTS_FILE})")
    try:
        cfg = json.loads((path / SAE_CFG_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / SAE_CFG_FILE} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path / SAE_CFG_FILE} holds no JSON object")
    missing = [key for key in ("d_in", "d_sae") if key not in cfg]
    if missing:
        raise ValueError(f"{path / SAE_CFG_FILE} lacks {missing}: not an SAE config")
    topk = cfg.get("architecture") == "topk" or cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk"
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if not topk or not isinstance(k, int):
        raise ValueError(f"{path / SAE_CFG_FILE} is not a TopK SAE's config (architecture "
                         f"{cfg.get('architecture')!r}, k {k!r}); knowtrace reads TopK SAEs")
    if cfg.get("normalize_activations", "none") not in ("none", None, False):
        raise ValueError(f"{path / SAE_CFG_FILE}: normalize_activations {cfg['normalize_activations']!r} is not "
                         f"supported (knowtrace's SAEs read raw activations: 'none')")
    return {**cfg, "k": k}


def load_sae(directory: str | os.PathLike, *, model_name: str | None = None, hook_name: str | None = None,
             layer: int | None = None, device=None) -> tuple[TopKSAE, dict]:
    """(the SAE, its cfg) from an SAELens-layout directory. ``model_name``, ``hook_name``, ``layer``: what
    the caller will run it on; an SAE trained for another model, hook or layer is a ValueError naming both."""
    cfg = read_sae_cfg(directory)
    for key, want in (("model_name", model_name), ("hook_name", hook_name), ("hook_layer", layer)):
        have = _cfg_value(cfg, key)
        if want is not None and have != want:
            raise ValueError(f"the SAE in {directory} was trained for {key} {have!r}, not {want!r}: train one for "
                             f"this {key.removeprefix('hook_')} (or give the matching SAE)")
    try:
        weights = load_file(Path(directory) / SAE_WEIGHTS_FILE)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{Path(directory) / SAE_WEIGHTS_FILE} is not a readable safetensors file: {e}") from e
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    wrong = {name: tuple(weights[name].shape) if name in weights else "missing" for name in PARAMETERS
             if name not in weights or tuple(weights[name].shape) != shapes[name]}
    if wrong:
        raise ValueError(f"{Path(directory) / SAE_WEIGHTS_FILE} does not hold a d_in={d_in}, d_sae={d_sae} TopK SAE: "
                         f"{wrong} (expected {shapes})")
    sae = TopKSAE(d_in, d_sae, cfg["k"], dtype=weights["W_enc"].dtype)
    sae.load_state_dict({name: weights[name] for name in PARAMETERS})
    if cfg.get("rescale_acts_by_decoder_norm") and not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(d_sae),
                                                                       atol=1e-4):
        raise ValueError(f"{directory}: rescale_acts_by_decoder_norm with decoder rows not of unit norm is not "
                         f"supported")
    return sae.requires_grad_(False).to(device), cfg
