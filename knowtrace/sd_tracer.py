"""Tracing a Stable Diffusion unlearning run: per-latent-pixel noise errors, K_C / K_N, concept masks.

An SD training step already computes ``e_x = mean over channels of (y_theta(z_t, c, t) - y)^2``, ``y``
the UNet's training target (the noise ``eps`` under epsilon prediction, the velocity under
v-prediction); the tracer records it, no extra forward: ``record_errors(step, err, sample_ids)`` with
``err`` (batch, h, w), or ``record_target(step, target, sample_ids)`` with the target ``y`` (batch, C,
h, w) when the tracer was given the UNet (a forward hook kept the prediction of its last forward in
the step). (``eps_err`` keeps its name whatever the target.)

Per step it writes ``eps_err(step, sample, y, x)`` (NaN for samples not in the batch) and ``K_C``,
``K_N`` (:func:`knowtrace.knowledge.sd_knowledge`), with the static ``mask(sample, y, x)``. Steps are
buffered and written every ``flush_seconds`` (default 5 s); ``with SDTracer(...) as tr:`` flushes on
exit, also after an exception.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .capture import Capture
from .knowledge import sd_knowledge
from .store import TraceStore, index_samples, token_coords


@dataclass
class SDSample:
    """One traced training image: its id, its concept mask on the latent grid (h, w) and concept.
    With cross-attention maps (``record_errors(..., xattn=)``), also its prompt's text tokens: ids,
    strings and which of them are the concept's (the ``token`` dim of ``xattn`` is these positions)."""

    id: str
    mask: np.ndarray | torch.Tensor
    concept: str = ""
    token_ids: Sequence[int] | None = None
    token_strs: Sequence[str] | None = None
    is_concept: Sequence[bool] | None = None


