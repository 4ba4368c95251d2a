"""The MLLM adapter: any ``AutoModelForImageTextToText`` family with its ``AutoProcessor``.

A record's chat text comes from the processor's chat template; the processor turns texts and images into
tensors, expanding each image placeholder into the positions the model fills with image features
(:meth:`MLLMAdapter.prepare`). Labels are computed on the final, image-expanded sequence: the record's
prompt alone is prepared too, and its length masks the conversation's prompt positions with
``IGNORE_INDEX`` (the prompt must be a token prefix of the full conversation; checked). LoRA targets
are found in the model (:func:`attention_projections`), not named per family.

What differs between families is declared data on a subclass (a few lines each, in this package):
``images_required`` (the processor takes no text-only record), ``answer_token_type`` (a prefix-LM
family's ``token_type_ids`` value for the causal answer part), ``default_chat_template`` (for
checkpoints saved without one), or an override of :meth:`prepare` / :meth:`load_processor` where the
processor cannot run here (Qwen2-VL).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import ClassVar

import torch
from knowtrace.logprobs import IGNORE_INDEX

from ..data.records import Record
from ..data.token_weights import concept_flags


def attention_projections(model: torch.nn.Module) -> list[str]:
    """Names (in ``model``) of the language model's attention projections, found by walking it: the
    language model is ``model.get_decoder()``; its attention modules are the modules that have a
    ``head_dim`` (self-attention, and the cross-attention layers of a family whose images enter through
    them, e.g. Mllama); their ``nn.Linear`` children are the query, key, value and output projections.
    The vision tower and the MLP layers are never among them."""
    from knowtrace.mllm_attention import language_model

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # names as peft sees them
    decoder = language_model(base)
    prefix = next(name for name, m in base.named_modules() if m is decoder)
    names = [f"{prefix}.{name}.{child}".lstrip(".") for name, m in decoder.named_modules() if hasattr(m, "head_dim")
             for child, c in m.named_children() if isinstance(c, torch.nn.Linear)]
    if not names:
        raise ValueError(f"{type(decoder).__name__} has no attention module with Linear projections (a module with a "
                         f"head_dim): give lora_targets=REGEX explicitly")
    return names


def processor_class(path: str) -> type:
    """The processor class a checkpoint names (processor_config.json), else its model type's."""
    import json
    from pathlib import Path

    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

    config = Path(path) / "processor_config.json"
    name = json.loads(config.read_text()).get("processor_class") if config.is_file() else None
    name = name or PROCESSOR_MAPPING_NAMES.get(AutoConfig.from_pretrained(path).model_type)
    cls = processor_class_from_name(name) if name else None
    if cls is None:
        raise ValueError(f"{path}: no processor class for this checkpoint")
    return cls


def image_only_processor(cls: type) -> type:
    """``cls`` (a ``ProcessorMixin``) without its video processor: the sub-processors it loads, checks and
    saves are the others. Its video processor needs torchvision (absent here), and without the
    subclass even ``video_processor=None`` fails transformers' check of the sub-processor classes; the
    processor's image and text path does not use it."""
    attributes = [a for a in cls.get_attributes() if a != "video_processor"]
    if len(attributes) == len(cls.get_attributes()):
        raise ValueError(f"{cls.__name__} has no video processor to leave out")
    return type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda _: attributes)})


