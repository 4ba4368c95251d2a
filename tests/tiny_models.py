"""Tiny random-weight instances of the real model classes, built from configs (no hub), for tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor, CLIPVisionConfig,
                          Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor,
                          GotOcr2ImageProcessorPil, Idefics2Config, Idefics2ForConditionalGeneration,
                          Idefics2ImageProcessorPil, Idefics2Processor, Idefics3Config,
                          Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor,
                          InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaOnevisionConfig,
                          LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil,
                          LlavaOnevisionProcessor, MllamaConfig, MllamaForConditionalGeneration,
                          MllamaImageProcessorPil, MllamaProcessor, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                          PaliGemmaProcessor, PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                          Qwen2VLImageProcessorPil, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration, Qwen3VLProcessor, SiglipImageProcessorPil)

from unlearn.models import Qwen2VLInputs, image_only_processor
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


def bpe_tokenizer(specials: list[str], chat_template: str, extra_texts: tuple[str, ...] = (), **named):
    """A byte-level BPE tokenizer (as Qwen's, Llama-3's, Gemma's) trained offline on the world's texts;
    ``specials`` are special tokens, ``named``: eos_token=..., pad_token=..., extra_special_tokens=... ."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(world_corpus() + list(extra_texts) * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=specials[1:],
                                   chat_template=chat_template, **named)


def qwen_tokenizer():
    """Qwen's byte-level BPE tokenizer with its special tokens and conversation format."""
    return bpe_tokenizer(QWEN_SPECIALS, QWEN_CHAT_TEMPLATE, ("user\nassistant\n",), eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")


def _qwen(config_class, vision_config: dict, kv_heads: int):
    """(config, Qwen2VLInputs) of a tiny Qwen2-VL-like model: the byte-level tokenizer, a 2-layer 32-wide
    language model with M-RoPE, and the PIL image processor at 56 px (patch 14, merge 2: 4 positions)."""
    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    cfg = config_class(
        vision_config=vision_config,
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=kv_heads, pad_token_id=ids["<|endoftext|>"],
                         bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                               size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56})
    return cfg, Qwen2VLInputs(tok, image_processor)


def tiny_qwen2vl(seed: int = 0):
    """(Qwen2VLForConditionalGeneration, Qwen2VLInputs): patch 14, merge 2, like the real model."""
    cfg, inputs = _qwen(Qwen2VLConfig, dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14,
                                            spatial_merge_size=2, temporal_patch_size=2), kv_heads=2)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(cfg).eval(), inputs


def tiny_qwen2_5_vl(seed: int = 0):
    """(Qwen2_5_VLForConditionalGeneration, Qwen2VLInputs): Qwen2-VL's tokenizer and image processor, the
    2.5 vision tower (window attention, one full-attention block), grouped-query attention."""
    cfg, inputs = _qwen(Qwen2_5_VLConfig, dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                               out_hidden_size=32, patch_size=14, spatial_merge_size=2,
                                               temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0]),
                        kv_heads=1)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval(), inputs


def tiny_qwen3_vl(seed: int = 0):
    """(Qwen3VLForConditionalGeneration, Qwen3VLProcessor without its video processor): Qwen's tokenizer, the
    Qwen2-VL PIL image processor at 64 px (patch 16, merge 2: 2 x 2 positions), a vision tower whose only
    block also feeds the decoder (deepstack), interleaved M-RoPE."""
    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    torch.manual_seed(seed)
    cfg = Qwen3VLConfig(
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        text_config=dict(vocab_size=len(tok), **TEXT, head_dim=16, pad_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"],
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                                          "rope_theta": 10000.0}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                               size={"shortest_edge": 64 * 64, "longest_edge": 64 * 64})
    processor = image_only_processor(Qwen3VLProcessor)(image_processor=image_processor, tokenizer=tok,
                                                       chat_template=QWEN_CHAT_TEMPLATE)
    return Qwen3VLForConditionalGeneration(cfg).eval(), processor


# ---------------------------------------------------------------- more image-text-to-text families
# Each: a byte-level BPE tokenizer with the family's special tokens, its conversation format reduced to
# what the records use, the family's own processor class over a PIL image processor (32 px images, 8 px
# patches), and a 2-layer, 32-wide language model with grouped-query attention.
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)


