"""Tracing an SD unlearning run (``unlearn sd --trace``): per-step K_C / K_N of the forget images.

What the trace measures, and why a probe. The SD methods do not share one per-pixel error of the
forget images: FTTP and GA compute one (at a random timestep and noise, different every step), ESD
regresses onto a guided target, SalUn trains on other concepts' images, SA on surrogates and replay,
FMN on attention mass. A trace made of each step's own training errors would mix timesteps and
noises (K would jump with the random t, not with the model) and would not exist for half of the
methods. So every method gets the same **probe**: before the first update (step -1) and after every
step, on the main process and under ``torch.no_grad``, the forget images' per-latent-pixel errors
``e_x = mean over channels of (eps - eps_theta(z_t, prompt, t))^2`` at FIXED timesteps and FIXED
noise (one seeded draw, the same at every step), averaged over the timesteps; exactly the
computation of :func:`unlearn.eval.sd.forget_knowledge` with the same defaults (timesteps
100..900, noise seed 0, lambda 1, mean), so step -1 of the trace equals the run's ``original``
K_C / K_N and its last step equals the unlearned model's. K values are then comparable across
steps and across methods. Cost: ``len(timesteps)`` UNet forwards on the forget images per step
(on the world SD a few ms each). The step's own training loss (``loss_forget`` / ``loss_retain``
from the method's logs) is recorded beside it, as it already exists.

The probe draws its noise from its own generator: a traced run trains exactly like an untraced one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from knowtrace.sd_tracer import SDSample, SDTracer

from .eval.sd import DEFAULT_TIMESTEPS


class SDProbe:
    """Per-pixel noise errors of fixed records at fixed timesteps and noise: (N, h, w), mean over
    channels and timesteps. Latents, text embeddings and masks are encoded once."""

    def __init__(self, adapter, records: Sequence, timesteps: Sequence[int] = DEFAULT_TIMESTEPS, noise_seed: int = 0):
        if not records:
            raise ValueError("nothing to probe: give at least one forget record")
        missing = [r.id for r in records if r.mask is None]
        if missing:
            raise ValueError(f"tracing K_C / K_N needs a concept mask on every forget record; records {missing[:5]} "
                             f"have none (give masks: array, PNG or labelme JSON)")
        n_train = adapter.noise_scheduler.config.num_train_timesteps
        self.timesteps = [int(t) for t in timesteps]
        if not self.timesteps or min(self.timesteps) < 0 or max(self.timesteps) >= n_train:
            raise ValueError(f"timesteps must be in [0, {n_train}), got {list(timesteps)}")
        self.adapter, self.records, self.noise_seed = adapter, list(records), int(noise_seed)
        # allow_degenerate: a whole-image concept (art style) is traced as all concept (K_N NaN), not an error
        batch = adapter.encode(self.records, with_mask=True, allow_degenerate=True)
        self.latents, self.cond = batch.latents, batch.cond  # (N, C, h, w), (N, L, D)
        self.mask = batch.mask.cpu().bool()  # (N, h, w)
        # one draw (T, N, C, h, w), as forget_knowledge makes it: the same noisy latents at every step
        self.noise = torch.randn((len(self.timesteps), *self.latents.shape),
                                 generator=torch.Generator().manual_seed(self.noise_seed))

    @torch.no_grad()
    def errors(self, unet) -> torch.Tensor:
        """(N, h, w) float32 on the CPU, with ``unet`` in eval mode (its mode is restored)."""
        z, sched = self.latents, self.adapter.noise_scheduler
        was = unet.training
        unet.eval()
        try:
            err = torch.zeros(z.shape[0], *z.shape[2:])
            for eps, t in zip(self.noise, self.timesteps):
                eps = eps.to(z.device, z.dtype)
                tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
                pred = unet(sched.add_noise(z, eps, tt), tt, encoder_hidden_states=self.cond).sample
                err += (eps - pred).float().pow(2).mean(1).cpu()
        finally:
            unet.train(was)
        return err / len(self.timesteps)

    @property
    def settings(self) -> dict:
        return {"timesteps": self.timesteps, "noise_seed": self.noise_seed,
                "error": "mean over channels, then over timesteps"}


class SDTraceCallback:
    """A loop callback writing ``eps_err``, ``K_C``, ``K_N`` (probe) and the step's losses to a trace.

    Use: ``cb = SDTraceCallback(adapter, forget, path, attrs)`` (records step -1 now, on the starting
    model), pass ``cb`` in the loop's callbacks, then ``cb.close()`` (also after an exception).
    Only the main process should build one (the loop's callbacks run on every process).
    """

    def __init__(self, adapter, records: Sequence, path, attrs: dict | None = None,
                 timesteps: Sequence[int] = DEFAULT_TIMESTEPS, noise_seed: int = 0, lam: float = 1.0,
                 reduce: str = "mean", flush_seconds: float = 5.0):
        self.probe = SDProbe(adapter, records, timesteps, noise_seed)
        self.ids = [r.id for r in self.probe.records]
        samples = [SDSample(r.id, m.numpy(), r.concept or "") for r, m in zip(self.probe.records, self.probe.mask)]
        capture = {"eps_err": "probe of the forget images before training (step -1) and after every step, under "
                              "no_grad: fixed timesteps and noise", **self.probe.settings,
                   "knowledge": {"lambda": lam, "reduce": reduce}, "loss_forget": "the step's own training loss"}
        self.tracer = SDTracer(path, samples, lam=lam, reduce=reduce, attrs={**(attrs or {}), "capture": capture},
                               flush_seconds=flush_seconds)
        self.record(-1, adapter.model)

    def record(self, step: int, unet, logs: dict | None = None) -> None:
        self.tracer.record_errors(step, self.probe.errors(unet), self.ids, logs or {})

    def on_step_end(self, step: int, logs: dict, state) -> None:
        self.record(step, state.model, logs)  # state.model: the unwrapped UNet (no DDP sync for a probe)

    def close(self) -> None:
        self.tracer.flush()
