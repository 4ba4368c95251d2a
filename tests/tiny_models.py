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
