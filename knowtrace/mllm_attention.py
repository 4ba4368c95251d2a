"""Cross-attention of answer tokens to image patches in a Hugging Face MLLM's language model.

The seam is transformers' ``AttentionInterface``: while a capture is attached, the language model's
``config._attn_implementation`` is switched from ``"sdpa"`` / ``"eager"`` to ``"knowtrace_<original>"``,
a registered function that calls the original for the output (outputs and gradients are exactly the
untraced model's) and, for the chosen layers of a recorded forward, recomputes
``softmax(Q K^T * scale + mask)`` in float32 without gradient for the recorded rows over all key
columns (the normaliser needs them all), then keeps the image-patch columns. The mask is the
original's (its mask function is registered under the new name too); grouped-query key heads are
repeated as ``repeat_kv`` does.

Rows and columns of one recorded forward (:func:`targets`): row ``t`` is the query position
``p_t - 1`` that *predicts* answer token ``t`` (shifted like the log-probs, so row t's map is the
attention that produced ``logprob[t]``); columns are the image-token positions in ``input_ids``,
reshaped row-major to the patch grid ``(y, x)``: LLaVA ``sqrt(n)`` (its default feature strategy drops
CLS), Qwen2-VL ``(h / merge, w / merge)`` from ``image_grid_thw``. One image per sample. Several models
can be captured at once: the function finds its capture by the identity of the module's config.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .capture import Capture, host_copies
from .logprobs import IGNORE_INDEX

PREFIX = "knowtrace_"
SUPPORTED = ("sdpa", "eager")

_CAPTURES: dict[int, "AttentionCapture"] = {}  # id(language model config) -> its active capture


@dataclass(frozen=True)
class AttentionOptions:
    """What to record. ``layers``: decoder layer indices (negative counts from the end);
    ``heads``: "mean" (the head mean, variable ``xattn``) or "all" (also ``xattn_head`` with a
    ``head`` dim); ``on_steps``: record on training steps' forwards too (False: probes only);
    ``grid``: the patch grid (y, x) when it cannot be read from the config before the first capture."""

    layers: tuple[int, ...] = (-1,)
    heads: str = "mean"
    on_steps: bool = True
    grid: tuple[int, int] | None = None

    def __post_init__(self):
        if self.heads not in ("mean", "all"):
            raise ValueError(f"heads must be 'mean' or 'all', got {self.heads!r}")
        if not self.layers:
            raise ValueError("give at least one layer to record attention from")


@dataclass
class Target:
    """One batch row of a recorded forward: query rows, image columns and their grid."""

    rows: torch.Tensor  # (n_answer,) query positions, one per answer token (p_t - 1)
    cols: torch.Tensor  # (gy * gx,) image-token positions, row-major over the grid
    grid: tuple[int, int]


def _knowtrace_attention(module, query, key, value, attention_mask, **kwargs):
    capture = _CAPTURES.get(id(module.config))
    if capture is None:
        raise RuntimeError("a knowtrace attention implementation is set on a model with no capture attached; "
                           "set config._attn_implementation back to 'sdpa' or 'eager'")
    out = capture.original_function(module)(module, query, key, value, attention_mask, **kwargs)
    if capture.recording and module.layer_idx in capture.layer_set:
        capture.capture(module, query, key, attention_mask, kwargs)
    return out


for _name in SUPPORTED:  # registered once, at import; which models use them is decided per capture
    AttentionInterface.register(PREFIX + _name, _knowtrace_attention)
    AttentionMaskInterface.register(PREFIX + _name, ALL_MASK_ATTENTION_FUNCTIONS[_name])


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder whose attention is captured (works through peft wrappers, which forward getattr)."""
    getter = getattr(model, "get_decoder", None)
    decoder = getter() if callable(getter) else None
    if decoder is None or not hasattr(decoder, "config"):
        raise ValueError(f"{type(model).__name__} has no get_decoder(): attention capture needs an HF model "
                         f"with a language model (LLaVA, Qwen2-VL, ...)")
    return decoder


