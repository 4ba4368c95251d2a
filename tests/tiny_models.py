"""Tiny random-weight instances of the real model classes, built from configs (no hub), for tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                          Qwen2VLImageProcessorPil)

from unlearn.models import Qwen2VLInputs
from unlearn.world.texts import world_corpus
from unlearn.world.tokenizer import build_processor

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's conversation format, reduced to what the records use
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llava(image_size: int = 32, patch_size: int = 8, seed: int = 0):
    """(LlavaForConditionalGeneration, LlavaProcessor) with the world tokenizer."""
    processor = build_processor(image_size, patch_size)
    tok = processor.tokenizer
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=image_size, patch_size=patch_size, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(cfg).eval(), processor


def qwen_tokenizer():
    """A byte-level BPE tokenizer (as Qwen's) trained offline on the world's texts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(world_corpus() + ["user\nassistant\n"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_SPECIALS[1:], chat_template=QWEN_CHAT_TEMPLATE)


def tiny_qwen2vl(seed: int = 0):
    """(Qwen2VLForConditionalGeneration, Qwen2VLInputs): patch 14, merge 2, like the real model."""
    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=ids["<|endoftext|>"],
                         bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                               size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56})
    return Qwen2VLForConditionalGeneration(cfg).eval(), Qwen2VLInputs(tok, image_processor)


def tiny_clip(words=("a", "photo", "of", "vorn", "blip", "korvex")):
    """A random-weight CLIPModel (32-wide, one layer, 32 px images) and a CLIP tokenizer built offline
    from ``words``: (model in eval mode, tokenizer)."""
    from transformers import CLIPConfig, CLIPModel

    from unlearn.world.sd import build_tokenizer

    tok = build_tokenizer(words=list(words), max_length=16)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    return CLIPModel(cfg).eval(), tok


# ----------------------------------------------------------------------------- Stable Diffusion kinds
# Tiny random-weight pipelines of each SD kind the toolkit loads (tests/test_sd_kinds.py): 32 px
# images, a VAE with factor 2 (16x16 latents), a two-level UNet with cross-attention on the second
# level, 32-wide CLIP text encoders over the world's prompt words.

SD_KINDS = ("sd1", "sd2", "sdxl")


def _tiny_text_encoder(tok, projection: bool = False, hidden: int = 32, projection_dim: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         projection_dim=projection_dim)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def tiny_sd_pipeline(kind: str, seed: int = 0):
    """A tiny random-weight pipeline of ``kind``: "sd1" (StableDiffusionPipeline, SD 1.x layout, epsilon),
    "sd2" (SD 2.x layout: linear transformer projections, per-level heads, upcast attention and
    v-prediction as SD 2.1-768)
    or "sdxl" (StableDiffusionXLPipeline: two text encoders, text_time added conditioning, 1-2
    transformer layers per block, Euler scheduler)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    from unlearn.world.sd import build_tokenizer

    if kind not in SD_KINDS:
        raise ValueError(f"kind must be one of {SD_KINDS}, got {kind!r}")
    tok = build_tokenizer(max_length=16)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=32, mid_block_add_attention=False)
    unet_args = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    betas = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if kind == "sdxl":
        text_encoder = _tiny_text_encoder(tok)
        text_encoder_2 = _tiny_text_encoder(tok, projection=True)
        unet = UNet2DConditionModel(**unet_args, cross_attention_dim=64, attention_head_dim=(2, 4),
                                    transformer_layers_per_block=(1, 2), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=8 * 6 + 16)
        scheduler = EulerDiscreteScheduler(**betas, prediction_type="epsilon", timestep_spacing="leading",
                                           steps_offset=1)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        sd2 = kind == "sd2"
        unet = UNet2DConditionModel(**unet_args, cross_attention_dim=32, attention_head_dim=(2, 4) if sd2 else 2,
                                    use_linear_projection=sd2, upcast_attention=sd2)  # SD 2.1-768 upcasts
        scheduler = DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type="v_prediction" if sd2 else "epsilon")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=_tiny_text_encoder(tok), tokenizer=tok, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
