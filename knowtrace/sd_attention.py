"""Cross-attention capture for diffusers UNets (Stable Diffusion's ``attn2`` layers).

Usage::

    with capture_cross_attention(pipe.unet, cfg=True) as cap:   # tracing: detached, no gradient
        pipe(prompt, guidance_scale=4.0, ...)
    maps = cap.maps(size=(512, 512))             # (batch, tokens, 512, 512): mean over heads, layers, calls
    concept = token_map(maps, [5, 6])            # (batch, 512, 512): the concept's tokens summed

    with capture_cross_attention(unet, keep_grad=True) as cap:  # training: a loss on the probabilities
        unet(z_t, t, encoder_hidden_states=cond)
        loss = sum(p[..., concept_tokens].sum(-1).mean() for p in cap.probs())

How: attaching sets a :class:`RecordingProcessor` on every chosen ``attn2`` layer (found once, when the
capture is built) and detaching sets the original processors back. The layer's output stays the
original processor's own output (bit-identical: SDPA, classic, sliced...); the probabilities are
computed beside it from the same projections, ``softmax(Q K^T * attn.scale [+ mask])`` per head (float32
when the layer upcasts). With ``keep_grad=True`` they stay in the graph, so a loss on them reaches
``to_q``/``to_k``: what Forget-Me-Not's attention loss trains.

Shapes: a record is ``(batch, heads, h*w, text_tokens)``, ``(h, w)`` the layer's grid, found from the
latent size of the UNet call (a forward pre-hook) halved per UNet level, rounding up as diffusers'
strided convolutions do. ``cfg=True`` keeps the conditional half of a ``[uncond, cond]`` batch;
``mean_heads`` and ``tokens`` shrink what is kept (SD 1.x at 64x64 latents: 10 MB per layer, call, image).

Caveat: ``attn.scale`` is ``head_dim ** -0.5`` unless a model sets ``scale_qk=False`` (SDPA always
uses ``head_dim ** -0.5``; they agree for SD).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .capture import Capture


@dataclass(frozen=True)
class AttentionRecord:
    """One call of one layer: ``probs`` (batch, heads, h*w, tokens) on the grid ``(h, w)``."""

    layer: str  # e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    call: int  # 0, 1, ... per layer (the denoising step order inside a pipeline call)
    probs: torch.Tensor
    hw: tuple[int, int]


def _grid(n: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) with h*w == n: the latent grid downsampled k times (ceil), or a square when unknown."""
    if latent_hw is not None:
        h, w = latent_hw
        for _ in range(16):
            if h * w == n:
                return h, w
            if h == 1 and w == 1:
                break
            h, w = math.ceil(h / 2), math.ceil(w / 2)
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"cannot tell the spatial grid of {n} query positions (latent size {latent_hw}); "
                         "call the UNet with a 4-d latent sample")
    return side, side


class RecordingProcessor:
    """Wraps an ``attn2`` layer's processor: returns its output unchanged, records the probabilities."""

    def __init__(self, original, name: str, capture: CrossAttentionCapture):
        self.original = original
        self.name = name
        self.capture = capture

    def __call__(self, attn, hidden_states, *args, **kwargs):
        # the original gets exactly the call we got; we read the same arguments it reads
        out = self.original(attn, hidden_states, *args, **kwargs)
        named = {**dict(zip(("encoder_hidden_states", "attention_mask", "temb"), args)), **kwargs}
        if named.get("encoder_hidden_states") is not None:  # attn2 is always called with the text states
            with torch.set_grad_enabled(self.capture.keep_grad and torch.is_grad_enabled()):
                probs = _attention_probs(attn, hidden_states, named["encoder_hidden_states"],
                                         named.get("attention_mask"), named.get("temb"))
            self.capture._record(self.name, probs)
        return out


