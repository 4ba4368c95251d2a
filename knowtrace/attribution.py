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
for answer tokens not attributed (deltas: NaN everywhere with ``delta=False``). Answer token ``t`` is scored
by the position predicting it (the log-prob convention: ``logprob[t]``, ``xattn`` row ``t``).

Cost per batch: every attributed token in one captum call (the batch tiled once per token); captum's two
end-point forwards, whose outputs also give the convergence delta (no further forwards); the path's
``n_steps`` forwards and backwards; the image encoder once (:mod:`knowtrace.image_features`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from .capture import host_copies
from .image_features import ImageFeatureReuse
from .mllm_attention import image_layout, image_side, image_token_id, language_model, targets
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
    ``internal_batch_size``: rows per forward along the path (captum's; None: the whole path at once);
    ``reuse_image_features``: run the image encoder once per batch and give its output to the path's forwards
    (:mod:`knowtrace.image_features`; the same maps, without the vision tower's cost on every path point);
    ``delta``: compute captum's convergence delta, which takes the two end-point forwards to the model's output
    (False: they stop at the attributed layer, whose input is all captum needs of them; ``attr_delta`` is NaN)."""

    every: int | None = None
    n_steps: int = 16
    method: str = "gausslegendre"
    tokens: tuple[int, ...] | None = None
    baseline: str = "zeros"
    internal_batch_size: int | None = None
    reuse_image_features: bool = True
    delta: bool = True

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


class _Stopped(Exception):
    """Ends an end-point forward at the attributed layer (``AttributionOptions.delta`` False)."""


def _stop_forward(module, args):
    raise _Stopped


class ImageAttribution:
    """Integrated gradients of answer tokens' log-probs with respect to ``model``'s image patch
    representations (module doc). Built on the model (a model without image-token positions fails here);
    :meth:`attribute` runs on one encoded batch."""

    def __init__(self, model: torch.nn.Module, options: AttributionOptions = AttributionOptions()):
        self.model, self.options = model, options
        top = model.config
        self.image_id = image_token_id(top)  # ValueError for a model without an image token
        self.layout = image_layout(model)  # ValueError for image positions with no patch grid (Idefics2's latents)
        if self.layout.cross:
            raise ValueError(f"{type(model).__name__}'s image enters through cross-attention layers, not image-token "
                             f"positions of the sequence: attribution to patch representations needs the latter")
        self.side = image_side(top) if self.layout.part != "all" else 0
        vision = getattr(top, "vision_config", None)
        self.merge = int(getattr(vision, "spatial_merge_size", 1) or 1)
        self.layer = language_model(model).layers[0]  # its input: the sequence the language model's layers receive
        self._gate = None  # (gate (rows,), image mask (rows, seq)) of the forward in progress
        # transformers' logits_to_keep: the head on the scored positions only (memory: rows x positions x vocab)
        self._keeps_logits = "logits_to_keep" in inspect.signature(type(model).forward).parameters
        self._ends: list[torch.Tensor] = []  # (rows,) outputs of captum's end-point forwards (input, baseline)

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

    def _forward(self, keys: Sequence[str], reuse: ImageFeatureReuse, rows: int, keep: torch.Tensor | None) -> Callable:
        """captum's forward function: (gate, image mask, predicting positions, token ids, *model inputs) ->
        (rows,) log-prob of each row's token; every tensor argument arrives tiled along its first dimension once
        per path point (captum's expansion), which keeps per-row and per-image tensors (Qwen2-VL's
        pixel_values, image_grid_thw) in step. The end-point forwards captum runs for the layer's values (at the
        input, then at the baseline; without autograd, unlike the path's) keep their outputs in ``self._ends``:
        the convergence delta is computed from them instead of from two more forwards. ``reuse``: the image
        encoder's output, recorded in the first forward and given to the later ones in place of the pixels
        (``rows``: the batch's rows, of which each call holds whole copies). ``keep``: the sorted positions whose
        logits are scored, passed as ``logits_to_keep`` (the language-model head runs on those alone; None: the
        model takes no such argument)."""

        def forward(gate, image, position, token, *tensors):
            inputs = dict(zip(keys, tensors))
            if keep is not None:
                inputs["logits_to_keep"] = keep
            if reuse.ready:
                if gate.shape[0] % rows:
                    raise RuntimeError(f"captum split the path into {gate.shape[0]} rows, not whole copies of the "
                                       f"batch's {rows}: set internal_batch_size to a multiple of it")
                inputs = reuse.inputs(inputs, gate.shape[0] // rows)
            end_point = not torch.is_grad_enabled()  # captum's layer evaluations run without autograd, the path with
            # without the delta, an end point's forward only has to reach the layer (captum's pre-hook, registered
            # before this call, has recorded its input when ours stops the forward)
            stop = self.layer.register_forward_pre_hook(_stop_forward) if end_point and not self.options.delta else None
            self._gate = (gate, image)
            try:
                with reuse.recording():
                    logits = self.model(**inputs).logits  # (rows, seq, vocab)
            except _Stopped:
                return torch.full((gate.shape[0],), float("nan"), device=gate.device)
            finally:
                self._gate = None
                if stop is not None:
                    stop.remove()
            index = torch.arange(logits.shape[0], device=logits.device)
            column = position if keep is None else torch.searchsorted(keep, position)  # logits: (rows, len(keep), vocab)
            out = logits[index, column].float().log_softmax(-1)[index, token]
            if end_point:
                self._ends.append(out.detach())
            return out

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
        n_rows, n_tokens = len(found), len(tokens)
        device = batch["input_ids"].device
        seq = batch["input_ids"].shape[1]
        image = torch.zeros(n_rows, seq, dtype=torch.bool)
        cols = torch.zeros(n_rows, grid[0] * grid[1], dtype=torch.long)
        # per (token, row): the position predicting the token; a row whose answer is shorter scores its last
        # token (discarded below)
        pos = torch.zeros(n_tokens, n_rows, dtype=torch.long)
        for b, t in enumerate(found):
            if t is not None:
                image[b, t.cols], cols[b] = True, t.cols
                pos[:, b] = t.rows[torch.tensor(tokens).clamp(max=t.rows.numel() - 1)]
        # Every token in one call: the batch tiled once per token (row j * n_rows + b is row b for token j), so
        # the end points and the path are one forward (and backward) each instead of one per token.
        keep = torch.unique(pos).to(device) if self._keeps_logits else None  # sorted; on the host: no device sync
        image, cols, pos = image.to(device).repeat(n_tokens, 1), cols.to(device), pos.to(device).reshape(-1)
        keys = [k for k, v in batch.items() if torch.is_tensor(v) and k != "labels"]
        tensors = tuple(batch[k].repeat(n_tokens, *([1] * (batch[k].dim() - 1))) for k in keys)
        labels = batch["labels"].repeat(n_tokens, 1)
        rows = n_rows * n_tokens
        token = labels[torch.arange(rows, device=device), pos + 1].clamp(min=0)
        ones = torch.ones(rows, device=device)
        reuse = ImageFeatureReuse(self.model, batch if self.options.reuse_image_features else {})
        ig = LayerIntegratedGradients(self._forward(keys, reuse, rows, keep), self.layer)
        handle = self.layer.register_forward_pre_hook(self._gate_hook)  # before captum's hooks: runs first
        self._ends = []
        try:
            with eval_mode(self.model), torch.enable_grad(), precision():
                attr = ig.attribute(ones, baselines=torch.zeros_like(ones),
                                    additional_forward_args=(image, pos, token, *tensors),
                                    n_steps=self.options.n_steps, method=self.options.method,
                                    internal_batch_size=self._internal_batch(rows), attribute_to_layer_input=True)
            if self.options.delta and len(self._ends) != 2:
                raise RuntimeError(f"captum ran {len(self._ends)} forwards without autograd, expected 2 (its layer "
                                   f"values at the input and at the baseline); this captum version is not supported")
            at_input, at_baseline = self._ends if self.options.delta else (float("nan"), float("nan"))
        finally:
            handle.remove()
            self._ends = []
        attr = attr.detach()  # (rows, seq, d); zero at every text position (the gate leaves them fixed)
        # captum's convergence delta (completeness): the map's total minus f(input) - f(baseline)
        deltas = attr.float().sum((1, 2)) - (at_input - at_baseline)
        maps = attr.sum(-1).gather(1, cols.repeat(n_tokens, 1)).float()  # the image positions, row-major on the grid
        maps_t, deltas_t = host_copies([maps.reshape(n_tokens, n_rows, -1).transpose(0, 1),
                                        deltas.reshape(n_tokens, n_rows).T])  # (rows, n_tokens, ...)
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
