"""Stable Diffusion adapter: a `diffusers.StableDiffusionPipeline` (SD 1.x layout, or the world SD)
and the way (image, prompt, mask) records become latent-space training inputs.

``model`` is the UNet, the part that is trained; the VAE and the text encoder stay frozen. Per record,
cached (unlearning revisits the same few records every step): the latents (the VAE posterior *mean*
times ``scaling_factor``: deterministic, where SD training samples the posterior), the prompt's text
embedding, the concept mask on the latent grid. A step compares the UNet's prediction with the noise
per latent pixel: ``e_x = mean over channels of (eps - eps_theta(z_t, c, t))^2``, shape (B, h, w).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from knowtrace.modes import eval_mode
from tqdm.auto import tqdm

from ..data.sd_masks import MaskOptions, latent_mask, resize_crop
from ..data.sd_records import SDRecord, load_image
from .source import checked_source

WORLD_MARKER = "world_sd_config.json"  # a directory holding a world SD

# the UNet parts that methods train: peft target-module regexes (LoRA) and parameter-name regexes (full FT)
LORA_PARTS = {
    "attn": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)",  # self- and cross-attention: the LoRA default
    "xattn": r".*attn2\.(to_q|to_k|to_v|to_out\.0)",  # ESD-x, FMN's only_xattn
    # ESD-u: the Linear / Conv2d modules of PARAM_PARTS["non_xattn"] (norms take no LoRA): conv_in,
    # resnets (convolutions, time-embedding projections, shortcuts), down/upsamplers, self-attention,
    # feed-forward and the transformers' projections
    "non_xattn": r"conv_in|.*(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out"
                 r"|resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.\d+\.conv)",
}
PARAM_PARTS = {"attn": r"\.attn[12]\.", "xattn": r"\.attn2\.",
               # ESD's ``noxattn`` (CompVis code): all but cross-attention, the time embedding and the
               # output layers (their ``out.`` = diffusers' conv_norm_out, conv_out)
               "non_xattn": r"^(?!time_embedding\.|conv_norm_out\.|conv_out\.)(?!.*\.attn2\.)"}


def _source_key(source) -> int | str:
    """A cache key of an image or mask: its path, or the identity of the in-memory object (kept alive)."""
    return str(source) if isinstance(source, (str, Path)) else id(source)


@dataclass
class SDBatch:
    latents: torch.Tensor  # (B, C, h, w), scaled
    cond: torch.Tensor  # (B, L, D) text embeddings of the prompts
    mask: torch.Tensor | None  # (B, h, w) float {0, 1}: the concept's latent pixels; None without masks


class SDAdapter:
    family = "stable-diffusion"
    lora_targets = LORA_PARTS["attn"]

    def __init__(self, pipe, name: str = ""):
        from diffusers import DDPMScheduler

        self.pipe, self.name = pipe, name or "stable-diffusion"
        self.model = pipe.unet
        for part in (pipe.vae, pipe.text_encoder):
            part.requires_grad_(False).eval()
        # training noise schedule: the pipeline's betas under DDPM (what SD is trained with)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.factor = int(pipe.vae_scale_factor)  # 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(pipe.unet.config.sample_size) * self.factor
        self._latents: dict = {}
        self._cond: dict[str, torch.Tensor] = {}
        self._masks: dict = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def part(self, name: str, lora: bool) -> str:
        table = LORA_PARTS if lora else PARAM_PARTS
        if name not in table:
            raise KeyError(f"unknown UNet part {name!r}; parts: {', '.join(table)}")
        return table[name]

    # ----------------------------------------------------------------- inputs
    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) text embeddings as the pipeline computes them (cached per prompt)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cond]
        if missing:
            self._cond.update(zip(missing, encode_prompts(self.pipe, missing)))
        return torch.stack([self._cond[p] for p in prompts]).to(self.device)

    def image(self, record: SDRecord) -> np.ndarray:
        """The record's image resized and centre-cropped to the model's resolution, (R, R, 3) uint8."""
        return resize_crop(load_image(record), None, self.resolution)[0]

    @torch.no_grad()
    def latents(self, records: list[SDRecord]) -> torch.Tensor:
        """(B, C, h, w) scaled posterior means (cached per record id and image object)."""
        vae = self.pipe.vae
        for r in records:
            key = (r.id, _source_key(r.image))
            if key not in self._latents:
                x = torch.from_numpy(self.image(r)).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, R, R)
                z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
                self._latents[key] = (z[0], r.image)  # the image object is kept alive: its id stays unique
        return torch.stack([self._latents[(r.id, _source_key(r.image))][0] for r in records]).to(self.device)

    def masks(self, records: list[SDRecord], options: MaskOptions = MaskOptions()) -> torch.Tensor:
        """(B, h, w) latent-grid concept masks, built with ``options`` (cached per record and options)."""
        out = []
        for r in records:
            if r.mask is None:
                raise ValueError(f"record {r.id}: no concept mask; this method needs one (array, PNG or labelme JSON)")
            key = (r.id, _source_key(r.mask), options)
            if key not in self._masks:
                m = latent_mask(r.mask, load_image(r), self.resolution, self.factor, options, where=f"record {r.id}")
                self._masks[key] = (m, r.mask)
            out.append(self._masks[key][0])
        return torch.stack(out).to(self.device)

    def encode(self, records: list[SDRecord], prompts: list[str] | None = None,
               masks: MaskOptions | None = None) -> SDBatch:
        """The records' latents and text embeddings (``prompts``: other prompts than theirs), and their
        concept masks built with ``masks`` (None: no masks)."""
        prompts = [r.prompt for r in records] if prompts is None else prompts
        return SDBatch(self.latents(records), self.text_embeddings(prompts),
                       self.masks(records, masks) if masks is not None else None)

    # ----------------------------------------------------------------- diffusion
    def noise(self, latents: torch.Tensor, generator: torch.Generator | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise, timesteps, noisy latents): eps ~ N(0, I), t uniform over the training schedule."""
        eps = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        t = t.to(latents.device)
        return eps, t, self.noise_scheduler.add_noise(latents, eps, t)

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, model=None) -> torch.Tensor:
        """eps_theta(z_t, c, t), (B, C, h, w); ``model`` defaults to the UNet being trained."""
        return (model or self.model)(z_t, t, encoder_hidden_states=cond).sample

    def pixel_error(self, batch: SDBatch, generator: torch.Generator | None, model=None) -> torch.Tensor:
        """e_x = mean over channels of (eps - eps_theta(z_t, c, t))^2: (B, h, w)."""
        eps, t, z_t = self.noise(batch.latents, generator)
        return (eps - self.predict(z_t, t, batch.cond, model)).float().pow(2).mean(1)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], num_inference_steps: int = 25,
                 guidance_scale: float = 4.0) -> np.ndarray:
        """uint8 images (N, R, R, 3) from the pipeline (with the UNet as trained so far, in eval mode)."""
        with eval_mode(self.model):
            return generate_images(self.pipe, prompts, seeds, guidance_scale, num_inference_steps)


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text embeddings (N, max_length, hidden) exactly as the pipeline computes them (no attention mask)."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], guidance_scale: float = 4.0,
                    num_inference_steps: int = 25, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """uint8 images (N, H, W, 3), image i from ``prompts[i]`` with its own generator seeded ``seeds[i]``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    out = []
    for s in tqdm(range(0, len(prompts), batch_size), desc="SD: sampling", disable=not progress):
        gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds[s:s + batch_size]]
        images = pipe(prompts[s:s + batch_size], num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=gens, output_type="np").images  # (B, H, W, 3) float in [0, 1]
        if not np.isfinite(images).all():  # a broken model: scoring its NaN-made images would be a lie
            raise FloatingPointError(f"the model generates non-finite images (prompt {prompts[s]!r}): its parameters "
                                     f"or its lr are broken; no metric is computed from them")
        out.append(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


PIPELINE_FILE = "model_index.json"  # what marks a directory as a diffusers pipeline


def load_sd_pipeline(model):
    """A `StableDiffusionPipeline` from a local directory or a hub id (the world SD: resolve "world"
    with :func:`unlearn.world.source.resolve_model` first)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled():  # the Hugging Face switch (--quiet), which diffusers' loading bar ignores
        diffusers_logging.disable_progress_bar()

    model = checked_source(model, PIPELINE_FILE)
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_sd_adapter(model) -> SDAdapter:
    return SDAdapter(load_sd_pipeline(model), name=str(model))
