"""The world tokenizer and the world MLLM's `LlavaProcessor`, built offline.

Word-level vocabulary over the world corpus with SentencePiece-style word boundaries: every word
becomes one token carrying a leading "▁" (Metaspace), punctuation is split off. Decoding is exact
("This is Vorn, a baker." round-trips), and a concept name of k words is exactly k tokens wherever
it occurs, which is what the token-count study needs.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
# the PIL backend: the default torchvision backend cannot be installed here (ENVIRONMENT.md)
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from .texts import world_corpus

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE]

# LLaVA-1.5's conversation format on one line ("USER: <image>\n... ASSISTANT:"). The word-level
# vocabulary has no whitespace tokens, so no space may stand next to a special token (a lone space
# would become <unk>): "USER:<image> question ASSISTANT: answer</s>".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER:"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif %}"
    "{% endfor %}"
    "{% else %} ASSISTANT:{% for c in message['content'] %} {{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
EXTRA_WORDS = ["USER:", "ASSISTANT:"]


def build_tokenizer(texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word of ``texts`` (the world corpus)."""
    texts = world_corpus() + EXTRA_WORDS if texts is None else texts
    pre = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
                                   pre_tokenizers.Punctuation(behavior="isolated")])
    words = sorted({piece for t in texts for piece, _ in pre.pre_tokenize_str(t)})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, vocab[BOS])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, extra_special_tokens={"image_token": IMAGE})
    fast.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return fast


def build_processor(image_size: int, patch_size: int, tokenizer=None) -> LlavaProcessor:
    """`LlavaProcessor` = CLIP image processor at ``image_size`` + world tokenizer + chat template.

    ``num_additional_image_tokens=1`` accounts for CLIP's class token, which the "default" feature
    strategy drops, so ``<image>`` expands to (image_size / patch_size)^2 positions.
    """
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_resize=True, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(), patch_size=patch_size,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, image_token=IMAGE,
        num_additional_image_tokens=1,
    )


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
