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
attention that produced ``logprob[t]``); columns are one image's patches, reshaped row-major to the
patch grid ``(y, x)``. Where they are (:class:`ImageLayout`, by ``model_type``; derived from the config
and the forward's inputs, declared per family only where the position order is the family's own):

- a family whose image features fill image-token positions of the sequence (LLaVA, LLaVA-NeXT,
  LLaVA-OneVision, Idefics3 / SmolVLM, InternVL, Aya Vision, Gemma 3, PaliGemma, Qwen2-VL / Qwen3-VL):
  the positions of the config's ``image_token_id`` in ``input_ids``; the grid is ``(h / merge, w /
  merge)`` from ``image_grid_thw`` (Qwen2-VL), else the square of their count; LLaVA-NeXT and
  LLaVA-OneVision record the base image (the first ``side**2`` positions; the high-resolution tiles and
  row newlines follow), Idefics3 / SmolVLM, InternVL and Aya Vision the global image (the last
  ``side**2``, after the tiles of a split image); Idefics2's image positions are a perceiver
  resampler's latents, no grid: its capture is an error saying so;
- a family whose images enter through cross-attention layers (Mllama: the language model config's
  ``cross_attention_layers``): only those layers attend to the image, so ``layers`` index them and
  the recorded ones are cross-attention layers; columns are key positions of the vision states, each
  tile ``1 + side**2`` of them (a class token first), tiles arranged by the sample's aspect ratio.

