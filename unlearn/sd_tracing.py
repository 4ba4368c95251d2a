"""Tracing an SD unlearning run (``unlearn sd --trace``): per-step K_C / K_N of the forget images.

What the trace measures, and why a probe. The SD methods do not share one per-pixel error of the
forget images: FTTP and GA compute one (at a random timestep and noise, different every step), ESD
regresses onto a guided target, SalUn onto its own prediction under another prompt, SA on surrogates and replay,
FMN on attention mass. A trace made of each step's own training errors would mix timesteps and
noises (K would jump with the random t, not with the model) and would not exist for half of the
methods. So every method gets the same **probe**: before the first update (step -1) and after every
step, on the main process and under ``torch.no_grad``, the forget images' per-latent-pixel errors
``e_x = mean over channels of (y - y_theta(z_t, prompt, t))^2`` (``y`` the model's training target:
the noise ``eps`` under epsilon prediction, the velocity under v-prediction) at FIXED timesteps and FIXED
noise (one seeded draw, the same at every step), averaged over the timesteps; exactly the
computation of :func:`unlearn.eval.sd.forget_knowledge` with the same defaults (timesteps
100..900, noise seed 0, lambda 1, mean), so step -1 of the trace equals the run's ``original``
K_C / K_N and its last step equals the unlearned model's (exactly in fp32; with mixed precision, on a
GPU by default, the probe runs in the training steps' autocast and matches them to bf16 precision). K values are then comparable across
steps and across methods. Cost: ``len(timesteps) x len(images)`` UNet evaluations per probe,
batched as (timestep, image) pairs (:func:`unlearn.eval.sd.fixed_noise_errors`). The step's own
training loss (``loss_forget`` / ``loss_retain`` from the method's logs) is recorded beside it, as
it already exists.

The probe draws its noise from its own generator: a traced run trains exactly like an untraced one.

With ``attention`` (``unlearn sd --trace-attention``) the probe's forwards also record the
cross-attention of every ``attn2`` layer (knowtrace.sd_attention, head mean), averaged over layers
and the probe's timesteps and upsampled to the latent grid: ``xattn(step, sample, layer=1, token,
y, x)`` over the prompt's text tokens (BOS to EOS), with ``is_concept`` marking the concept's name
tokens, so ``knowtrace plot RUN --kind attention`` shows where the concept's tokens look. It keeps
every layer's maps of the probe batch until they are averaged: cheap on the world SD; on SD 1.x at
512 px it needs about ``0.13 GB x images`` of host memory per step.
"""

from __future__ import annotations

import contextlib

from collections.abc import Sequence

import torch

from knowtrace.capture import host_copies
from knowtrace.sd_tracer import SDSample, SDTracer

from .data.sd_masks import MaskOptions
from .data.token_weights import prompt_token_flags
from .eval.sd import DEFAULT_TIMESTEPS, PROBE_BATCH, check_timesteps, fixed_noise_errors

# a whole-image concept (art style) is traced as all concept (K_N NaN), not an error
TRACE_MASKS = MaskOptions(allow_degenerate=True)


def check_traceable(records: Sequence) -> None:
    if not records:
        raise ValueError("nothing to trace: give at least one forget record")
    missing = [r.id for r in records if r.mask is None]
    if missing:
        raise ValueError(f"tracing K_C / K_N needs a concept mask on every forget record; records {missing[:5]} "
                         f"have none (give masks: array, PNG or labelme JSON)")


