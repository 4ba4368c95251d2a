"""Bridges unlearn's records to knowtrace: which answer tokens a traced sample has, which are the concept's."""

from __future__ import annotations

import contextlib

from knowtrace.logprobs import IGNORE_INDEX
from knowtrace.tracer import TracedSample

from .data.token_weights import concept_token_mask


def traced_samples(adapter, records, names, allow_missing: bool = True) -> list[TracedSample]:
    tok = adapter.tokenizer
    out = []
    for r in records:
        labels = adapter.encode([r])["labels"][0]
        ids = labels[labels != IGNORE_INDEX].tolist()
        out.append(TracedSample(r.id, ids, tok.convert_ids_to_tokens(ids), concept_token_mask(tok, ids, names),
                                r.concept or ""))
    return out


def start_tracer(adapter, path, forget, names, attrs: dict, probe_records=(), attention: bool = False,
                 precision=contextlib.nullcontext):
    """Enter a knowtrace tracer on ``adapter.model`` for a run (the caller exits it).

    The training steps' forwards give per-token log-probs and K_C / K_N of the forget answers. With
    ``attention``, the ``probe_records`` (e.g. the questions on the training image) run as probes
    before the first update (step -1) and after every step, recording their log-probs and the last
    decoder layer's head-mean cross-attention of answer tokens to image patches, in ``precision`` (a
    function returning the training steps' autocast context, :func:`unlearn.loop.precision`).
    """
    import knowtrace

    probes = opts = None
    if attention:
        if not probe_records:
            raise ValueError("attention tracing needs probe records (questions on an image)")
        opts = knowtrace.AttentionOptions(layers=(-1,), heads="mean", on_steps=False)
        probe_records = list(probe_records)
        probes = knowtrace.ProbeSet([adapter.encode(probe_records, train=True)],
                                    traced_samples(adapter, probe_records, names), every=1, precision=precision)
    capture = {"logprob": "answer tokens of the forget records in each step's batch"}
    if attention:
        capture["probe"] = "probe records before training (step -1) and after every step: logprob, xattn (last layer, head mean)"
    tracer = knowtrace.trace(adapter.model, path, traced_samples(adapter, forget, names), attention=opts,
                             probes=probes, attrs={**attrs, "capture": capture}).__enter__()
    if tracer.probe is not None and tracer.probe.trace.store.last_step is None:  # (a resumed run's trace has it)
        tracer.probe.run(-1)  # the starting model, before the first update
    return tracer
