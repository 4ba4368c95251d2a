"""Logit lens: read each layer's residual stream through the model's own final norm and output head.

``logits_l = head(norm(h_l))`` for the embeddings and every decoder layer but the last; the last state is
already normed (transformers' decoders return it after the final norm, :mod:`knowtrace.hidden`), so it goes
through the head alone and the last layer's lens equals the model's own logits. Output transforms a family
applies after the head are applied as its forward does, read from ``model.config``:
``final_logit_softcapping`` (Gemma 2 / Gemma 3 causal LMs: ``cap * tanh(logits / cap)``; changes
probabilities, not ranks), ``logit_scale`` (Cohere: times) and ``logits_scaling`` (Granite: divided by).
Gemma3ForConditionalGeneration applies no soft-capping in its forward (its top-level config has none), and
neither does the lens then.
"""

from __future__ import annotations

import torch

NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f")  # the decoder's final norm, by family


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The language model's final norm: an attribute of ``model.get_decoder()`` named as in NORM_NAMES."""
    getter = getattr(model, "get_decoder", None)
    decoder = getter() if callable(getter) else None
    if decoder is None:
        raise ValueError(f"{type(model).__name__} has no get_decoder(): the logit lens needs the language model to "
                         f"find its final norm")
    for name in NORM_NAMES:
        norm = getattr(decoder, name, None)
        if isinstance(norm, torch.nn.Module):
            return norm
    raise ValueError(f"{type(decoder).__name__} (the decoder of {type(model).__name__}) has none of {NORM_NAMES}: "
                     f"cannot find the final norm the logit lens applies before the output head")


def output_transform(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """What the family's forward does to ``head(h)`` before returning logits (see the module docstring)."""
    config = model.config
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        logits = logits / scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def logit_lens(model: torch.nn.Module, states: torch.Tensor,
               token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prob, rank), each (L + 1, n) float32 / long on the host: the probability of ``token_ids[i]`` and its
    rank (0 = the top token; ties with the target count in its favour) when layer l's state of row i is read
    as logits.

    states: (L + 1, n, d), e.g. :func:`knowtrace.hidden.states_at`; token_ids: (n,). One layer at a time is
    turned into (n, vocab) logits."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None): "
                         f"the logit lens needs the output head")
    norm = final_norm(model)
    if token_ids.shape != states.shape[1:2]:
        raise ValueError(f"token_ids {tuple(token_ids.shape)}: need one token per row of states {tuple(states.shape)}")
    weight = head.weight
    layers = states.shape[0]
    probs, ranks = [], []
    rows = torch.arange(states.shape[1], device=weight.device)
    token_ids = token_ids.to(weight.device)
    for layer in range(layers):
        h = states[layer].to(weight.device, weight.dtype)  # (n, d)
        if layer < layers - 1:  # the last state already went through the final norm
            h = norm(h)
        logits = output_transform(model, head(h)).float()  # (n, vocab), on the head's device
        target = logits[rows, token_ids]
        probs.append((target - logits.logsumexp(1)).exp().cpu())
        ranks.append((logits > target[:, None]).sum(1).cpu())
    return torch.stack(probs), torch.stack(ranks)
