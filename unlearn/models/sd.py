"""Stable Diffusion adapters: SD 1.x / 2.x (`diffusers.StableDiffusionPipeline`, also the world SD)
and SDXL (`StableDiffusionXLPipeline`), and the way (image, prompt, mask) records become latent-space
training inputs.

``model`` is the UNet, the part that is trained; the VAE and the text encoder(s) stay frozen. Per
record, cached (unlearning revisits the same few records every step): the latents (the VAE posterior
*mean* times ``scaling_factor``: deterministic, where SD training samples the posterior), the prompt's
conditioning (:class:`SDCond`), the concept mask on the latent grid. A step compares the UNet's output
with its training target per latent pixel: ``e_x = mean over channels of (y - y_theta(z_t, c, t))^2``,
shape (B, h, w), where the target ``y`` (:meth:`SDAdapter.target`) follows the scheduler's
``prediction_type``: the noise ``eps`` (epsilon: SD 1.x, 2.x-base, SDXL), the velocity
``sqrt(abar_t) eps - sqrt(1 - abar_t) z_0`` (v_prediction: SD 2.x-768) or the clean latents ``z_0``
(sample). Every method and evaluation gets its target from there; none assumes epsilon.

What differs between the kinds lives here and nowhere else: how prompts become conditioning (SD 1.x /
2.x: the text encoder's last hidden states, which for SD 2.x's OpenCLIP-H in diffusers layout is already
the penultimate layer; SDXL: both encoders' penultimate hidden states concatenated, the second's pooled
projection and the added time ids) and how the UNet takes it (:meth:`SDCond.unet_kwargs`).
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
class SDCond:
    """What the UNet is conditioned on, batch first: the prompts' text embeddings and, for SDXL, the
    added conditioning. Methods combine it as they would a tensor (:meth:`cat`, :meth:`repeat`,
    :meth:`expand`, slicing) and never look inside; :meth:`unet_kwargs` is what a UNet call takes."""
    text: torch.Tensor  # (B, L, D) text embeddings
    pooled: torch.Tensor | None = None  # (B, P) SDXL: the second text encoder's pooled projection
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL: original size (h, w), crop top-left (y, x), target size (h, w)

    def _map(self, fn) -> SDCond:
        return SDCond(fn(self.text), *(None if x is None else fn(x) for x in (self.pooled, self.time_ids)))

    def __len__(self) -> int:
        return self.text.shape[0]

    def __getitem__(self, index: slice) -> SDCond:
        return self._map(lambda x: x[index])

    def repeat(self, n: int) -> SDCond:
        """The batch tiled ``n`` times: row k is row k % B."""
        return self._map(lambda x: x.repeat(n, *[1] * (x.ndim - 1)))

    def expand(self, n: int) -> SDCond:
        """A batch of one as ``n`` rows (views, no copy)."""
        return self._map(lambda x: x.expand(n, *x.shape[1:]))

    def to(self, device) -> SDCond:
        return self._map(lambda x: x.to(device))

    @staticmethod
    def cat(conds) -> SDCond:
        """The rows of ``conds`` (of one kind) one after another."""
        conds = list(conds)
        return SDCond(*(None if getattr(conds[0], k) is None else torch.cat([getattr(c, k) for c in conds])
                        for k in ("text", "pooled", "time_ids")))

    def unet_kwargs(self) -> dict:
        """The UNet's conditioning arguments (``added_cond_kwargs`` only where there is added conditioning)."""
        if self.pooled is None:
            return {"encoder_hidden_states": self.text}
        return {"encoder_hidden_states": self.text,
                "added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": self.time_ids}}


@dataclass
class SDBatch:
    latents: torch.Tensor  # (B, C, h, w), scaled
    cond: SDCond  # the prompts' conditioning (B rows)
    mask: torch.Tensor | None  # (B, h, w) float {0, 1}: the concept's latent pixels; None without masks


# the UNet's training target per ``scheduler.config.prediction_type``: f(scheduler, z_0, eps, t) -> (B, C, h, w)
TARGETS = {"epsilon": lambda scheduler, latents, noise, t: noise,
           "v_prediction": lambda scheduler, latents, noise, t: scheduler.get_velocity(latents, noise, t),
           "sample": lambda scheduler, latents, noise, t: latents}


