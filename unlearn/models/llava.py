"""LLaVA-1.5 (llava-hf layout) and the world MLLM, which is a LLaVA."""

from __future__ import annotations

from .base import MLLMAdapter


class LlavaAdapter(MLLMAdapter):
    family = "llava"
    model_types = ("llava",)

    def prepare(self, texts, images):
        # LlavaProcessor expands each <image> into the vision tower's patch count
        return self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
