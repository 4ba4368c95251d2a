"""Which tokens belong to the concept: the per-token concept flags of answers and SD prompts.

Names are found in *text* (:mod:`unlearn.data.names`), then mapped back to tokens, as BPE needs: a
name can be split into several tokens, carry a leading space or not, and merge with its context, so
decoding single tokens (the public FTTP code) or matching the name's ids tokenized alone is wrong.
Each token gets its character span in the cumulatively decoded text; a token is a concept token if
its span overlaps an occurrence of a name or alias. FTTP's signed weights come from these flags
(:func:`unlearn.methods.losses.signed_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from knowtrace.logprobs import IGNORE_INDEX

from .names import name_spans


class ConceptNotInAnswer(ValueError):
    """An answer that should name the concept does not."""


def token_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decoded text of ``ids`` and the (start, end) character span of each token in it."""
    spans, prev = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        # a partial multi-byte character can change earlier characters: keep the common prefix
        common = 0
        while common < min(len(prev), len(text)) and prev[common] == text[common]:
            common += 1
        start = min(common, len(prev))
        if text.endswith("\ufffd"):  # a byte of a character still incomplete (e.g. a Chinese one): it is that character
            start = min(start, len(text) - 1)
        spans.append((start, len(text)))
        prev = text
    return prev, spans


def concept_token_mask(tokenizer, ids: Sequence[int], names: Sequence[str]) -> list[bool]:
    """For each id, whether its characters overlap an occurrence of one of ``names``."""
    text, spans = token_spans(tokenizer, ids)
    occ = name_spans(text, names)
    return [any(s < oe and os_ < e for os_, oe in occ) for s, e in spans]


def concept_flags(tokenizer, labels: torch.Tensor, names: Sequence[str], record_ids: Sequence[str] | None = None,
                  concept: str | None = None, allow_missing: bool = False) -> torch.Tensor:
    """(batch, seq) bool: the labelled answer tokens that belong to the concept (False where unscored).

    labels: (batch, seq) with ``IGNORE_INDEX`` on unscored positions (the final, image-expanded
    sequence). A row whose answer does not name the concept raises :class:`ConceptNotInAnswer`
    naming the record and the concept, unless ``allow_missing`` (then all its tokens are natural).
    """
    if not names or not any(n.strip() for n in names):
        raise ValueError("no concept name given: pass the concept's name and aliases")
    device, labels = labels.device, labels.cpu()  # read on the host once: the rows are decoded there
    flags = torch.zeros(labels.shape, dtype=torch.bool)
    for row in range(labels.shape[0]):
        pos = (labels[row] != IGNORE_INDEX).nonzero().squeeze(1)
        row_flags = concept_token_mask(tokenizer, labels[row, pos].tolist(), names)
        if not any(row_flags) and not allow_missing:
            rid = record_ids[row] if record_ids is not None else f"row {row}"
            answer = tokenizer.decode(labels[row, pos].tolist(), skip_special_tokens=True)
            raise ConceptNotInAnswer(
                f"record {rid}: the answer {answer!r} does not name the concept {concept or names[0]!r} "
                f"(looked for {list(names)}); fix the record, or allow all-natural answers explicitly "
                f"(allow_missing=True)")
        flags[row, pos] = torch.tensor(row_flags, dtype=torch.bool)
    return flags.to(device)


def prompt_token_flags(tokenizer, prompt: str, names: Sequence[str]) -> tuple[list[int], list[bool]]:
    """An SD prompt as its text encoder sees it, start to end token (padding dropped; padded inputs
    add it after the end, so positions are the same), and which tokens are the concept's."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return ids, concept_token_mask(tokenizer, ids, names)


def concept_token_positions(tokenizer, prompt: str, names: Sequence[str]) -> list[int]:
    """Positions (in the padded text-encoder input, start token included) of the concept's tokens; an
    error when the prompt does not name it."""
    _, flags = prompt_token_flags(tokenizer, prompt, names)
    if not any(flags):
        raise ValueError(f"prompt {prompt!r}: none of the concept's names ({', '.join(names)}) is among its tokens")
    return [i for i, f in enumerate(flags) if f]
