"""knowtrace: watch what training does to a model's knowledge, step by step.

Depends on nothing in ``unlearn``: any Hugging Face model or training loop can be traced with it.

* :mod:`.capture`    the attach / read / detach contract of every hook below;
* :mod:`.logprobs`   per-token log-probs from logits a step already computed (chunked, detached),
  and the forward hook that keeps them;
* :mod:`.knowledge`  Conceptual / Natural Knowledge K_C, K_N (FTTP paper Eq. 3-6);
* :mod:`.tracer`     the MLLM tracer: ``with knowtrace.trace(model, path, samples) as tr:``, a callback
  of the unlearn loop (``on_step_end``); :mod:`.hf` wraps it as an HF ``TrainerCallback``;
* :mod:`.mllm_attention`  answer-token x image-patch cross-attention through a registered attention
  function (SDPA kept for the output);
* :mod:`.answers`    traced answers and the per-step writer of a set of them;
* :mod:`.probe`      probe mode: a fixed probe set every k steps under inference mode;
* :mod:`.sd_tracer`  SD: per-latent-pixel noise errors, K_C / K_N (Eq. 4, 6) and concept masks;
* :mod:`.sd_attention`  SD ``attn2`` cross-attention capture;
* :mod:`.store` / :mod:`.schema`  the Zarr trace and what it holds.
"""

import importlib

__version__ = "0.1.0"

# Imported on first use (PEP 562), so that ``knowtrace summary`` / ``plot`` and ``import knowtrace``
# do not pay for torch and transformers unless tracing is used.
_EXPORTS = {
    "mllm_knowledge": "knowledge", "sd_knowledge": "knowledge",
    "answer_logprobs": "logprobs", "token_logprobs": "logprobs",
    "AttentionOptions": "mllm_attention",
    "ProbeSet": "probe", "open_probe_trace": "probe", "Capture": "capture",
    "SDSample": "sd_tracer", "SDTracer": "sd_tracer",
    "export_netcdf": "store", "open_trace": "store",
    "MLLMTracer": "tracer", "TracedSample": "answers", "trace": "tracer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'knowtrace' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
