"""Traced answers (:class:`TracedSample`) and :class:`SampleTrace`, which writes one step of a set of them
(per-token log-probs, K_C / K_N, cross-attention) from rows of captured forwards to its store. The
tracer's samples and a probe set are each one ``SampleTrace``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .knowledge import mllm_knowledge
from .logprobs import IGNORE_INDEX, Forward
from .mllm_attention import AttentionCapture, stack_layers
from .store import TraceStore, index_samples, token_coords


@dataclass
class TracedSample:
    """One traced answer: its id, answer token ids and strings, and which tokens are the concept's.

    ``input_ids``: the sample's full (unpadded) model input ids; optional, used to tell samples with
    the same answer apart when rows are matched by content (HF Trainer)."""

    id: str
    token_ids: Sequence[int]
    token_strs: Sequence[str]
    is_concept: Sequence[bool]
    concept: str = ""
    input_ids: Sequence[int] | None = None


class SampleTrace:
    """The store of one sample set (the traced samples, or a probe set): static coords once, then
    one slice per step built from matched rows of captured forwards. ``attention``: the capture whose
    maps the rows carry (None: no attention variables); ``sae``: the SAEActCapture whose feature
    activations they carry (None: no ``sae_act``); ``attr_grid``: the patch grid of the attribution maps the
    rows carry (probe mode with attribution; None: no ``attr``)."""

    def __init__(self, path, samples: Sequence[TracedSample], attrs: dict | None, map_dtype: str,
                 attention: AttentionCapture | None = None, flush_seconds: float = 0.0, sae=None,
                 attr_grid: tuple[int, int] | None = None):
        self.samples = list(samples)
        self.index = index_samples(self.samples)
        self.attention = attention
        static = {"sample_id": np.array([s.id for s in self.samples]), **token_coords(self.samples),
                  "concept": np.array([s.concept for s in self.samples])}
        if attention is not None:
            static["layer"] = np.array(attention.layers, dtype=np.int64)
        self.sae = sae
        if sae is not None:
            static["feature"] = np.array(sae.features, dtype=np.int64)
        self.width = static["token_id"].shape[1]
        self.attr_grid = attr_grid
        self._concept = torch.from_numpy(static["is_concept"])
        self.store = TraceStore(path, static=static, attrs=attrs, map_dtype=map_dtype, flush_seconds=flush_seconds)

    def write(self, step: int, rows: Sequence[tuple[int, Forward, int]], losses: dict | None = None) -> None:
        """Append ``step`` from ``rows`` = (sample index, forward, batch row); other samples are NaN."""
        n = len(self.samples)
        logprob = np.full((n, self.width), np.nan, dtype=np.float32)
        head = None
        if self.attention is not None:
            if self.attention.grid is None:
                raise ValueError("the patch grid is not known yet (no image was recorded): pass "
                                 "AttentionOptions(grid=(y, x))")
            shape = (n, len(self.attention.layers), self.attention.n_heads, self.width, *self.attention.grid)
            head = np.full(shape, np.nan, dtype=np.float32)
        sae_act = None if self.sae is None else np.full((n, self.width, len(self.sae.features)), np.nan, np.float32)
        attr = None if self.attr_grid is None else np.full((n, self.width, *self.attr_grid), np.nan, np.float32)
        attr_delta = None if attr is None else np.full((n, self.width), np.nan, np.float32)
        for si, call, r in rows:
            values = call.logp[r][call.labels[r] != IGNORE_INDEX]
            logprob[si, : len(values)] = values.float().cpu().numpy()
            if head is not None and call.maps is not None and call.maps[r]:
                # (layer, heads, n_answer, gy, gx); float: maps computed under bf16 autocast are bf16, which numpy lacks
                m = stack_layers(call.maps[r], self.attention.layers).float().numpy()
                head[si, :, : m.shape[1], : m.shape[2]] = m
            if sae_act is not None and call.sae_acts is not None:
                sae_act[si, : call.sae_acts[r].shape[0]] = call.sae_acts[r].numpy()
            if attr is not None and call.attr is not None and call.attr[r] is not None:
                maps, delta = call.attr[r]  # (n_answer, gy, gx), (n_answer,)
                attr[si, : maps.shape[0]], attr_delta[si, : delta.shape[0]] = maps.numpy(), delta.numpy()
        k_c, k_n = mllm_knowledge(torch.from_numpy(logprob), self._concept)
        unseen = np.isnan(logprob).all(1)  # samples not in this step: K is NaN, not an empty sum
        values = {"logprob": logprob, "K_C": np.where(unseen, np.nan, k_c.numpy()),
                  "K_N": np.where(unseen, np.nan, k_n.numpy())}
        if sae_act is not None:
            values["sae_act"] = sae_act
        if attr is not None:  # NaN at probe steps without attribution
            values["attr"], values["attr_delta"] = attr, attr_delta
        for key in ("loss_forget", "loss_retain"):
            values[key] = np.float32((losses or {}).get(key, np.nan))
        if head is not None:
            with warnings.catch_warnings():  # all-NaN slices (samples not in this step) stay NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                values["xattn"] = np.nanmean(head, axis=2) if self.attention.n_heads > 1 else head[:, :, 0]
            if self.attention.options.heads == "all":
                values["xattn_head"] = head
        self.store.append(step, **values)
