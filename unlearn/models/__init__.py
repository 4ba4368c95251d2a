"""Model adapters, one per family, found by the checkpoint's ``model_type``."""

from __future__ import annotations

from .base import MLLMAdapter
from .llava import LlavaAdapter
from .qwen2vl import Qwen2VLAdapter, Qwen2VLInputs
from .source import checked_source

CHECKPOINT_FILE = "config.json"  # what marks a directory as a checkpoint
ADAPTERS: dict[str, type[MLLMAdapter]] = {t: cls for cls in (LlavaAdapter, Qwen2VLAdapter) for t in cls.model_types}


def adapter_for(model, processor, name: str = "") -> MLLMAdapter:
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise ValueError(f"no adapter for model type {model_type!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type](model, processor, name)


def load_mllm(model) -> MLLMAdapter:
    """An adapter for ``model``: a local directory or a hub id (the world MLLM: resolve "world" with
    :func:`unlearn.world.source.resolve_model` first)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    model = checked_source(model, CHECKPOINT_FILE)
    config = AutoConfig.from_pretrained(model)
    if config.model_type not in ADAPTERS:
        raise ValueError(f"{model}: model type {config.model_type!r} has no adapter; supported: {sorted(ADAPTERS)}")
    m = AutoModelForImageTextToText.from_pretrained(model).eval()
    if ADAPTERS[config.model_type] is Qwen2VLAdapter:
        from transformers import Qwen2VLImageProcessorPil

        processor = Qwen2VLInputs(AutoTokenizer.from_pretrained(model), Qwen2VLImageProcessorPil.from_pretrained(model))
    else:
        processor = AutoProcessor.from_pretrained(model)
    return adapter_for(m, processor, name=str(model))


__all__ = ["ADAPTERS", "CHECKPOINT_FILE", "LlavaAdapter", "MLLMAdapter", "Qwen2VLAdapter", "Qwen2VLInputs", "adapter_for", "load_mllm"]