def _attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask, temb) -> torch.Tensor:
    """(batch, heads, query_len, key_len) as AttnProcessor2_0 would attend (same pre-processing)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:  # (B, C, H, W) -> (B, H*W, C)
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch, key_len, _ = encoder_hidden_states.shape
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)  # (B, Lq, inner)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)  # (B, Lk, inner)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, Lq, d)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, Lk, d)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    dtype = query.dtype
    if attn.upcast_attention or attn.upcast_softmax:
        query, key = query.float(), key.float()
    scores = query @ key.transpose(-1, -2) * attn.scale  # (B, heads, Lq, Lk)
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, key_len, batch)  # (B*heads, 1 or Lq, Lk)
        scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1]).to(scores.dtype)
    return scores.softmax(dim=-1).to(dtype)


class CrossAttentionCapture(Capture):
    """A :class:`~knowtrace.capture.Capture` of ``attn2`` attention probabilities (see the module docs);
    ``read()`` returns and forgets the records, :meth:`probs` / :meth:`maps` reduce them in place.

    layers: None (every ``attn2`` layer), layer names (``.processor`` suffix optional) or a predicate on
    the name. keep_grad: keep the probabilities in the graph (for a loss). cfg: keep the conditional half
    of each batch. mean_heads: keep the head mean. tokens: keep these text-token columns. to_cpu: move
    kept (detached) records to the CPU.
    """

    def __init__(self, unet, layers: Sequence[str] | Callable[[str], bool] | None = None, *, keep_grad: bool = False,
                 cfg: bool = False, mean_heads: bool = False, tokens: Sequence[int] | None = None,
                 to_cpu: bool = False):
        if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
            raise TypeError(f"expected a diffusers UNet (with attn_processors / set_attn_processor), got {type(unet).__name__}")
        if keep_grad and to_cpu:
            raise ValueError("to_cpu=True copies records off the device, which a loss cannot train through; "
                             "use it with keep_grad=False")
        super().__init__(unet)
        self.unet = unet
        self.keep_grad = keep_grad
        self.cfg = cfg
        self.mean_heads = mean_heads
        self.tokens = None if tokens is None else list(tokens)
        self.to_cpu = to_cpu
        bare = [n.removesuffix(".processor") for n in unet.attn_processors if n.endswith("attn2.processor")]
        if not bare:
            raise ValueError("this UNet has no cross-attention (attn2) layers to capture")
        if layers is None:
            chosen = bare
        elif callable(layers):
            chosen = [n for n in bare if layers(n)]
        else:
            chosen = [n.removesuffix(".processor") for n in layers]
            unknown = sorted(set(chosen) - set(bare))
            if unknown:
                raise ValueError(f"not cross-attention layers of this UNet: {unknown}; choose among {bare}")
        if not chosen:
            raise ValueError(f"no cross-attention layer selected; choose among {bare}")
        self.layers: list[str] = [n for n in bare if n in set(chosen)]  # UNet order
        # the Attention modules, found once (get_submodule goes through getattr: a peft wrapper forwards it)
        self._modules = {n: unet.get_submodule(n) for n in self.layers}
        self.records: dict[str, list[AttentionRecord]] = {n: [] for n in self.layers}
        self._originals: dict | None = None
        self._latent_hw: tuple[int, int] | None = None

    # ------------------------------------------------------------------ attach / detach

    def _install(self) -> None:
        if any(isinstance(m.processor, RecordingProcessor) for m in self._modules.values()):
            raise RuntimeError("cross-attention capture is already attached to this UNet (through another "
                               "wrapper of it); captures do not nest")
        self._originals = {n: m.processor for n, m in self._modules.items()}
        for n, m in self._modules.items():
            m.set_processor(RecordingProcessor(self._originals[n], n, self))
        self._handles = [self.unet.register_forward_pre_hook(self._pre_forward, with_kwargs=True)]

    def _remove(self) -> None:
        """Set the original processors back; the records stay readable."""
        super()._remove()
        if self._originals is not None:
            for n, original in self._originals.items():
                self._modules[n].set_processor(original)
            self._originals = None

    def _pre_forward(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            self._latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    def _record(self, name: str, probs: torch.Tensor) -> None:
        # probs: (batch, heads, h*w, tokens)
        if self.cfg:
            if probs.shape[0] % 2:
                raise ValueError(f"cfg=True expects a [uncond, cond] batch of even size, got {probs.shape[0]} "
                                 f"at layer {name}; use cfg=False when not sampling with guidance")
            probs = probs[probs.shape[0] // 2:]
        if self.tokens is not None:
            probs = probs[..., self.tokens]
        if self.mean_heads:
            probs = probs.mean(1, keepdim=True)
        if not self.keep_grad:
            probs = probs.detach()
            if self.to_cpu:
                probs = probs.cpu()
        hw = _grid(probs.shape[2], self._latent_hw)
        self.records[name].append(AttentionRecord(name, len(self.records[name]), probs, hw))

    # ------------------------------------------------------------------ reading

    def clear(self) -> None:
        """Forget every record (e.g. between training steps)."""
        for v in self.records.values():
            v.clear()

    def all(self) -> list[AttentionRecord]:
        return [r for n in self.layers for r in self.records[n]]

    def read(self) -> list[AttentionRecord]:
        """Every record, layer then call order, forgotten here."""
        records = self.all()
        self.clear()
        return records

    def probs(self, layers: Iterable[str] | None = None) -> list[torch.Tensor]:
        """Every recorded ``(batch, heads, h*w, tokens)`` tensor of the chosen layers, layer then call order."""
        names = self.layers if layers is None else [n.removesuffix(".processor") for n in layers]
        return [r.probs for n in names for r in self.records[n]]

    def by_resolution(self) -> dict[tuple[int, int], list[AttentionRecord]]:
        """Records grouped by their grid (h, w), largest grid first."""
        return group_by_resolution(self.all())

    def maps(self, resolutions: Iterable[tuple[int, int]] | None = None, calls: Iterable[int] | None = None,
             size: tuple[int, int] | None = None, layers: Iterable[str] | None = None) -> torch.Tensor:
        """(batch, tokens, H, W): mean over heads, calls and layers; see :func:`mean_maps`."""
        names = set(self.layers if layers is None else [n.removesuffix(".processor") for n in layers])
        return mean_maps([r for r in self.all() if r.layer in names], resolutions, calls, size)


capture_cross_attention = CrossAttentionCapture  # ``with capture_cross_attention(unet, ...) as cap:``


# ---------------------------------------------------------------------- reductions


def group_by_resolution(records: Iterable[AttentionRecord]) -> dict[tuple[int, int], list[AttentionRecord]]:
    groups: dict[tuple[int, int], list[AttentionRecord]] = {}
    for r in records:
        groups.setdefault(r.hw, []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: -kv[0][0] * kv[0][1]))


def spatial(probs: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(batch, heads, h*w, tokens) -> (batch, tokens, h, w), mean over heads."""
    b, _, n, t = probs.shape
    if n != hw[0] * hw[1]:
        raise ValueError(f"{n} query positions do not fill the grid {hw}")
    return probs.mean(1).transpose(1, 2).reshape(b, t, hw[0], hw[1])


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., h, w) -> (..., H, W), bilinear (align_corners=False: pixel centres line up at any scale)."""
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x.reshape(*lead, *size).to(maps.dtype)


def mean_maps(records: Sequence[AttentionRecord], resolutions: Iterable[tuple[int, int]] | None = None,
              calls: Iterable[int] | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(batch, tokens, H, W): each record's map (mean over heads) upsampled to ``size`` (default: the
    largest chosen grid), then averaged over records (layers x calls), every record weighing the same.

    resolutions: keep records on these grids only (e.g. ``[(16, 16)]``: SD 1.x's 16x16 maps are the
    most semantic); calls: keep these call indices only (e.g. the first denoising steps)."""
    res = None if resolutions is None else {tuple(r) for r in resolutions}
    keep = None if calls is None else set(calls)
    chosen = [r for r in records if (res is None or r.hw in res) and (keep is None or r.call in keep)]
    if not chosen:
        have = sorted({r.hw for r in records})
        raise ValueError(f"no cross-attention record matches resolutions={resolutions} calls={calls}; "
                         f"recorded grids: {have}, {len(records)} records (was anything run inside the capture?)")
    if size is None:
        size = max((r.hw for r in chosen), key=lambda hw: hw[0] * hw[1])
    maps = (spatial(r.probs, r.hw) for r in chosen)
    return sum(m if tuple(m.shape[-2:]) == tuple(size) else upsample(m, size) for m in maps) / len(chosen)


def token_map(maps: torch.Tensor, token_indices: Sequence[int], size: tuple[int, int] | None = None) -> torch.Tensor:
    """(batch, tokens, h, w) -> (batch, h, w): the attention mass on the given tokens (summed: a
    multi-token name's tokens share the mass a one-token name would get), upsampled to ``size``."""
    idx = list(token_indices)
    if not idx:
        raise ValueError("token_indices is empty: give the concept's token positions in the prompt")
    if max(idx) >= maps.shape[1] or min(idx) < -maps.shape[1]:
        raise ValueError(f"token index out of range for {maps.shape[1]} text tokens: {idx}")
    m = maps[:, idx].sum(1)
    return m if size is None else upsample(m, size)
