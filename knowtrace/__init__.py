"""knowtrace: watch what training does to a model's knowledge, step by step.

Depends on nothing in ``unlearn``: any Hugging Face model or training loop can be traced with it.
Its modules: docs/knowtrace.md and the README's folder map.
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
    "answer_start": "hidden", "states_at": "hidden", "logit_lens": "lens", "fit_probe": "linear_probe",
    "probe_layers": "linear_probe", "token_stats": "mia", "mia_scores": "mia",
    "TopKSAE": "sae", "train_sae": "sae", "sae_quality": "sae", "save_sae": "sae", "load_sae": "sae",
    "capture_residuals": "sae_capture", "SAEOptions": "sae_capture",
    "AttributionOptions": "attribution", "ImageAttribution": "attribution",
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
