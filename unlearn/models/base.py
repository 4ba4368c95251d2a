"""What every MLLM family adapter provides, and the parts that are the same for all of them.

Only one thing differs between families: how texts and images become tensors (:meth:`MLLMAdapter.prepare`,
which expands the image placeholder into patch positions); a record's chat text comes from the processor's
chat template. Labels are computed on the final, image-expanded sequence: the record's prompt alone is
prepared too, and its length masks the conversation's prompt positions with ``IGNORE_INDEX`` (the prompt
must be a token prefix of the full conversation; checked).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import ClassVar

import torch
from knowtrace.logprobs import IGNORE_INDEX

from ..data.records import Record
from ..data.token_weights import concept_flags


class MLLMAdapter(ABC):
    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this adapter serves
    # LoRA targets: the language model's attention projections (a peft regex over module names)
    lora_targets: ClassVar[str] = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"

    ENCODE_CACHE = 256  # batches kept: unlearning revisits the same few records every step

    def __init__(self, model, processor, name: str = ""):
        self.model, self.processor, self.name = model, processor, name or model.config.model_type
        self._encoded: OrderedDict = OrderedDict()

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @abstractmethod
    def prepare(self, texts: list[str], images: list) -> dict:
        """Tensors for texts (placeholders expanded into patch positions) and their images, padded."""

    def chat(self, record: Record, with_answer: bool) -> str:
        """The record's conversation as text, with the family's image placeholder; without the
        answer it ends with the generation prompt."""
        content = ([{"type": "image"}] if record.image is not None else []) + [{"type": "text", "text": record.question}]
        messages = [{"role": "user", "content": content}]
        if with_answer:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": record.answer}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=not with_answer, tokenize=False)

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
        images = [r.image for r in records if r.image is not None]
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