def _ids(tok, **names) -> dict:
    """Token ids of the named special tokens, as config keywords (pad_token_id=..., ...)."""
    return {key: tok.convert_tokens_to_ids(token) for key, token in names.items()}


VICUNA_TEMPLATE = (  # LLaVA-NeXT (vicuna): "USER: <image>\nquestion ASSISTANT: answer</s>"
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{{ '\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {{ m['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}")


def tiny_llava_next(seed: int = 0):
    """(LlavaNextForConditionalGeneration, LlavaNextProcessor): anyres with one 32 px tile, so an image is
    16 base positions then 4 x (4 + newline) high-resolution ones."""
    tok = bpe_tokenizer(["<pad>", "<s>", "</s>", "<image>"], VICUNA_TEMPLATE, ("USER: ASSISTANT:",), bos_token="<s>",
                        eos_token="</s>", pad_token="<pad>")
    ids = _ids(tok, pad_token_id="<pad>", bos_token_id="<s>", eos_token_id="</s>")
    torch.manual_seed(seed)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**VISION, projection_dim=32),
                          text_config=LlamaConfig(vocab_size=len(tok), **TEXT, **ids),
                          image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=[[32, 32]],
                          vision_feature_layer=-1, image_seq_length=16)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=[[32, 32]])
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default", chat_template=VICUNA_TEMPLATE,
                                   num_additional_image_tokens=1)
    return LlavaNextForConditionalGeneration(cfg).eval(), processor


CHATML_TEMPLATE = (  # Qwen2's conversation format with LLaVA's "<image>" placeholder (LLaVA-OneVision)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_llava_onevision(seed: int = 0):
    """(LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor without its video processor, which
    needs torchvision): SigLIP 4 x 4 patches, anyres with one 32 px tile, so an image is 16 base
    positions then 4 x (4 + newline) high-resolution ones; a Qwen2 decoder."""
    tok = bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"], CHATML_TEMPLATE,
                        ("user\nassistant\n",), eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = _ids(tok, pad_token_id="<|endoftext|>", eos_token_id="<|im_end|>")
    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(vision_config=dict(model_type="siglip_vision_model", **VISION),
                               text_config=dict(model_type="qwen2", vocab_size=len(tok), **TEXT, **ids),
                               **_ids(tok, image_token_index="<image>", video_token_index="<video>"),
                               image_grid_pinpoints=[[32, 32]], vision_feature_layer=-1)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 32]])
    processor = image_only_processor(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=CHATML_TEMPLATE)
    return LlavaOnevisionForConditionalGeneration(cfg).eval(), processor


INTERNVL_TEMPLATE = CHATML_TEMPLATE.replace("<image>", "<IMG_CONTEXT>")


def tiny_internvl(seed: int = 0):
    """(InternVLForConditionalGeneration, InternVLProcessor without its video processor): images cropped
    into 2 x 2 tiles of 32 px, then the thumbnail, each 4 x 4 patches pixel-shuffled (0.5) into 4 image
    positions between <img> and </img>; a Qwen2 decoder."""
    names = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *names.values()], INTERNVL_TEMPLATE,
                        ("user\nassistant\n",), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                        extra_special_tokens=names)
    ids = _ids(tok, pad_token_id="<|endoftext|>", eos_token_id="<|im_end|>")
    torch.manual_seed(seed)
    cfg = InternVLConfig(vision_config=dict(VISION, image_size=[32, 32], patch_size=[8, 8]),
                         text_config=dict(model_type="qwen2", vocab_size=len(tok), **TEXT, **ids),
                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4,
                         downsample_ratio=0.5)
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=4,
                                               max_patches=4)
    processor = image_only_processor(InternVLProcessor)(image_processor=image_processor, tokenizer=tok,
                                                        image_seq_length=4, chat_template=INTERNVL_TEMPLATE)
    return InternVLForConditionalGeneration(cfg).eval(), processor


AYA_TEMPLATE = CHATML_TEMPLATE.replace("<|im_start|>", "<BOS_TOKEN>").replace("<|im_end|>", "<|END_OF_TURN_TOKEN|>")


