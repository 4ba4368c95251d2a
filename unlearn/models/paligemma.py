"""PaliGemma: a prefix-LM whose processor needs an image in every text and whose checkpoints carry no chat
template. Its format (big_vision's): image tokens, ``<bos>``, the prompt and ``\\n`` (the processor adds
``<bos>`` and the ``\\n``), then the answer and ``<eos>``; ``token_type_ids`` 0 on the prefix (attended
bidirectionally), 1 on the answer (causal)."""

from __future__ import annotations

from .base import MLLMAdapter

# the answer follows the processor's "\n"; the prompt alone (the generation prompt) is the user's turn
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '\\n' }}{% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


class PaliGemmaAdapter(MLLMAdapter):
    family = "paligemma"
    model_types = ("paligemma",)
    images_required = True
    answer_token_type = 1
    default_chat_template = CHAT_TEMPLATE
