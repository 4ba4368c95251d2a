"""Bridges unlearn's records to knowtrace: which answer tokens a traced sample has, which are the concept's."""

from __future__ import annotations

from knowtrace.tracer import TracedSample

from .data.token_weights import concept_token_mask


def traced_samples(adapter, records, names, allow_missing: bool = True) -> list[TracedSample]:
    tok = adapter.tokenizer
    out = []
    for r in records:
        labels = adapter.encode([r])["labels"][0]
        ids = labels[labels != -100].tolist()
        out.append(TracedSample(r.id, ids, tok.convert_ids_to_tokens(ids), concept_token_mask(tok, ids, names),
                                r.concept or ""))
    return out