def tiny_aya_vision(seed: int = 0):
    """(AyaVisionForConditionalGeneration, AyaVisionProcessor): images cropped into 2 x 2 tiles of 32 px, then
    the global tile, each 4 x 4 SigLIP patches pixel-shuffled (downsample 2) into 4 image positions; a
    Cohere2 decoder (sliding-window and global layers)."""
    specials = ["<PAD>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>",
                "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL"]
    tok = bpe_tokenizer(specials, AYA_TEMPLATE, ("user\nassistant\n",), bos_token="<BOS_TOKEN>",
                        eos_token="<|END_OF_TURN_TOKEN|>", pad_token="<PAD>")
    ids = _ids(tok, pad_token_id="<PAD>", bos_token_id="<BOS_TOKEN>", eos_token_id="<|END_OF_TURN_TOKEN|>")
    torch.manual_seed(seed)
    cfg = AyaVisionConfig(vision_config=dict(model_type="siglip_vision_model", **VISION),
                          text_config=dict(model_type="cohere2", vocab_size=len(tok), **TEXT, head_dim=16,
                                           sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                                           **ids),
                          image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"), downsample_factor=2)
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=4,
                                               max_patches=4)
    processor = AyaVisionProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8, img_size=32,
                                   downsample_factor=2, chat_template=AYA_TEMPLATE)
    return AyaVisionForConditionalGeneration(cfg).eval(), processor


LLAMA3_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ '\n\n' }}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{{ '\n\n' }}"
    "{% endif %}")


def tiny_mllama(seed: int = 0, max_tiles: int = 1):
    """(MllamaForConditionalGeneration, MllamaProcessor): 32 px tiles of 4 x 4 patches (+ a class token), one
    per image unless ``max_tiles`` (2: a wide image is split into (1, 2) tiles, a tall one into (2, 1));
    decoder layer 1 is a cross-attention layer (the image enters there only)."""
    specials = ["<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|eot_id|>", "<|image|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|python_tag|>"]
    tok = bpe_tokenizer(specials, LLAMA3_TEMPLATE, ("user\n\nassistant\n\n",), bos_token="<|begin_of_text|>",
                        eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    ids = _ids(tok, pad_token_id="<|finetune_right_pad_id|>", bos_token_id="<|begin_of_text|>",
               eos_token_id="<|eot_id|>")
    torch.manual_seed(seed)
    cfg = MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1,
                           attention_heads=2, image_size=32, patch_size=8, max_num_tiles=max_tiles,
                           intermediate_layers_indices=[0], vision_output_dim=64,
                           supported_aspect_ratios=[[h, w] for h in range(1, max_tiles + 1)
                                                    for w in range(1, max_tiles + 1) if h * w <= max_tiles]),
        text_config=dict(vocab_size=len(tok), **TEXT, cross_attention_layers=[1], **ids),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    image_processor = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=max_tiles)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=LLAMA3_TEMPLATE)
    return MllamaForConditionalGeneration(cfg).eval(), processor


IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{% if m['role'] == 'assistant' %} {% endif %}{{ c['text'] }}"
    "{% endif %}{% endfor %}<end_of_utterance>{{ '\n' }}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def tiny_idefics3(seed: int = 0):
    """(Idefics3ForConditionalGeneration, Idefics3Processor): image splitting into 2 x 2 tiles and the global
    image, each 4 x 4 patches pixel-shuffled (scale 2) into 4 image positions."""
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                "<global-img>"]
    tok = bpe_tokenizer(specials, IDEFICS3_TEMPLATE, ("User:Assistant:",), bos_token="<|im_start|>",
                        eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    ids = _ids(tok, pad_token_id="<|endoftext|>", bos_token_id="<|im_start|>", eos_token_id="<end_of_utterance>")
    torch.manual_seed(seed)
    cfg = Idefics3Config(vision_config={k: v for k, v in VISION.items()},
                         text_config=dict(model_type="llama", vocab_size=len(tok), **TEXT, **ids), scale_factor=2,
                         image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=ids["pad_token_id"])
    # images resized to 64 px and split into 2 x 2 tiles of 32 px, then the global image: 5 x 4 positions
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 64},
                                                max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                  chat_template=IDEFICS3_TEMPLATE)
    return Idefics3ForConditionalGeneration(cfg).eval(), processor


