"""knowtrace: watch what training does to a model's knowledge, step by step.

Depends on nothing in ``unlearn``: any Hugging Face model or training loop can be traced with it.

* :mod:`.logprobs`   per-token log-probs from logits a step already computed (chunked, detached);
* :mod:`.knowledge`  Conceptual / Natural Knowledge K_C, K_N (FTTP paper Eq. 3-6);
* :mod:`.tracer`     the MLLM tracer: ``with knowtrace.trace(model, path, samples) as tr:``, a callback
  of the unlearn loop (``on_step_end``); :mod:`.hf` wraps it as an HF ``TrainerCallback``;
* :mod:`.mllm_attention`  answer-token x image-patch cross-attention through a registered attention
  function (SDPA kept for the output);
* :mod:`.probe`      probe mode: a fixed probe set every k steps under inference mode;
* :mod:`.sd_tracer`  SD: per-latent-pixel noise errors, K_C / K_N (Eq. 4, 6) and concept masks;
* :mod:`.store` / :mod:`.schema`  the Zarr trace and what it holds.
"""

from .knowledge import mllm_knowledge, sd_knowledge
from .logprobs import answer_logprobs, token_logprobs
from .mllm_attention import AttentionOptions
from .probe import ProbeSet, open_probe_trace
from .sd_tracer import SDSample, SDTracer
from .store import export_netcdf, open_trace
from .tracer import MLLMTracer, TracedSample, trace

__version__ = "0.1.0"
__all__ = ["AttentionOptions", "MLLMTracer", "ProbeSet", "SDSample", "SDTracer", "TracedSample", "answer_logprobs",
           "export_netcdf", "mllm_knowledge", "open_probe_trace", "open_trace", "sd_knowledge", "token_logprobs",
           "trace"]
