"""Integrated-gradients attribution of an answer token's log-prob to the image patches, with captum.

What is attributed: the *image patch representations as the language model receives them*, i.e. the
input of the language model's first decoder layer at the image-token positions (after the projector /
merger has scattered the image features into the sequence; the same rule for every family whose image
features fill image-token positions: LLaVA, Qwen2-VL, ...). Positions and the ``(y, x)`` patch grid come
from :func:`knowtrace.mllm_attention.targets` (the attention maps' own mapping), so ``attr`` and
``xattn`` of a trace are on the same grid.

How: captum's :class:`~captum.attr.LayerIntegratedGradients` on that decoder layer
(``attribute_to_layer_input=True``). captum takes its path's end points from two forwards of the model,
one at the input and one at a baseline input; here the forward's input is a per-row *gate* (1 at the
input, 0 at the baseline) that a pre-hook on the same layer (registered before captum's, so it runs
first) applies to the image positions only: ``h = b + gate * (h - b)`` with ``b`` the baseline
representation. The end points therefore differ at the image positions alone, every text position
keeps its value along the whole path and gets exactly zero attribution, and the sum of a map is
captum's ``f(input) - f(baseline)`` up to its convergence delta (completeness).

Baseline ``b``: ``"zeros"`` (default: no image information at all) or ``"mean"`` (every patch the
image's mean patch representation: the image's average content, no spatial layout).
Reduction: a patch's score is the *sum* of its attribution over the hidden dimension (captum's
convention for layer attributions; the sum keeps completeness, so the map's total is the log-prob
change the image's representations account for; signed: positive patches raise the log-prob).
Output per batch row: ``(n_answer, gy, gx)`` maps and ``(n_answer,)`` convergence deltas, float32, NaN
for answer tokens not attributed. Answer token ``t`` is scored by the position predicting it (the
log-prob convention: ``logprob[t]``, ``xattn`` row ``t``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from .capture import host_copies
from .mllm_attention import LAYOUTS, ImageLayout, image_side, image_token_id, language_model, targets
from .modes import eval_mode

BASELINES = ("zeros", "mean")
METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")  # captum's


@dataclass(frozen=True)
class AttributionOptions:
    """Attribution maps of the probes (``attr`` in the probe trace). ``every``: attribute at probe steps with
    ``step % every == 0`` (a multiple of the probes' ``every``; None: at every probe step); ``n_steps``:
    points of the integrated-gradients path (captum's ``n_steps``); ``method``: captum's quadrature rule;
    ``tokens``: answer-token indices to attribute (None: every answer token; each costs one path of
    ``n_steps`` forwards and backwards per probe batch); ``baseline``: "zeros" or "mean" (module doc);
    ``internal_batch_size``: rows per forward along the path (captum's; None: the whole path at once)."""

    every: int | None = None
    n_steps: int = 16
    method: str = "gausslegendre"
    tokens: tuple[int, ...] | None = None
    baseline: str = "zeros"
    internal_batch_size: int | None = None

    def __post_init__(self):
        if self.every is not None and self.every < 1:
            raise ValueError(f"attribution every must be >= 1 step (or None: every probe step), got {self.every}")
        if not isinstance(self.n_steps, int) or self.n_steps < 1:
            raise ValueError(f"n_steps must be an integer >= 1 (points of the integrated-gradients path), got "
                             f"{self.n_steps!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of captum's {METHODS}, got {self.method!r}")
        if self.method != "gausslegendre" and self.n_steps < 2:
            raise ValueError(f"captum's Riemann sums need n_steps >= 2, got {self.n_steps}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.internal_batch_size is not None and self.internal_batch_size < 1:
            raise ValueError(f"internal_batch_size must be >= 1 or None, got {self.internal_batch_size}")
        if self.tokens is not None:
            tokens = tuple(int(t) for t in self.tokens)
            if not tokens or min(tokens) < 0 or len(set(tokens)) != len(tokens):
                raise ValueError(f"tokens must be distinct answer-token indices >= 0 (or None: all), got {self.tokens!r}")
            object.__setattr__(self, "tokens", tokens)


class ImageAttribution:
    """Integrated gradients of answer tokens' log-probs with respect to ``model``'s image patch
    representations (module doc). Built on the model (a model without image-token positions fails here);
    :meth:`attribute` runs on one encoded batch."""

    def __init__(self, model: torch.nn.Module, options: AttributionOptions = AttributionOptions()):
        self.model, self.options = model, options
        top = model.config
        self.image_id = image_token_id(top)  # ValueError for a model without an image token
        self.layout = LAYOUTS.get(getattr(top, "model_type", None), ImageLayout())
        if self.layout.cross:
            raise ValueError(f"{type(model).__name__}'s image enters through cross-attention layers, not image-token "
                             f"positions of the sequence: attribution to patch representations needs the latter")
        self.side = image_side(top) if self.layout.part != "all" else 0
        vision = getattr(top, "vision_config", None)
        self.merge = int(getattr(vision, "spatial_merge_size", 1) or 1)
        self.layer = language_model(model).layers[0]  # its input: the sequence the language model's layers receive
        self._gate = None  # (gate (rows,), image mask (rows, seq)) of the forward in progress

    # ----------------------------------------------------------------- where
    def targets(self, batch: dict):
        """Per row, :class:`~knowtrace.mllm_attention.Target` (answer-predicting rows, image columns, grid) or None,
        on the host."""
        if "labels" not in batch or "input_ids" not in batch:
            raise ValueError("attribution needs a batch with input_ids and labels (the answer tokens to score)")
        ids, labels, grid_thw = host_copies([batch["input_ids"], batch["labels"], batch.get("image_grid_thw")])
        return targets(ids, labels, self.image_id, grid_thw, self.merge, layout=self.layout, side=self.side)

    def grid(self, batches: Sequence[dict]) -> tuple[int, int]:
        """The patch grid of the batches' images (one for all rows)."""
        grids = {t.grid for batch in batches for t in self.targets(batch) if t is not None}
        if len(grids) != 1:
            raise ValueError(f"attribution needs rows with an image and an answer, all on one patch grid; found grids "
                             f"{sorted(grids)}")
        return grids.pop()

    def check_tokens(self, n_answer: Sequence[int], names: Sequence[str]) -> None:
        """A chosen token index outside a sample's answer is an error (``n_answer``: answer lengths)."""
        if self.options.tokens is None:
            return
        for n, name in zip(n_answer, names):
            bad = [t for t in self.options.tokens if t >= n]
            if bad:
                raise ValueError(f"attribution tokens {bad} are outside the answer of sample {name!r}, which has {n} "
                                 f"tokens (indices 0..{n - 1})")

    # ----------------------------------------------------------------- the gate
    def _gate_hook(self, module, args):
        if self._gate is None:
            return None
        gate, image = self._gate  # (rows,), (rows, seq) bool
        hidden = args[0]  # (rows, seq, d)
        base = torch.zeros_like(hidden)
        if self.options.baseline == "mean":  # the image's mean patch representation at each of its positions
            weight = image.to(hidden.dtype)[..., None]
            base = (hidden * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp(min=1)
        gated = base + gate.to(hidden.dtype)[:, None, None] * (hidden - base)
        return (torch.where(image[..., None], gated, hidden), *args[1:])

    def _forward(self, keys: Sequence[str]) -> Callable:
        """captum's forward function: (gate, image mask, predicting positions, token ids, *model inputs) ->
        (rows,) log-prob of each row's token; every tensor argument arrives tiled along its first dimension once
        per path point (captum's expansion), which keeps per-row and per-image tensors (Qwen2-VL's
        pixel_values, image_grid_thw) in step."""

        def forward(gate, image, position, token, *tensors):
            self._gate = (gate, image)
            try:
                logits = self.model(**dict(zip(keys, tensors))).logits  # (rows, seq, vocab)
            finally:
                self._gate = None
            rows = torch.arange(logits.shape[0], device=logits.device)
            return logits[rows, position].float().log_softmax(-1)[rows, token]

        return forward

    # ----------------------------------------------------------------- one batch
    def attribute(self, batch: dict, precision: Callable[[], AbstractContextManager] = nullcontext):
        """Per row of ``batch`` (model inputs with ``labels``, on the model's device): ``(maps, delta)`` with maps
        (n_answer, gy, gx) and delta (n_answer,) float32 on the CPU, NaN for tokens not attributed; None for a row
        without an image or an answer. ``precision``: the context of the model's forwards (e.g. autocast)."""
        from captum.attr import LayerIntegratedGradients  # here: captum imports matplotlib (~1 s), tracers without
        # attribution do not pay for it

        found = self.targets(batch)
        present = [t for t in found if t is not None]
        if not present:
            return [None] * len(found)
        grid = present[0].grid
        if any(t.grid != grid for t in present):
            raise ValueError("attribution takes images of one size per batch")
        longest = max(t.rows.numel() for t in present)
        tokens = self.options.tokens if self.options.tokens is not None else tuple(range(longest))
        n_rows = len(found)
        device = batch["input_ids"].device
        seq = batch["input_ids"].shape[1]
        image = torch.zeros(n_rows, seq, dtype=torch.bool)
        cols = torch.zeros(n_rows, grid[0] * grid[1], dtype=torch.long)
        for b, t in enumerate(found):
            if t is not None:
                image[b, t.cols], cols[b] = True, t.cols
        image, cols = image.to(device), cols.to(device)
        keys = [k for k, v in batch.items() if torch.is_tensor(v) and k != "labels"]
        tensors = tuple(batch[k] for k in keys)
        labels = batch["labels"]
        ig = LayerIntegratedGradients(self._forward(keys), self.layer)
        maps, deltas = [], []
        handle = self.layer.register_forward_pre_hook(self._gate_hook)  # before captum's hooks: runs first
        try:
            with eval_mode(self.model), torch.enable_grad(), precision():
                for t in tokens:
                    # a row whose answer is shorter scores its last token (discarded below)
                    pos = torch.tensor([int(x.rows[min(t, x.rows.numel() - 1)]) if x is not None else 0 for x in found])
                    pos = pos.to(device)
                    token = labels[torch.arange(n_rows, device=device), pos + 1]
                    ones = torch.ones(n_rows, device=device)
                    attr, delta = ig.attribute(ones, baselines=torch.zeros_like(ones),
                                               additional_forward_args=(image, pos, token.clamp(min=0), *tensors),
                                               n_steps=self.options.n_steps, method=self.options.method,
                                               internal_batch_size=self._internal_batch(n_rows),
                                               return_convergence_delta=True, attribute_to_layer_input=True)
                    # attr: (rows, seq, d) -> the image positions' sums over d, row-major over the grid
                    maps.append(attr.detach().sum(-1).gather(1, cols).float())
                    deltas.append(delta.detach().float())
        finally:
            handle.remove()
        maps_t, deltas_t = host_copies([torch.stack(maps, 1), torch.stack(deltas, 1)])  # (rows, n_tokens, ...)
        out = []
        for b, t in enumerate(found):
            if t is None:
                out.append(None)
                continue
            n = t.rows.numel()
            m = torch.full((n, *grid), float("nan"))
            d = torch.full((n,), float("nan"))
            for j, k in enumerate(tokens):
                if k < n:
                    m[k], d[k] = maps_t[b, j].reshape(grid), deltas_t[b, j]
            out.append((m, d))
        return out

    def _internal_batch(self, n_rows: int) -> int | None:
        size = self.options.internal_batch_size
        return None if size is None else max(size, n_rows)  # captum needs at least one path point per chunk