def tiny_idefics2(seed: int = 0):
    """(Idefics2ForConditionalGeneration, Idefics2Processor): Idefics3's conversation format; an image's 4 x 4
    patches are resampled by a perceiver into 4 latents (the image positions: no patch grid)."""
    template = IDEFICS3_TEMPLATE.replace("<|im_start|>", "<s>")
    tok = bpe_tokenizer(["<unk>", "<s>", "</s>", "<end_of_utterance>", "<image>", "<fake_token_around_image>"],
                        template, ("User:Assistant:",), bos_token="<s>", eos_token="<end_of_utterance>",
                        pad_token="<unk>")
    ids = _ids(tok, pad_token_id="<unk>", bos_token_id="<s>", eos_token_id="<end_of_utterance>")
    torch.manual_seed(seed)
    cfg = Idefics2Config(vision_config=dict(VISION), text_config=dict(model_type="mistral", vocab_size=len(tok), **TEXT,
                                                                      **ids),
                         perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1,
                                               resampler_n_heads=2, resampler_head_dim=16, num_key_value_heads=1),
                         image_token_id=tok.convert_tokens_to_ids("<image>"))
    image_processor = Idefics2ImageProcessorPil(do_image_splitting=False, size={"shortest_edge": 32, "longest_edge": 32})
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                  chat_template=template)
    return Idefics2ForConditionalGeneration(cfg).eval(), processor


GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
    "{{ '\n' }}{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}<end_of_turn>{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model{{ '\n' }}{% endif %}")


def tiny_gemma3(seed: int = 0):
    """(Gemma3ForConditionalGeneration, Gemma3Processor): SigLIP 4 x 4 patches pooled to 4 soft tokens;
    sliding-window and global layers."""
    specials = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                "<image_soft_token>"]
    tok = bpe_tokenizer(specials, GEMMA3_TEMPLATE, ("user\nmodel\n",), bos_token="<bos>", eos_token="<eos>",
                        pad_token="<pad>", extra_special_tokens={"boi_token": "<start_of_image>",
                                                                "eoi_token": "<end_of_image>",
                                                                "image_token": "<image_soft_token>"})
    ids = _ids(tok, pad_token_id="<pad>", bos_token_id="<bos>", eos_token_id="<eos>")
    torch.manual_seed(seed)
    cfg = Gemma3Config(text_config=dict(vocab_size=len(tok), **TEXT, head_dim=16, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention"], **ids),
                       vision_config=dict(model_type="siglip_vision_model", **VISION), mm_tokens_per_image=4,
                       **_ids(tok, boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>",
                              image_token_index="<image_soft_token>"))
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4,
                                chat_template=GEMMA3_TEMPLATE)
    return Gemma3ForConditionalGeneration(cfg).eval(), processor


def tiny_paligemma(seed: int = 0):
    """(PaliGemmaForConditionalGeneration, PaliGemmaProcessor): SigLIP 4 x 4 patches, a Gemma decoder; like
    the real checkpoints, the processor has no chat template (the adapter declares PaliGemma's format)."""
    tok = bpe_tokenizer(["<pad>", "<bos>", "<eos>", "<image>"], None, bos_token="<bos>", eos_token="<eos>",
                        pad_token="<pad>")
    ids = _ids(tok, pad_token_id="<pad>", bos_token_id="<bos>", eos_token_id="<eos>")
    torch.manual_seed(seed)
    cfg = PaliGemmaConfig(vision_config=dict(model_type="siglip_vision_model", **VISION, projection_dim=32),
                          text_config=dict(model_type="gemma", vocab_size=len(tok), **TEXT, head_dim=16, **ids),
                          image_token_index=tok.convert_tokens_to_ids("<image>"), projection_dim=32)
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16  # PaliGemmaProcessor's count of image positions
    return PaliGemmaForConditionalGeneration(cfg).eval(), PaliGemmaProcessor(image_processor=image_processor,
                                                                             tokenizer=tok)


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
