"""LLaVA-1.5 (llava-hf layout) and the world MLLM, which is a LLaVA: the generic adapter, named."""

from __future__ import annotations

from .base import MLLMAdapter


class LlavaAdapter(MLLMAdapter):
    family = "llava"
    model_types = ("llava",)
