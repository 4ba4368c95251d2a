"""Which answer tokens belong to the concept, and the signed per-token weights built from that.

Names are found in *text*, then mapped back to tokens, which is what BPE needs: a name can be split
into several tokens, carry a leading space or not, change case, and sit inside a longer token
sequence. Decoding single tokens and testing substring membership (the public FTTP code) is wrong
for BPE; matching the name's ids tokenized alone misses in-context merges.

1. decode the answer's label ids cumulatively, so every token gets its character span in the
   decoded answer;
2. find every occurrence of every name and alias (case-insensitive, on word boundaries) in it;
3. a token is a concept token if its span overlaps an occurrence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


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
        spans.append((min(common, len(prev)), len(text)))
        prev = text
    return prev, spans


def name_occurrences(text: str, names: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of every case-insensitive, whole-word occurrence of any name in ``text``."""
    found = []
    for name in sorted(set(names), key=len, reverse=True):  # longest first: "Oskel Brin Tavo" before "Oskel Brin"
        pattern = re.compile(rf"(?<!\w){re.escape(name.strip())}(?!\w)", re.IGNORECASE)
        found += [m.span() for m in pattern.finditer(text)]
    return sorted(set(found))


def concept_token_mask(tokenizer, ids: Sequence[int], names: Sequence[str]) -> list[bool]:
    """For each id, whether its characters overlap an occurrence of one of ``names``."""
    text, spans = token_spans(tokenizer, ids)
    occ = name_occurrences(text, names)
    return [any(s < oe and os_ < e for os_, oe in occ) for s, e in spans]


def token_weights(tokenizer, labels: torch.Tensor, names: Sequence[str], alpha: float, beta: float,
                  record_ids: Sequence[str] | None = None, concept: str | None = None,
                  allow_missing: bool = False, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed weights for labelled tokens: ``-alpha`` on the concept's tokens, ``+beta`` on the others.

    labels: (batch, seq) with ``ignore_index`` on unscored positions (the final, image-expanded
    sequence). Returns ``(weights, is_concept)``, both (batch, seq); weights are 0 where unscored.
    A row whose answer does not name the concept raises :class:`ConceptNotInAnswer` naming the
    record and the concept, unless ``allow_missing`` (then all its tokens are natural: ``+beta``).
    """
    if not names or not any(n.strip() for n in names):
        raise ValueError("no concept name given: pass the concept's name and aliases")
    weights = torch.zeros(labels.shape, dtype=torch.float32)
    is_concept = torch.zeros(labels.shape, dtype=torch.bool)
    for row in range(labels.shape[0]):
        pos = (labels[row] != ignore_index).nonzero().squeeze(1)
        flags = concept_token_mask(tokenizer, labels[row, pos].tolist(), names)
        if not any(flags) and not allow_missing:
            rid = record_ids[row] if record_ids is not None else f"row {row}"
            answer = tokenizer.decode(labels[row, pos].tolist(), skip_special_tokens=True)
            raise ConceptNotInAnswer(
                f"record {rid}: the answer {answer!r} does not name the concept {concept or names[0]!r} "
                f"(looked for {list(names)}); fix the record, or allow all-natural answers explicitly "
                f"(allow_missing=True)")
        flag_t = torch.tensor(flags, dtype=torch.bool)
        is_concept[row, pos] = flag_t
        weights[row, pos] = torch.where(flag_t, torch.tensor(-alpha), torch.tensor(beta))
    return weights, is_concept
