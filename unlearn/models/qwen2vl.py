"""Qwen2-VL and Qwen2.5-VL: the generic adapter with its processor replaced (:meth:`load_processor`,
:meth:`prepare`).

Their `Qwen2VLProcessor` needs torchvision (its video processor), which cannot be installed here, so
inputs are built from the PIL image processor (`Qwen2VLImageProcessorPil`, the same resizing and
patching) and the tokenizer, expanding each ``<|image_pad|>`` into ``t * h * w / merge_size**2``
positions as the processor does, plus the ``mm_token_type_ids`` (1 = image) the model's M-RoPE needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .base import MLLMAdapter

IMAGE_PAD = "<|image_pad|>"


@dataclass
class Qwen2VLInputs:
    """Stands where a processor would: the tokenizer (with the chat template) and the image processor."""

    tokenizer: object
    image_processor: object
    image_token = IMAGE_PAD  # the chat template's image placeholder

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def save_pretrained(self, path):
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


class Qwen2VLAdapter(MLLMAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")

    @classmethod
    def load_processor(cls, path):
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        return Qwen2VLInputs(AutoTokenizer.from_pretrained(path), Qwen2VLImageProcessorPil.from_pretrained(path))

    def prepare(self, texts, images):
        images = [im for row in images for im in row]  # the image processor takes them flat, in text order
        out = {}
        if images:
            out.update(self.processor.image_processor(images=images, return_tensors="pt"))
            merge = self.processor.image_processor.merge_size
            counts = iter((out["image_grid_thw"].prod(-1) // merge**2).tolist())  # positions per image
            texts = [re.sub(re.escape(IMAGE_PAD), lambda _: IMAGE_PAD * next(counts), text) for text in texts]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        enc["mm_token_type_ids"] = (enc["input_ids"] == image_id).to(torch.long)
        return {**enc, **out}