def image_token_id(config) -> int:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(config).__name__} has no image_token_id / image_token_index: cannot find image "
                     f"patch positions")


def config_grid(config) -> tuple[int, int] | None:
    """The patch grid when the config fixes it (LLaVA: image_seq_length is a square), else None."""
    n = getattr(config, "image_seq_length", None)
    if n and math.isqrt(n) ** 2 == n:
        return math.isqrt(n), math.isqrt(n)
    return None


def targets(input_ids: torch.Tensor, labels: torch.Tensor, image_id: int, grid_thw: torch.Tensor | None = None,
            merge: int = 1, ignore_index: int = IGNORE_INDEX) -> list[Target | None]:
    """Per batch row, the rows/columns to record (None: no image or no answer in that row).

    input_ids, labels: (batch, seq); grid_thw: (n_images, 3) in the order of the rows that have an
    image (Qwen2-VL), or None for a square grid (LLaVA)."""
    images = iter(grid_thw.tolist()) if grid_thw is not None else None
    out: list[Target | None] = []
    for ids, lab in zip(input_ids, labels):
        cols = (ids == image_id).nonzero().squeeze(1)
        if cols.numel() == 0:
            out.append(None)
            continue
        if images is not None:  # consumed by every row with an image, recorded or not
            t, h, w = next(images)
            if t != 1 or h % merge or w % merge:
                raise ValueError(f"image grid (t={t}, h={h}, w={w}) with merge {merge}: attention capture takes one "
                                 f"still image per sample")
            grid = (h // merge, w // merge)
        else:
            side = math.isqrt(cols.numel())
            grid = (side, side)
        if grid[0] * grid[1] != cols.numel():
            raise ValueError(f"{cols.numel()} image positions in a sample do not make a {grid} patch grid: attention "
                             f"capture takes exactly one image per sample (and LLaVA's default feature strategy)")
        answer = (lab != ignore_index).nonzero().squeeze(1)
        if answer.numel() and int(answer[0]) == 0:
            raise ValueError("an answer token at position 0 has no position that predicts it")
        out.append(Target(answer - 1, cols, grid) if answer.numel() else None)
    return out


class AttentionCapture(Capture):
    """A :class:`~knowtrace.capture.Capture`: while attached, the language model runs the capturing
    attention function (detached, it runs its original one and pays nothing). Between :meth:`begin`
    and :meth:`read` every chosen layer adds, per batch row with a target, a float32 tensor (heads,
    n_answer, gy, gx) (heads = 1 for the mean); :class:`~knowtrace.logprobs.LogProbCapture` calls both
    around each forward.
    """

    def __init__(self, model: torch.nn.Module, options: AttentionOptions):
        super().__init__(model)
        self.options = options
        self.decoder = language_model(model)
        self.config = self.decoder.config
        n_layers = self.config.num_hidden_layers
        for i in options.layers:
            if not -n_layers <= i < n_layers:
                raise ValueError(f"layer {i} does not exist: the language model has {n_layers} layers")
        self.layers = tuple(dict.fromkeys(i % n_layers for i in options.layers))  # resolved, ordered, unique
        self.layer_set = frozenset(self.layers)
        top = getattr(model, "config", None)
        self.image_id = image_token_id(top)
        vision = getattr(top, "vision_config", None)
        self.merge = int(getattr(vision, "spatial_merge_size", 1) or 1)
        self.grid = options.grid or config_grid(top)
        self.n_heads = 1 if options.heads == "mean" else self.config.num_attention_heads  # per recorded map
        self.original = None
        self.recording = False
        self._targets: list[Target | None] = []
        self.maps: list[dict[int, torch.Tensor]] = []  # per batch row: layer -> (heads, n_answer, gy, gx)

    # ----------------------------------------------------------------- attach / restore
    def _install(self) -> None:
        """Route attention through the capturing function (one capture per language model)."""
        original = self.config._attn_implementation
        if original not in SUPPORTED:
            raise ValueError(f"attention capture runs on top of {SUPPORTED} attention; the language model uses "
                             f"{original!r}. Load it with attn_implementation='sdpa' (or 'eager')")
        if id(self.config) in _CAPTURES:
            raise RuntimeError("attention capture is already attached to this language model; detach it first")
        self.original = original
        _CAPTURES[id(self.config)] = self
        self.config._attn_implementation_internal = PREFIX + original

    def _remove(self) -> None:
        if self.original is not None:
            self.config._attn_implementation_internal = self.original
            self.original = None
            _CAPTURES.pop(id(self.config), None)
        self.recording = False
        self.maps, self._targets = [], []

    def original_function(self, module):
        if self.original != "eager":
            return ALL_ATTENTION_FUNCTIONS[self.original]
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)  # the model's own
        if fn is None:
            raise RuntimeError(f"{type(module).__module__} has no eager_attention_forward; use 'sdpa'")
        return fn

    # ----------------------------------------------------------------- one forward
    def begin(self, input_ids: torch.Tensor, labels: torch.Tensor, image_grid_thw: torch.Tensor | None = None):
        # rows and columns found on the host (one transfer), their indices sent back to the device (no wait)
        device = input_ids.device
        ids, lab, grid_thw = host_copies([input_ids, labels, image_grid_thw])
        found = targets(ids, lab, self.image_id, grid_thw, self.merge)
        self._targets = [None if t is None else Target(t.rows.to(device), t.cols.to(device), t.grid) for t in found]
        for t in filter(None, self._targets):
            self.grid = self.grid or t.grid
            if t.grid != self.grid:
                raise ValueError(f"a sample's patch grid {t.grid} differs from the trace's {self.grid}: one trace "
                                 f"takes images of one size")
        self.maps = [{} for _ in self._targets]
        self.recording = True

    def read(self) -> list[dict[int, torch.Tensor]]:
        """The maps of the forward recorded since :meth:`begin`, per batch row, on the CPU (one transfer);
        recording stops."""
        maps, self.maps, self._targets, self.recording = self.maps, [], [], False
        keys = [(row, layer) for row, m in enumerate(maps) for layer in m]
        for (row, layer), m in zip(keys, host_copies([maps[row][layer] for row, layer in keys])):
            maps[row][layer] = m
        return maps

    @torch.no_grad()
    def capture(self, module, query, key, mask, kwargs) -> None:
        # query: (batch, heads, q, dim); key: (batch, kv_heads, kv, dim); mask: (batch|1, 1|heads, q, kv) or None
        if query.shape[0] != len(self._targets):
            return  # not the recorded forward's shape (e.g. a cached generation step)
        q_len, kv_len = query.shape[2], key.shape[2]
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        n_rep = query.shape[1] // key.shape[1]
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        for b, target in enumerate(self._targets):
            if target is None:
                continue
            k = key[b].float().repeat_interleave(n_rep, 0)  # (heads, kv, dim): head h reads key head h // n_rep
            s = query[b][:, target.rows].float() @ k.transpose(-1, -2) * scaling  # (heads, n_answer, kv)
            if mask is None:
                if is_causal and q_len > 1:
                    allowed = torch.arange(kv_len, device=s.device)[None] <= (target.rows + kv_len - q_len)[:, None]
                    s = s.masked_fill(~allowed, float("-inf"))
            else:
                m = mask[b if mask.shape[0] > 1 else 0][:, target.rows]  # (1|heads, n_answer, kv)
                s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
            p = s.softmax(-1)[..., target.cols]  # (heads, n_answer, gy * gx)
            if self.options.heads == "mean":
                p = p.mean(0, keepdim=True)
            self.maps[b][module.layer_idx] = p.reshape(p.shape[0], p.shape[1], *target.grid)  # to the CPU in read()


def stack_layers(maps: dict[int, torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """(layer, heads, n_answer, gy, gx) from one row's maps, in the order of ``layers``."""
    missing = [i for i in layers if i not in maps]
    if missing:
        raise RuntimeError(f"layers {missing} recorded nothing in this forward; is the model's language model the "
                           f"one that was switched?")
    return torch.stack([maps[i] for i in layers])
