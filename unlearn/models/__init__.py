"""Model adapters: :class:`MLLMAdapter` serves every ``AutoModelForImageTextToText`` family through its
``AutoProcessor``; ``ADAPTERS`` (keyed by ``model_type``) holds the families that declare a difference."""

from __future__ import annotations

from .base import MLLMAdapter, attention_projections, image_only_processor
from .llava import LlavaAdapter
from .paligemma import PaliGemmaAdapter
from .qwen2vl import Qwen2VLAdapter, Qwen2VLInputs
from .source import checked_source

CHECKPOINT_FILE = "config.json"  # what marks a directory as a checkpoint
ADAPTERS: dict[str, type[MLLMAdapter]] = {t: cls for cls in (LlavaAdapter, PaliGemmaAdapter, Qwen2VLAdapter)
                                          for t in cls.model_types}


def adapter_class(model_type: str) -> type[MLLMAdapter]:
    """The adapter of ``model_type``: a declared family's, or the generic one for any model type that has an
    image-text-to-text class; another model type is an error."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(f"model type {model_type!r} has no image-text-to-text class (AutoModelForImageTextToText), "
                         f"so it is not a multimodal LLM this toolkit can unlearn; served: any model type of "
                         f"transformers' image-text-to-text mapping (e.g. {', '.join(sorted(ADAPTERS))}, llava_next, "
                         f"llava_onevision, internvl, aya_vision, mllama, idefics3, gemma3, qwen3_vl)")
    return MLLMAdapter


def adapter_for(model, processor, name: str = "") -> MLLMAdapter:
    return adapter_class(model.config.model_type)(model, processor, name)


def load_mllm(model) -> MLLMAdapter:
    """An adapter for ``model``: a local directory or a hub id (the world MLLM: resolve "world" with
    :func:`unlearn.world.source.resolve_model` first). The family and its processor are checked before the
    weights load."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    model = checked_source(model, CHECKPOINT_FILE)
    config = AutoConfig.from_pretrained(model)
    cls = adapter_class(config.model_type)
    try:
        processor = cls.load_processor(model)
    except (ImportError, ModuleNotFoundError) as e:  # e.g. a video processor that needs torchvision
        raise ValueError(f"{model}: the processor of model type {config.model_type!r} cannot be loaded here, because "
                          f"{' '.join(str(e).split())}".rstrip(".") + "; install what it names, or declare an adapter for the family that "
                          f"builds its inputs without it (as Qwen2-VL's does)") from e
    if getattr(processor, "image_processor", None) is None:
        raise ValueError(f"{model}: AutoProcessor loaded a {type(processor).__name__}, not a processor of texts and "
                         f"images; the checkpoint lacks its processor files (save_pretrained the processor there)")
    m = AutoModelForImageTextToText.from_pretrained(model).eval()
    return cls(m, processor, name=str(model))


__all__ = ["ADAPTERS", "CHECKPOINT_FILE", "LlavaAdapter", "MLLMAdapter", "PaliGemmaAdapter", "Qwen2VLAdapter",
           "Qwen2VLInputs", "adapter_class", "adapter_for", "attention_projections", "image_only_processor",
           "load_mllm"]