class SDProbe:
    """Per-pixel noise errors of fixed records at fixed timesteps and noise: (N, h, w), mean over
    channels and timesteps (:func:`unlearn.eval.sd.fixed_noise_errors`, ``batch_size`` (timestep,
    image) pairs per UNet forward). Latents, text embeddings and masks are encoded once. ``precision``: a
    function returning the context the forwards run in (the training steps' autocast:
    :func:`unlearn.loop.precision`)."""

    def __init__(self, adapter, records: Sequence, timesteps: Sequence[int] = DEFAULT_TIMESTEPS, noise_seed: int = 0,
                 attention: bool = False, names: Sequence[str] | None = None, batch_size: int = PROBE_BATCH,
                 precision=contextlib.nullcontext):
        check_traceable(records)
        self.timesteps = check_timesteps(adapter, timesteps)
        self.adapter, self.records, self.noise_seed = adapter, list(records), int(noise_seed)
        self.batch_size, self.precision = int(batch_size), precision
        batch = adapter.encode(self.records, masks=TRACE_MASKS)
        self.latents, self.cond = batch.latents, batch.cond  # (N, C, h, w), SDCond of N rows
        self.mask = batch.mask.cpu().bool()  # (N, h, w)
        # one draw (T, N, C, h, w), as forget_knowledge makes it: the same noisy latents at every step
        self.noise = torch.randn((len(self.timesteps), *self.latents.shape),
                                 generator=torch.Generator().manual_seed(self.noise_seed))
        self.attention = attention
        self.tokens = [prompt_tokens(adapter, r, names) for r in self.records] if attention else None
        self._capture = None  # built on first use and kept: finding the attn2 layers walks the UNet
        self.maps: torch.Tensor | None = None  # (N, 1, tokens, h, w) of the last errors() call, with attention

    def errors(self, unet) -> torch.Tensor:
        """(N, h, w) float32 on the CPU, with ``unet`` in eval mode (each module's mode is restored).
        With attention, the same forwards' maps are left in ``self.maps``."""
        if not self.attention:
            return self._errors(unet)
        if self._capture is None or self._capture.unet is not unet:
            from knowtrace.sd_attention import capture_cross_attention

            self._capture = capture_cross_attention(unet, mean_heads=True, to_cpu=True)
        capture = self._capture
        capture.clear()
        with capture:
            err = self._errors(unet)
        self.maps = self._mean_maps(capture)
        capture.clear()
        return err

    def _errors(self, unet) -> torch.Tensor:
        with self.precision():
            return fixed_noise_errors(self.adapter, unet, self.latents, self.cond, self.noise, self.timesteps,
                                      self.batch_size)

    def _mean_maps(self, capture) -> torch.Tensor:
        """(N, 1, tokens, h, w): each layer's maps on the latent grid, averaged over layers and timesteps."""
        # each layer's calls cover the T x N pairs in order (timestep-major)
        return layer_mean_maps([capture.records[layer] for layer in capture.layers], tuple(self.latents.shape[2:]),
                               max(len(ids) for ids, _, _ in self.tokens), repeats=len(self.timesteps))

    @property
    def settings(self) -> dict:
        return {"timesteps": self.timesteps, "noise_seed": self.noise_seed,
                "error": "mean over channels, then over timesteps"}


def layer_mean_maps(records_by_layer: Sequence[Sequence], size: tuple[int, int], width: int,
                    repeats: int = 1) -> torch.Tensor:
    """(N, 1, tokens, h, w) from each attn2 layer's records (its calls in order, together ``repeats x N``
    rows, repeat-major): every record's head-mean map cut to ``width`` text tokens and upsampled to the
    latent grid ``size``, averaged over the repeats, then over layers. Computed where the records are."""
    from knowtrace.sd_attention import spatial, upsample

    per_layer = []
    for records in records_by_layer:
        maps = [spatial(r.probs, r.hw)[:, :width] for r in records]  # (rows, tokens, h_l, w_l) each
        maps = torch.cat([m if tuple(m.shape[-2:]) == tuple(size) else upsample(m, size) for m in maps])
        per_layer.append(maps.float().view(repeats, -1, *maps.shape[1:]).mean(0))
    return torch.stack(per_layer).mean(0)[:, None]


def prompt_tokens(adapter, record, names: Sequence[str] | None = None) -> tuple[list[int], list[str], list[bool]]:
    """The record's prompt as the text encoder sees it, start to end token (padding dropped): ids,
    token strings, and which are the concept's name tokens (``names``: its name and aliases; default
    the record's concept field)."""
    tok = adapter.pipe.tokenizer
    ids, flags = prompt_token_flags(tok, record.prompt, tuple(names) if names else (record.concept,))
    return ids, tok.convert_ids_to_tokens(ids), flags