class SDAdapter:
    """SD 1.x / 2.x (and the world SD): one CLIP text encoder, the UNet conditioned on its hidden states."""
    family = "stable-diffusion"
    pipeline_class = "StableDiffusionPipeline"  # model_index.json's _class_name
    components = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # what the adapter uses
    load_options = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    lora_targets = LORA_PARTS["attn"]

    def __init__(self, pipe, name: str = ""):
        from diffusers import DDPMScheduler

        self.pipe, self.name = pipe, name or "stable-diffusion"
        self.model = pipe.unet
        for part in pipe.components.values():  # VAE, text encoder(s): frozen
            if isinstance(part, torch.nn.Module) and part is not pipe.unet:
                part.requires_grad_(False).eval()
        # training noise schedule: the pipeline's betas under DDPM (what SD is trained with)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in TARGETS:
            raise ValueError(f"{self.name}: scheduler prediction_type {self.prediction_type!r} is not supported; "
                             f"supported: {', '.join(TARGETS)}")
        self.factor = int(pipe.vae_scale_factor)  # 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(pipe.unet.config.sample_size) * self.factor
        self._latents: dict = {}
        self._cond: dict[str, SDCond] = {}
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
    def text_embeddings(self, prompts: list[str]) -> SDCond:
        """The prompts' conditioning (B rows) as the pipeline computes it (cached per prompt); the empty
        prompt is the pipeline's unconditional input of classifier-free guidance."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cond))
        if missing:
            cond = self.encode_text(missing)
            self._cond.update((p, cond[i:i + 1]) for i, p in enumerate(missing))
        return SDCond.cat([self._cond[p] for p in prompts]).to(self.device)

    def encode_text(self, prompts: list[str]) -> SDCond:
        """Uncached conditioning of ``prompts``: the text encoder's hidden states."""
        return SDCond(encode_prompts(self.pipe, prompts))

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
        """The records' latents and conditioning (``prompts``: other prompts than theirs), and their
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

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: SDCond, model=None) -> torch.Tensor:
        """The UNet's output y_theta(z_t, c, t), (B, C, h, w), in the space of :meth:`target`; ``model``
        defaults to the UNet being trained."""
        return (model or self.model)(z_t, t, **cond.unet_kwargs()).sample

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What :meth:`predict` is trained to output for ``z_t = add_noise(latents, noise, t)``: (B, C, h, w),
        per the scheduler's prediction_type (noise, velocity or the clean latents)."""
        return TARGETS[self.prediction_type](self.noise_scheduler, latents, noise, t)

    def pixel_error(self, batch: SDBatch, generator: torch.Generator | None, model=None) -> torch.Tensor:
        """e_x = mean over channels of (y - y_theta(z_t, c, t))^2: (B, h, w), y = :meth:`target`."""
        eps, t, z_t = self.noise(batch.latents, generator)
        return (self.target(batch.latents, eps, t) - self.predict(z_t, t, batch.cond, model)).float().pow(2).mean(1)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], num_inference_steps: int = 25,
                 guidance_scale: float = 4.0) -> np.ndarray:
        """uint8 images (N, R, R, 3) from the pipeline (with the UNet as trained so far, in eval mode)."""
        with eval_mode(self.model):
            return generate_images(self.pipe, prompts, seeds, guidance_scale, num_inference_steps)


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text embeddings (N, max_length, hidden) exactly as `StableDiffusionPipeline.encode_prompt` computes
    them: the last hidden states, with the padding's attention mask only where the text encoder's config
    asks for it (``use_attention_mask``; SD 1.x and 2.x do not)."""
    enc = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")
    device = pipe.text_encoder.device
    mask = enc.attention_mask.to(device) if getattr(pipe.text_encoder.config, "use_attention_mask", False) else None
    return pipe.text_encoder(enc.input_ids.to(device), attention_mask=mask)[0]


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


class SDXLAdapter(SDAdapter):
    """SDXL: two CLIP text encoders (their penultimate hidden states concatenated, (B, 77, D1 + D2)),
    the second's pooled projection and the time ids as added conditioning (``addition_embed_type
    "text_time"``), as `StableDiffusionXLPipeline.encode_prompt` computes them. The time ids are those
    the pipeline samples with at the model's resolution R: original size (R, R), crop (0, 0), target
    (R, R); the records' images are resized and centre-cropped to R, so that is what they are."""
    family = "stable-diffusion-xl"
    pipeline_class = "StableDiffusionXLPipeline"
    components = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    load_options = {}

    def __init__(self, pipe, name: str = ""):
        super().__init__(pipe, name or "stable-diffusion-xl")
        r = self.resolution
        self.time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32)  # (1, 6)
        config = pipe.unet.config
        if config.addition_embed_type != "text_time":
            raise ValueError(f"{self.name}: an SDXL UNet takes addition_embed_type 'text_time', this one "
                             f"{config.addition_embed_type!r}; is it an SDXL checkpoint?")
        passed = config.addition_time_embed_dim * self.time_ids.shape[1] + pipe.text_encoder_2.config.projection_dim
        if passed != pipe.unet.add_embedding.linear_1.in_features:
            raise ValueError(f"{self.name}: the UNet's added conditioning takes {pipe.unet.add_embedding.linear_1.in_features}"
                             f" features, but 6 time ids x {config.addition_time_embed_dim} + the pooled text "
                             f"projection {pipe.text_encoder_2.config.projection_dim} make {passed}")

    def encode_text(self, prompts: list[str]) -> SDCond:
        """Both encoders' penultimate hidden states (B, L, D1 + D2), the pooled projection (B, P), the time
        ids (B, 6); the empty prompt is zeros where the pipeline's ``force_zeros_for_empty_prompt`` says so
        (its unconditional input of classifier-free guidance)."""
        text, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.pipe.text_encoder.device,
                                                     do_classifier_free_guidance=False)
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            empty = torch.tensor([p == "" for p in prompts], device=text.device)
            text = text.masked_fill(empty[:, None, None], 0)
            pooled = pooled.masked_fill(empty[:, None], 0)
        return SDCond(text, pooled, self.time_ids.to(text.device, text.dtype).expand(len(prompts), -1))


