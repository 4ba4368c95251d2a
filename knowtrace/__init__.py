"""knowtrace: watch what training does to a model's knowledge, step by step.

Depends on nothing in ``unlearn``: any Hugging Face model or training loop can be traced with it.

* :mod:`.logprobs`   per-token log-probs from logits a step already computed (chunked, detached);
* :mod:`.knowledge`  Conceptual / Natural Knowledge K_C, K_N (FTTP paper Eq. 3-6).

The tracer (hooks, cross-attention capture, Zarr storage, Plotly views) builds on these.
"""

from .knowledge import mllm_knowledge, sd_knowledge
from .logprobs import answer_logprobs, token_logprobs

__version__ = "0.1.0"
__all__ = ["answer_logprobs", "mllm_knowledge", "sd_knowledge", "token_logprobs"]