class SDTraceCallback:
    """A loop callback writing ``eps_err``, ``K_C``, ``K_N`` (probe) and the step's losses to a trace.

    Use: ``cb = SDTraceCallback(adapter, forget, path, attrs)`` (records step -1 now, on the starting
    model), pass ``cb`` in the loop's callbacks, then ``cb.flush()`` (also after an exception).
    Only the main process should build one (the loop's callbacks run on every process).

    ``every``: probe after every ``every``-th step only (steps every-1, 2*every-1, ...) and after the
    last one (``steps``, if given), to amortise the probe: on the world SD one probe costs about
    1.8 training steps (5 images x 5 timesteps, 16 pairs per forward, against a batch-2 forward and
    backward).
    """

    def __init__(self, adapter, records: Sequence, path, attrs: dict | None = None,
                 timesteps: Sequence[int] = DEFAULT_TIMESTEPS, noise_seed: int = 0, lam: float = 1.0,
                 reduce: str = "mean", flush_seconds: float = 5.0, attention: bool = False, names=None,
                 every: int = 1, steps: int | None = None, batch_size: int = PROBE_BATCH,
                 precision=contextlib.nullcontext):
        if int(every) < 1:
            raise ValueError(f"trace every must be a number of steps >= 1, got {every}")
        self.every, self.steps = int(every), steps
        self.probe = SDProbe(adapter, records, timesteps, noise_seed, attention=attention, names=names,
                             batch_size=batch_size, precision=precision)
        self.ids = [r.id for r in self.probe.records]
        tokens = self.probe.tokens or [(None, None, None)] * len(self.ids)
        samples = [SDSample(r.id, m.numpy(), r.concept or "", *t) for r, m, t in
                   zip(self.probe.records, self.probe.mask, tokens)]
        when = "every step" if self.every == 1 else f"every {self.every} steps and after the last"
        capture = {"eps_err": f"probe of the forget images before training (step -1) and after {when}, under "
                              "no_grad: fixed timesteps and noise", **self.probe.settings,
                   "knowledge": {"lambda": lam, "reduce": reduce}, "loss_forget": "the step's own training loss"}
        if attention:
            capture["xattn"] = ("the probe's attn2 maps, head mean, averaged over every attn2 layer and the probe's "
                                "timesteps, upsampled to the latent grid (layer dim of size 1); tokens: the prompt's")
        self.tracer = SDTracer(path, samples, lam=lam, reduce=reduce, attrs={**(attrs or {}), "capture": capture},
                               flush_seconds=flush_seconds)
        if self.tracer.store.last_step is None:  # (a resumed run's trace has it)
            self.record(-1, adapter.model)

    def record(self, step: int, unet, logs: dict | None = None) -> None:
        err = self.probe.errors(unet)
        self.tracer.record_errors(step, err, self.ids, logs or {}, xattn=self.probe.maps)

    def on_step_end(self, step: int, logs: dict, state) -> None:
        if (step + 1) % self.every == 0 or (self.steps is not None and step == self.steps - 1):
            self.record(step, state.model, logs)  # state.model: the unwrapped UNet (no DDP sync for a probe)

    def flush(self) -> None:
        self.tracer.flush()

    close = flush  # the run is over (the probe's capture is attached only while it probes)