One image per sample. The capture works wherever the language model's attention modules call
transformers' attention interface (``ALL_ATTENTION_FUNCTIONS``); a model whose chosen layers record
nothing in a forward is an error saying so. Several models can be captured at once: the function finds
its capture by the identity of the module's config.
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
    """What to record. ``layers``: indices into the decoder layers that attend to the image (negative
    counts from the end): every decoder layer, or a cross-attention model's cross-attention layers
    (Mllama: -1 is the last of them); the trace's ``layer`` coordinate holds decoder layer indices;
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


@dataclass(frozen=True)
class ImageLayout:
    """Where a sample's recorded image patches are. ``part``: which of its image-token positions form
    the grid: "all", "first" / "last" ``side**2`` of them (the base image before high-resolution tiles;
    the global image after a split image's tiles); ``cross``: the image enters through cross-attention
    (columns are vision-state key positions, ``1 + side**2`` per tile, class token first)."""

    part: str = "all"
    cross: bool = False
    no_grid: str = ""  # what the image positions are where they are no patch grid (the capture refuses them)


# the families whose image positions are not simply one image's grid (all others: ImageLayout())
LAYOUTS = {"llava_next": ImageLayout("first"), "llava_onevision": ImageLayout("first"),
           "idefics3": ImageLayout("last"), "smolvlm": ImageLayout("last"),
           "internvl": ImageLayout("last"), "aya_vision": ImageLayout("last"),  # the thumbnail follows the tiles
           "mllama": ImageLayout(cross=True),
           "idefics2": ImageLayout(no_grid="the perceiver resampler's latents")}


def image_layout(model: torch.nn.Module) -> ImageLayout:
    """``model``'s :class:`ImageLayout`; an error for a family whose image positions have no patch grid (a
    map over them would be drawn as the image's (y, x) and be wrong)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = LAYOUTS.get(model_type, ImageLayout())
    if layout.no_grid:
        raise ValueError(f"model type {model_type!r}: its image positions are {layout.no_grid}, not the image's "
                         f"patches, so attention over them has no (y, x) grid to record; trace without attention "
                         f"(no --trace-attention)")
    return layout


def image_side(config) -> int:
    """Patches per side of one image (tile) in the language model's input: ``image_seq_length`` when the
    config has it (LLaVA-NeXT, InternVL), else the vision tower's ``image_size / patch_size`` over the
    connector's ``scale_factor`` (Idefics3's pixel shuffle) or ``downsample_factor`` (Aya Vision's; 1 elsewhere)."""
    n = getattr(config, "image_seq_length", None)
    if n:
        return math.isqrt(n)
    vision = config.vision_config
    shuffle = getattr(config, "scale_factor", None) or getattr(config, "downsample_factor", None) or 1
    return vision.image_size // vision.patch_size // int(shuffle)


def _answer_rows(lab: torch.Tensor, ignore_index: int) -> torch.Tensor:
    answer = (lab != ignore_index).nonzero().squeeze(1)
    if answer.numel() and int(answer[0]) == 0:
        raise ValueError("an answer token at position 0 has no position that predicts it")
    return answer - 1


def _token_columns(ids, image_id, layout, side, images) -> tuple[torch.Tensor, tuple[int, int]]:
    """A sample's image-token positions and their grid (a family of image-token positions)."""
    cols = (ids == image_id).nonzero().squeeze(1)
    if images is not None:  # Qwen2-VL: the grid of this sample's image
        t, h, w, merge = next(images)
        if t != 1 or h % merge or w % merge:
            raise ValueError(f"image grid (t={t}, h={h}, w={w}) with merge {merge}: attention capture takes one "
                             f"still image per sample")
        grid = (h // merge, w // merge)
    elif layout.part == "all":
        grid = (math.isqrt(cols.numel()),) * 2
    else:
        cols = cols[: side * side] if layout.part == "first" else cols[cols.numel() - side * side:]
        grid = (side, side)
    if grid[0] * grid[1] != cols.numel():
        raise ValueError(f"{cols.numel()} image positions in a sample do not make a {grid} patch grid: attention "
                         f"capture takes exactly one image per sample (and LLaVA's default feature strategy)")
    return cols, grid


def _tile_columns(tiles: tuple[int, int], side: int) -> torch.Tensor:
    """Vision-state key positions of a (tiles_y, tiles_x) image, row-major over its (ty * side, tx * side)
    patch grid; tile t (row-major) holds keys t * (1 + side**2) + 1 + (patch index)."""
    ty, tx = tiles
    y, x = torch.meshgrid(torch.arange(ty * side), torch.arange(tx * side), indexing="ij")
    tile = (y // side) * tx + x // side
    return (tile * (1 + side * side) + 1 + (y % side) * side + x % side).flatten()


def targets(input_ids: torch.Tensor, labels: torch.Tensor, image_id: int, grid_thw: torch.Tensor | None = None,
            merge: int = 1, ignore_index: int = IGNORE_INDEX, layout: ImageLayout = ImageLayout(), side: int = 0,
            tiles: list[tuple[int, int]] | None = None) -> list[Target | None]:
    """Per batch row, the rows/columns to record (None: no image or no answer in that row).

    input_ids, labels: (batch, seq); grid_thw: (n_images, 3) in the order of the rows that have an
    image (Qwen2-VL), or None; ``side``: patches per image side where the layout needs it; ``tiles``:
    per batch row its image's (tiles_y, tiles_x) (cross-attention layouts)."""
    images = iter([(*g, merge) for g in grid_thw.tolist()]) if grid_thw is not None else None
    out: list[Target | None] = []
    for b, (ids, lab) in enumerate(zip(input_ids, labels)):
        if not (ids == image_id).any():
            out.append(None)
            continue
        if layout.cross:
            cols, grid = _tile_columns(tiles[b], side), (tiles[b][0] * side, tiles[b][1] * side)
        else:  # consumes this row's grid_thw entry, recorded or not
            cols, grid = _token_columns(ids, image_id, layout, side, images)
        rows = _answer_rows(lab, ignore_index)
        out.append(Target(rows, cols, grid) if rows.numel() else None)
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
        top = getattr(model, "config", None)
        self.layout = image_layout(model)
        # the decoder layers whose attention reads the image: all, or a cross-attention family's own
        image_layers = (sorted(self.config.cross_attention_layers) if self.layout.cross
                        else list(range(self.config.num_hidden_layers)))
        n = len(image_layers)
        for i in options.layers:
            if not -n <= i < n:
                which = f"cross-attention layers {image_layers}" if self.layout.cross else "layers"
                raise ValueError(f"layer {i} does not exist: the language model has {n} {which} that attend to "
                                 f"the image")
        self.layers = tuple(dict.fromkeys(image_layers[i] for i in options.layers))  # decoder indices, ordered, unique
        self.layer_set = frozenset(self.layers)
        self.image_id = image_token_id(top)
        vision = getattr(top, "vision_config", None)
        self.merge = int(getattr(vision, "spatial_merge_size", 1) or 1)
        self.side = image_side(top) if self.layout.part != "all" or self.layout.cross else 0
        self.aspect_ratios = getattr(vision, "supported_aspect_ratios", None)  # aspect_ratio_ids - 1 -> (ty, tx)
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
    def begin(self, input_ids: torch.Tensor, labels: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
              aspect_ratio_ids: torch.Tensor | None = None):
        """Start recording a forward; ``image_grid_thw`` (Qwen2-VL), ``aspect_ratio_ids`` (batch, images)
        (Mllama): the forward's own inputs that say an image's grid."""
        if self.layout.cross and aspect_ratio_ids is None:
            raise ValueError("attention capture of a cross-attention model needs the forward's aspect_ratio_ids")
        # rows and columns found on the host (one transfer), their indices sent back to the device (no wait)
        device = input_ids.device
        ids, lab, grid_thw, ratios = host_copies([input_ids, labels, image_grid_thw, aspect_ratio_ids])
        tiles = None if ratios is None or not self.layout.cross else \
            [tuple(self.aspect_ratios[i - 1]) if i > 0 else None for i in ratios[:, 0].tolist()]
        found = targets(ids, lab, self.image_id, grid_thw, self.merge, layout=self.layout, side=self.side, tiles=tiles)
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
        recording stops. A row with a target that a chosen layer left without a map is an error: that layer's
        attention did not go through the capturing function."""
        maps, targets = self.maps, self._targets
        self.maps, self._targets, self.recording = [], [], False
        for target, row in zip(targets, maps):
            if target is not None:
                stack_layers(row, self.layers)  # raises, naming the layers
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
                if is_causal and q_len > 1 and not self.layout.cross:
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
        raise RuntimeError(f"decoder layers {missing} recorded nothing in this forward: their attention modules do not "
                           f"call transformers' attention interface (ALL_ATTENTION_FUNCTIONS) with the language "
                           f"model's config, so this model's attention cannot be captured; trace without attention")
    return torch.stack([maps[i] for i in layers])
