"""knowtrace: watch what training does to a model's knowledge, step by step.

Per-token log-probs, conceptual/natural knowledge (K_C, K_N) and cross-attention maps recorded into
xarray datasets. Depends on nothing in ``unlearn``. (The tracer itself arrives with its own issue;
this package holds only its version for now.)
"""

__version__ = "0.1.0"