PIPELINE_FILE = "model_index.json"  # what marks a directory as a diffusers pipeline
ADAPTERS = {a.pipeline_class: a for a in (SDAdapter, SDXLAdapter)}  # model_index.json's _class_name -> adapter
KINDS = "StableDiffusionPipeline (SD 1.x, SD 2.x), StableDiffusionXLPipeline (SDXL)"


def adapter_class(model) -> type[SDAdapter]:
    """The adapter for a pipeline directory or hub id, from its model_index.json: a pipeline of another
    kind (SD3, Flux, an img2img pipeline, ...) or one that lacks a part the adapter uses is an error
    naming what is missing."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(model)
    name = config.get("_class_name")
    parts = sorted(k for k, v in config.items() if not k.startswith("_") and isinstance(v, (list, tuple))
                   and v[0] is not None)
    adapter = ADAPTERS.get(name)
    if adapter is not None:
        missing = [c for c in adapter.components if c not in parts]
        if not missing:
            return adapter
        raise ValueError(f"{model}: a {name} needs {', '.join(adapter.components)}; model_index.json has no "
                         f"{', '.join(missing)} (its parts: {', '.join(parts)})")
    needed = ", ".join(c for c in SDXLAdapter.components if c not in parts) or "nothing of the parts"
    raise ValueError(f"{model}: model_index.json names a {name or 'pipeline without _class_name'}, which is not a "
                     f"supported Stable Diffusion pipeline (supported: {KINDS}: a UNet2DConditionModel 'unet' "
                     f"conditioned on CLIP text encoders). Its parts: {', '.join(parts) or 'none'}; missing for "
                     f"SDXL: {needed}")


def make_adapter(pipe, name: str = "") -> SDAdapter:
    """The adapter of a loaded pipeline (by its class)."""
    adapter = ADAPTERS.get(type(pipe).__name__)
    if adapter is None:
        raise ValueError(f"{type(pipe).__name__} is not a supported Stable Diffusion pipeline (supported: {KINDS})")
    return adapter(pipe, name)


def load_sd_pipeline(model):
    """A supported SD pipeline (:data:`ADAPTERS`) from a local directory or a hub id, of the class its
    model_index.json names (the world SD: resolve "world" with :func:`unlearn.world.source.resolve_model` first)."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled():  # the Hugging Face switch (--quiet), which diffusers' loading bar ignores
        diffusers_logging.disable_progress_bar()

    model = checked_source(model, PIPELINE_FILE)
    adapter = adapter_class(model)
    pipe = getattr(diffusers, adapter.pipeline_class).from_pretrained(model, **adapter.load_options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_sd_adapter(model) -> SDAdapter:
    return make_adapter(load_sd_pipeline(model), name=str(model))