def target_regex(names: list[str], all_names) -> str:
    """A regex (peft's ``target_modules``, full match) that matches exactly ``names`` among ``all_names``:
    layer numbers written as ``\\d+`` (a short pattern), or the literal names where that would match more."""
    literal = [re.escape(n) for n in names]
    short = "|".join(dict.fromkeys(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", n) for n in literal))
    if {n for n in all_names if re.fullmatch(short, n)} == set(names):
        return short
    return "|".join(literal)


class MLLMAdapter:
    family: ClassVar[str] = ""  # a declared family's name (ADAPTERS); else the instance's is the model_type
    model_types: ClassVar[tuple[str, ...]] = ()  # config.model_type values a declared family serves
    images_required: ClassVar[bool] = False  # the processor refuses a text without an image (PaliGemma)
    answer_token_type: ClassVar[int | None] = None  # token_type_ids of the answer (a prefix-LM's causal suffix)
    default_chat_template: ClassVar[str | None] = None  # for checkpoints whose processor has none

    ENCODE_CACHE = 256  # batches kept: unlearning revisits the same few records every step

    def __init__(self, model, processor, name: str = ""):
        self.model, self.processor, self.name = model, processor, name or model.config.model_type
        self.family = self.family or model.config.model_type
        self._encoded: OrderedDict = OrderedDict()
        self._lora_targets: str | None = None

    @classmethod
    def load_processor(cls, path: str):
        """The checkpoint's processor (a declared family whose processor cannot run here overrides it). A
        processor whose video processor cannot load (it needs torchvision) is loaded without it
        (:func:`image_only_processor`): records have images, never videos."""
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(path)
        except (ImportError, OSError, AttributeError) as e:
            try:
                return image_only_processor(processor_class(path)).from_pretrained(path)
            except Exception:
                raise e from None  # the video processor was not what failed: the original error says what did

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def crop_side(self) -> int | None:
        """The side of the square the image processor crops to (the world renders its images at it); None for
        processors without a fixed crop."""
        crop = getattr(getattr(self.processor, "image_processor", None), "crop_size", None)
        try:
            return int(crop["height"])
        except (TypeError, KeyError):
            return None

    @property
    def lora_targets(self) -> str:
        """peft's target regex: the language model's attention projections (:func:`attention_projections`)."""
        if self._lora_targets is None:
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            self._lora_targets = target_regex(attention_projections(base), [n for n, _ in base.named_modules()])
        return self._lora_targets

    def prepare(self, texts: list[str], images: list[list]) -> dict:
        """Tensors for ``texts`` (image placeholders expanded into the model's image positions by the
        processor) and ``images`` (per text, its images), padded on the tokenizer's side."""
        flat = [im for row in images for im in row]
        # the side is passed, not left to the tokenizer: some processors default to their own (InternVL: left)
        batch = self.processor(text=texts, images=images if flat else None, padding=True,
                               padding_side=self.tokenizer.padding_side, return_tensors="pt")
        batch.pop("labels", None)  # some processors add their own (PaliGemma); the adapter's are computed below
        return dict(batch)

    def chat(self, record: Record, with_answer: bool) -> str:
        """The record's conversation as text, with the family's image placeholder; without the
        answer it ends with the generation prompt."""
        content = ([{"type": "image"}] if record.image is not None else []) + [{"type": "text", "text": record.question}]
        messages = [{"role": "user", "content": content}]
        if with_answer:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": record.answer}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=not with_answer, tokenize=False,
                                                  chat_template=None if self._own_template() else self.default_chat_template)

    def _own_template(self) -> bool:
        return bool(getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None))

    def check_records(self, records: list[Record]) -> None:
        """An error naming the record, before anything runs, for a record this family cannot take: one
        whose image the chat template does not place (its text has no image placeholder), or one with no
        image where the processor needs one."""
        if not (self._own_template() or self.default_chat_template):
            raise ValueError(f"{self.name}: the processor has no chat template, so records cannot be written as "
                             f"conversations; save the checkpoint's processor with one (processor.chat_template)")
        placeholder = getattr(self.processor, "image_token", None)
        for r in records:
            if r.image is None and self.images_required:
                raise ValueError(f"record {r.id} has no image, and {self.family}'s processor takes only texts with an "
                                 f"image: give this model records that all have an image")
            if r.image is not None and placeholder and self.chat(r, with_answer=False).count(placeholder) != 1:
                raise ValueError(f"record {r.id}: the chat template of {self.name} does not place the record's image "
                                 f"(no single {placeholder!r} in its text); use a processor whose chat template "
                                 f"renders {{'type': 'image'}} content")

    def encode(self, records: list[Record], train: bool = True, cache: bool = True) -> dict:
        """Batch for ``records``: full conversations with answer-only labels (``train``), or
        left-padded prompts for generation. Batches are cached (keyed by the records' contents and
        image objects, which the cache keeps alive), so a step over known records costs no
        preprocessing; callers must not modify the returned tensors in place."""
        if not cache:  # batches that will not come back (pre-training on random batches)
            return self._to_model_device(self._encode(records, train))
        return self._to_model_device(self._cached(train, records, lambda: self._encode(records, train)))

    def _to_model_device(self, batch: dict) -> dict:
        """A new dict of ``batch`` with its tensors on the model's device (no copy where they are there)."""
        device = next(self.model.parameters()).device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def concept_flags(self, records: list[Record], names, allow_missing: bool = False) -> torch.Tensor:
        """(batch, seq) bool: which labelled answer tokens of ``encode(records)`` are the concept's
        (:func:`unlearn.data.token_weights.concept_flags`; cached like the batches)."""
        return self._cached(("flags", tuple(names), allow_missing), records, lambda: concept_flags(
            self.tokenizer, self.encode(records)["labels"], names, [r.id for r in records], allow_missing=allow_missing))

    def _cached(self, what, records: list[Record], build):
        key = (what, tuple((r.id, r.question, r.answer, id(r.image)) for r in records))
        if key in self._encoded:
            self._encoded.move_to_end(key)
            return self._encoded[key][0]
        value = build()
        self._encoded[key] = (value, [r.image for r in records])
        if len(self._encoded) > self.ENCODE_CACHE:
            self._encoded.popitem(last=False)
        return value

    def _encode(self, records: list[Record], train: bool) -> dict:
        tok = self.tokenizer
        images = [[r.image] if r.image is not None else [] for r in records]  # per text, its images
        tok.padding_side = "left"
        prompts = self.prepare([self.chat(r, with_answer=False) for r in records], images)
        if not train:
            return prompts
        tok.padding_side = "right"
        batch = self.prepare([self.chat(r, with_answer=True) for r in records], images)
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (batch, seq)
        labels = torch.full_like(ids, IGNORE_INDEX)
        width = prompts["input_ids"].shape[1]
        for i, r in enumerate(records):
            n = int(prompts["attention_mask"][i].sum())
            prompt_ids = prompts["input_ids"][i, width - n:]  # left-padded: the prompt is at the end
            if not torch.equal(ids[i, :n], prompt_ids):
                raise ValueError(f"record {r.id}: the prompt's tokens are not a prefix of the full conversation's "
                                 f"under {self.family}'s chat template, so answer tokens cannot be located")
            end = int(mask[i].sum())
            labels[i, n:end] = ids[i, n:end]
            if self.answer_token_type is not None:  # a prefix-LM: the answer is the causal part
                batch["token_type_ids"][i, n:end] = self.answer_token_type
        batch["labels"] = labels
        return batch

    @torch.inference_mode()
    def generate(self, records: list[Record], max_new_tokens: int = 32, batch_size: int = 32) -> list[str]:
        """Greedy answers; image and text-only records are batched separately."""
        out = [""] * len(records)
        for with_image in (True, False):
            group = [i for i, r in enumerate(records) if (r.image is not None) == with_image]
            for s in range(0, len(group), batch_size):
                chunk = group[s:s + batch_size]
                batch = self.encode([records[i] for i in chunk], train=False)
                gen = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
                texts = self.tokenizer.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
                for i, t in zip(chunk, texts):
                    out[i] = t.strip()
        return out