class PredictionCapture(Capture):
    """A :class:`~knowtrace.capture.Capture` keeping (detached) the noise prediction (batch, C, h, w)
    of the UNet's last forward; ``read()`` returns it (None if the UNet made no forward since)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__(unet)
        self._prediction: torch.Tensor | None = None

    def _install(self) -> None:
        self._handles = [self.model.register_forward_hook(self._keep)]

    def _keep(self, module, args, output):
        sample = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        self._prediction = sample.detach()  # only the last forward of the step is kept

    def read(self) -> torch.Tensor | None:
        prediction, self._prediction = self._prediction, None
        return prediction


class SDTracer:
    """``map_dtype``: storage type of ``eps_err`` and ``xattn`` ("float16" halves them; K and losses
    are always float32)."""

    def __init__(self, path: str | os.PathLike, samples: Sequence[SDSample], unet: torch.nn.Module | None = None,
                 lam: float = 1.0, reduce: str = "mean", attrs: dict | None = None, map_dtype: str = "float32",
                 flush_seconds: float = 5.0):
        self.samples = list(samples)
        self.index = index_samples(self.samples)
        masks = [np.asarray(s.mask.cpu() if torch.is_tensor(s.mask) else s.mask) for s in self.samples]
        shapes = {m.shape for m in masks}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"sample masks must all be (h, w) on the same latent grid; got shapes {sorted(shapes)}")
        self.mask = np.stack(masks).astype(bool)  # (sample, h, w)
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        self.lam, self.reduce, self.unet = lam, reduce, unet
        static = {"sample_id": np.array([s.id for s in self.samples]), "concept": np.array([s.concept for s in self.samples]),
                  "mask": self.mask}
        with_tokens = [s.token_ids is not None for s in self.samples]
        if any(with_tokens) and not all(with_tokens):
            raise ValueError("give prompt tokens for every sample or for none")
        self.n_tokens = None
        if all(with_tokens):
            for s in self.samples:
                if not (len(s.token_ids) == len(s.token_strs or ()) == len(s.is_concept or ())):
                    raise ValueError(f"sample {s.id!r}: token_ids, token_strs and is_concept must have the same length")
            static.update(token_coords(self.samples))
            self.n_tokens = static["token_id"].shape[1]
        self.store = TraceStore(path, static=static, attrs=attrs, map_dtype=map_dtype, flush_seconds=flush_seconds)
        self.prediction = PredictionCapture(unet) if unet is not None else None

    # ------------------------------------------------------------------ hook (optional)
    def __enter__(self):
        if self.prediction is not None:
            self.prediction.attach()
        return self

    def __exit__(self, *exc):
        if self.prediction is not None:
            self.prediction.detach()
            self.prediction.read()
        self.flush()
        return False

    def flush(self) -> None:
        """Write buffered steps now (done on exit; call it when the tracer is used without ``with``)."""
        self.store.flush()

    def _xattn(self, xattn: torch.Tensor, rows: list[int]) -> np.ndarray:
        if self.n_tokens is None:
            raise ValueError("xattn needs the samples' prompt tokens: build the SDSamples with token_ids, "
                             "token_strs and is_concept")
        x = xattn.detach().float().cpu()
        if x.ndim != 5 or x.shape[0] != len(rows) or tuple(x.shape[3:]) != self.mask.shape[1:]:
            raise ValueError(f"xattn must be (batch={len(rows)}, layer, token, h, w) on the masks' grid "
                             f"{self.mask.shape[1:]}, got {tuple(x.shape)}")
        out = np.full((len(self.samples), x.shape[1], self.n_tokens, *self.mask.shape[1:]), np.nan, dtype=np.float32)
        n = min(self.n_tokens, x.shape[2])
        out[rows, :, :n] = x[:, :, :n].numpy()
        return out

    # ------------------------------------------------------------------ steps
    def record_target(self, step: int, target: torch.Tensor, sample_ids: Sequence[str], losses: dict | None = None):
        """Record from the hooked UNet's last prediction and the step's target (batch, C, h, w): the noise
        under epsilon prediction, ``scheduler.get_velocity(latents, noise, t)`` under v-prediction."""
        if self.prediction is None or not self.prediction.attached:
            raise RuntimeError("record_target needs the UNet hook: build the tracer with unet=... and enter it")
        pred = self.prediction.read()
        if pred is None:
            raise RuntimeError("the UNet made no forward since the last record; call record_target after the step")
        if pred.shape != target.shape:
            raise ValueError(f"target {tuple(target.shape)} does not match the UNet's output {tuple(pred.shape)}")
        with torch.no_grad():
            err = (pred.float() - target.detach().float()).pow(2).mean(1)  # (batch, h, w)
        self.record_errors(step, err, sample_ids, losses)

    def record_errors(self, step: int, err: torch.Tensor, sample_ids: Sequence[str], losses: dict | None = None,
                      xattn: torch.Tensor | None = None):
        """Record per-latent-pixel squared errors (batch, h, w), mean over channels, of the step's samples;
        ``xattn`` (batch, layer, token, h, w): their cross-attention maps on the latent grid (token =
        the samples' prompt tokens, which the samples must then carry)."""
        unknown = [i for i in sample_ids if i not in self.index]
        if unknown:
            raise KeyError(f"samples {unknown} are not traced; traced: {list(self.index)[:10]}...")
        err = err.detach().float().cpu()
        if err.ndim != 3 or err.shape[0] != len(sample_ids) or tuple(err.shape[1:]) != self.mask.shape[1:]:
            raise ValueError(f"err must be (batch={len(sample_ids)}, h, w) on the masks' grid {self.mask.shape[1:]}, "
                             f"got {tuple(err.shape)} (mean the squared error over channels first)")
        rows = [self.index[i] for i in sample_ids]
        eps_err = np.full(self.mask.shape, np.nan, dtype=np.float32)
        eps_err[rows] = err.numpy()
        k_c = np.full(len(self.samples), np.nan, dtype=np.float32)
        k_n = k_c.copy()
        kc, kn = sd_knowledge(err, torch.from_numpy(self.mask[rows]), self.lam, self.reduce)
        k_c[rows], k_n[rows] = kc.numpy(), kn.numpy()
        values = {"eps_err": eps_err, "K_C": k_c, "K_N": k_n}
        if xattn is not None:
            values["xattn"] = self._xattn(xattn, rows)
        for key in ("loss_forget", "loss_retain"):
            values[key] = np.float32((losses or {}).get(key, np.nan))
        self.store.append(step, **values)
