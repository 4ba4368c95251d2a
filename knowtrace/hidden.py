"""The language model's residual stream, every layer, at chosen positions of a teacher-forced answer.

One forward with ``output_hidden_states=True`` gives ``L + 1`` tensors (batch, seq, d): the embeddings (index
0, for an MLLM after the image features are placed) and the output of each decoder layer. Every
image-text-to-text family of transformers (LLaVA, LLaVA-NeXT, Idefics3, PaliGemma, Gemma3, Qwen2-VL /
2.5-VL, Mllama, whose cross-attention layers count among its decoder layers) returns the *language model's*
states in ``outputs.hidden_states`` (checked on the tiny models of tests/test_knowtrace_audit.py); the vision
tower's are not among them. As in transformers' decoders, the last entry is taken after the final norm:
:func:`knowtrace.lens.logit_lens` relies on it.
"""

from __future__ import annotations

import torch

from .logprobs import IGNORE_INDEX


def answer_start(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(n,) long: per row, the position whose next-token prediction is the row's first answer token
    (the first labelled index - 1: position t predicts token t + 1). labels: (n, T)."""
    scored = labels != ignore_index
    empty = ~scored.any(1)
    if empty.any():
        raise ValueError(f"rows {empty.nonzero().squeeze(1).tolist()} have no labelled token: no answer to locate "
                         f"(give records with an answer, encoded with labels)")
    first = scored.int().argmax(1)  # the first True of each row
    if (first == 0).any():
        raise ValueError("a row's first labelled token is at position 0: no position predicts it")
    return first - 1


def states_at(hidden_states, positions: torch.Tensor) -> torch.Tensor:
    """(L + 1, n, d) float32 on the host: each layer's state at ``positions[i]`` of row i.

    hidden_states: a tuple of L + 1 tensors (n, T, d), as a forward with output_hidden_states=True gives."""
    n = hidden_states[0].shape[0]
    if positions.shape != (n,):
        raise ValueError(f"positions {tuple(positions.shape)}: need one position per row ({n})")
    rows = torch.arange(n, device=hidden_states[0].device)
    positions = positions.to(hidden_states[0].device)
    return torch.stack([h[rows, positions] for h in hidden_states]).float().cpu()


def forward_hidden(model: torch.nn.Module, batch: dict):
    """(outputs, hidden_states) of one forward of ``batch`` with the language model's states of every layer.

    The number of states is checked against the (text) config's ``num_hidden_layers`` + 1, so a model whose
    outputs carry another module's states fails here, not as a wrong layer axis later."""
    outputs = model(**batch, output_hidden_states=True)
    hidden = getattr(outputs, "hidden_states", None)
    if hidden is None:
        raise ValueError(f"{type(model).__name__} returned no hidden_states with output_hidden_states=True; "
                         f"layer-wise measurements need a transformers model that returns them")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None and len(hidden) != layers + 1:
        raise ValueError(f"{type(model).__name__} returned {len(hidden)} hidden states, not num_hidden_layers + 1 = "
                         f"{layers + 1}: these are not its language model's layers")
    return outputs, hidden
