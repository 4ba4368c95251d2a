"""ESD (Erasing Concepts from Diffusion Models): train ``eps_theta(z_t, c, t)`` toward the frozen
starting model's negatively guided prediction

    target = eps_ref(z_t, "", t) - eta * (eps_ref(z_t, c, t) - eps_ref(z_t, "", t))

ESD-x trains the cross-attention (``attn2``) only. ESD-u trains the parameters of the authors'
``noxattn`` (rohitgandikota/erasing, the paper's CompVis code, ``train-scripts/train-esd.py``,
``train_esd``'s parameter choice): every UNet parameter except cross-attention (``attn2``), the time
embedding (their ``time_embed``, diffusers' ``time_embedding``) and the output layers (their
``out.``: ``conv_norm_out``, ``conv_out``); norms and biases included. Under LoRA: the Linear /
Conv2d modules of that set (peft adapts those, not norms). The authors' later diffusers rewrite
(``esd_sd.py``, ``get_esd_trainable_parameters``, ``esd-u``) trains every Linear / Conv2d module
outside ``attn2``: the time embedding and ``conv_out`` too, no norms; not followed here (see
docs/sd.md). The parts are ``SDAdapter.part("non_xattn")`` (unlearn/models/sd.py).

Where ``z_t`` comes from (option ``latents``):

* ``"forget"`` (default): a forget image's latents noised at a uniform timestep, like every other
  method here; cheap, and the noisy latents lie where the concept lives.
* ``"sampled"``: ESD's own data-free recipe. The frozen starting model samples from pure noise with
  the forget prompts (DDIM, ``sample_steps`` steps, classifier-free guidance ``sample_guidance``) and
  stops after k steps, k uniform in [0, sample_steps); ``z_t`` is that partial sample and ``t`` the
  DDIM timestep it is at. Costs up to 2 x sample_steps extra UNet calls per step. (ESD's first,
  CompVis, code sampled with the model being trained; its diffusers rewrite, like this, with the
  frozen starting model.)

Under v-prediction (SD 2.x-768) the UNet outputs ``v`` and the target is built from the reference's
``v`` the same way. That is ESD's target in v-space: for a fixed ``z_t`` the map from a noise
prediction to a velocity, ``v = eps / a - (s / a) z_t`` (``a = sqrt(abar_t)``, ``s = sqrt(1 - abar_t)``),
is affine, and the target ``(1 + eta) eps("") - eta eps(c)`` is an affine combination (weights sum to
1), so the same combination of the velocities is the velocity of the eps-space target; the squared
error is the eps-space one times ``1 / abar_t``, the weighting of v-prediction training itself. The
guided predictions of the "sampled" latents combine the same way, and the DDIM scheduler (built from
the pipeline's config) reads the UNet's output per its ``prediction_type``. The same conditioning
object (``SDCond``) carries SDXL's added conditioning into every call.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn import functional as F

from ..models.sd import SDCond
from .base import SDMethod, StepOutput, register

LATENT_SOURCES = ("forget", "sampled")


def esd_target(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, eta: float) -> torch.Tensor:
    return eps_uncond - eta * (eps_cond - eps_uncond)


@torch.no_grad()
def partial_sample(adapter, model, scheduler, cond: SDCond, empty: SDCond, k: int, guidance: float,
                   generator: torch.Generator | None) -> torch.Tensor:
    """The latents after the first ``k`` DDIM steps from pure noise under ``model`` with classifier-free
    guidance: (B, C, h, w), at the noise level of ``scheduler.timesteps[k]`` (k = len(timesteps): a
    finished sample). ``cond``/``empty``: the prompts' and the empty prompt's conditioning (B rows each)."""
    config = adapter.pipe.unet.config
    shape = (len(cond), config.in_channels, config.sample_size, config.sample_size)
    z = torch.randn(shape, generator=generator).to(cond.text.device, cond.text.dtype) * scheduler.init_noise_sigma
    both = SDCond.cat([cond, empty])
    for t in scheduler.timesteps[:k]:
        batch_t = t.expand(2 * len(z)).to(z.device)
        eps_cond, eps_uncond = adapter.predict(torch.cat([z, z]), batch_t, both, model).chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        z = scheduler.step(eps, t, z).prev_sample
    return z


@dataclass
class ESD(SDMethod):
    needs_reference = True
    part: ClassVar[str]
    eta: float = 1.0
    latents: str = "forget"  # where z_t comes from: "forget" or "sampled" (see the module docstring)
    sample_steps: int = 50  # "sampled": DDIM steps of the (partial) sampling run, as in ESD
    sample_guidance: float = 3.0  # "sampled": classifier-free guidance scale of that run, as in ESD

    def __post_init__(self):
        if self.latents not in LATENT_SOURCES:
            raise ValueError(f"{self.name}.latents must be one of {', '.join(LATENT_SOURCES)}; got {self.latents!r}")
        if self.sample_steps < 1:
            raise ValueError(f"{self.name}.sample_steps must be at least 1; got {self.sample_steps}")

    def train_targets(self, adapter, lora):
        return adapter.part(self.part, lora)

    def ddim(self, adapter):
        """The DDIM schedule of the sampling run, built once from the pipeline's scheduler config."""
        if getattr(self, "_ddim", None) is None:
            from diffusers import DDIMScheduler

            # clip_sample off: latents are not bounded to [-1, 1] (SDXL's Euler config does not say so,
            # and DDIM's default would clip)
            self._ddim = DDIMScheduler.from_config(adapter.pipe.scheduler.config, clip_sample=False)
            self._ddim.set_timesteps(self.sample_steps)
        return self._ddim

    def noisy_latents(self, ctx, batch, empty) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_t (B, C, h, w), t (B,))."""
        a = ctx.adapter
        if self.latents == "forget":
            _, t, z_t = a.noise(batch.latents, ctx.generator)
            return z_t, t
        scheduler = self.ddim(a)
        k = int(torch.randint(0, self.sample_steps, (1,), generator=ctx.generator))
        z_t = ctx.reference(lambda model: partial_sample(a, model, scheduler, batch.cond, empty, k,
                                                         self.sample_guidance, ctx.generator), self.name)
        return z_t, scheduler.timesteps[k].expand(len(z_t)).to(z_t.device)

    def loss(self, ctx, forget):
        a = ctx.adapter
        batch = a.encode(forget)
        empty = a.text_embeddings([""] * len(forget))
        z_t, t = self.noisy_latents(ctx, batch, empty)

        def reference(model):  # conditional and unconditional predictions in one call: (2B, C, h, w)
            return a.predict(torch.cat([z_t, z_t]), torch.cat([t, t]), SDCond.cat([batch.cond, empty]), model).chunk(2)

        eps_cond, eps_uncond = ctx.reference(reference, self.name)
        target = esd_target(eps_cond, eps_uncond, self.eta)
        loss = F.mse_loss(a.predict(z_t, t, batch.cond).float(), target.float())
        return StepOutput(loss, {"loss_forget": loss.detach()})


@register
@dataclass
class ESDX(ESD):
    name = "esd_x"
    part = "xattn"


@register
@dataclass
class ESDU(ESD):
    name = "esd_u"
    part = "non_xattn"