class SDStepErrorCallback:
    """A loop callback writing each step's OWN per-pixel errors of its forget batch, with K_C / K_N
    (``unlearn sd --trace --trace-source step``): no extra forward, so nearly free, but each step's
    errors are at that step's random timestep and noise (K moves with the draw as well as with the
    model; the probe of :class:`SDTraceCallback` is the comparable measure), rows of records not in
    the step's batch are NaN, there is no step -1, and with gradient accumulation the step's last
    micro-batch is recorded. Only for methods with ``has_step_errors`` (FTTP, FwD, GA).

    ``attention`` (``--trace-attention --trace-source step``): also the cross-attention maps of the
    same forward (``xattn``, as the probe records them but at the step's own timestep and noise): a
    capture (knowtrace.sd_attention, head mean, kept on the model's device) is attached from the
    callback's creation until :meth:`close` and cleared after every step, and each layer's last record
    is the step's (those methods make one UNet forward per micro-batch, on the forget records). Its
    cost is the probabilities computed beside each ``attn2`` layer's own attention, no extra forward:
    the cheap way to watch attention at every step (the probe's maps cost ``len(timesteps) x images``
    UNet forwards)."""

    def __init__(self, adapter, method, records: Sequence, path, attrs: dict | None = None, lam: float = 1.0,
                 reduce: str = "mean", flush_seconds: float = 5.0, attention: bool = False, names=None):
        if not method.has_step_errors:
            raise ValueError(f"a step-source trace needs a method whose loss computes the forget images' per-pixel "
                             f"error (fttp, fttp_dilated, ga); {method.name!r} computes none: trace it with the "
                             f"probe (--trace-source probe, the default)")
        check_traceable(records)
        mask = adapter.masks(list(records), TRACE_MASKS).cpu().bool()  # (N, h, w)
        self.size = tuple(mask.shape[1:])
        tokens = [prompt_tokens(adapter, r, names) for r in records] if attention else [(None, None, None)] * len(records)
        self.width = max((len(ids) for ids, _, _ in tokens), default=0) if attention else 0
        samples = [SDSample(r.id, m.numpy(), r.concept or "", *t) for r, m, t in zip(records, mask, tokens)]
        capture = {"eps_err": "each step's own training error of its forget batch (the step's random timestep and "
                              "noise; records outside the step's batch NaN)",
                   "knowledge": {"lambda": lam, "reduce": reduce}, "loss_forget": "the step's own training loss"}
        if attention:
            capture["xattn"] = ("the step's own forward's attn2 maps (its random timestep and noise), head mean, "
                                "averaged over every attn2 layer, upsampled to the latent grid (layer dim of size 1); "
                                "tokens: the prompt's; records outside the step's batch NaN")
        self.tracer = SDTracer(path, samples, lam=lam, reduce=reduce, attrs={**(attrs or {}), "capture": capture},
                               flush_seconds=flush_seconds)
        self.capture = None
        if attention:
            from knowtrace.sd_attention import capture_cross_attention

            self.capture = capture_cross_attention(adapter.model, mean_heads=True)
            self.capture.attach()

    def on_step_end(self, step: int, logs: dict, state) -> None:
        out = state.output  # the step's (last micro-batch's) StepOutput
        if self.capture is None:
            self.tracer.record_errors(step, out.per_element, out.ids, logs)
            return
        maps = self.step_maps(len(out.ids))
        err, maps = host_copies([out.per_element, maps])  # one device-to-host transfer for both
        self.tracer.record_errors(step, err, out.ids, logs, xattn=maps)

    def step_maps(self, rows: int) -> torch.Tensor:
        """(rows, 1, tokens, h, w) from each layer's last record (the step's last forward), records cleared."""
        last = [self.capture.records[layer][-1:] for layer in self.capture.layers]
        if any(not r or r[0].probs.shape[0] != rows for r in last):
            got = sorted({r[0].probs.shape[0] for r in last if r})
            self.capture.clear()
            raise RuntimeError(f"the step's attention maps do not match its {rows} forget records (last forwards' "
                               f"batches: {got or 'none'}): attention from the step needs a method whose last UNet "
                               f"forward of a step is on its forget records (fttp, fttp_dilated, ga)")
        maps = layer_mean_maps(last, self.size, self.width)
        self.capture.clear()
        return maps

    def pause(self, paused: bool) -> None:
        """Stop (or resume) recording attention, e.g. for untraced steps timed beside traced ones."""
        if self.capture is not None and paused == self.capture.attached:
            (self.capture.detach if paused else self.capture.attach)()
            self.capture.clear()

    def flush(self) -> None:
        self.tracer.flush()

    def close(self) -> None:
        """The run is over: the attention capture, if any, detached (the original processors back), and
        buffered steps written."""
        if self.capture is not None and self.capture.attached:
            self.capture.detach()
        self.flush()
