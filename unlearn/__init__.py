"""unlearn: concept unlearning (GA, FTTP and the paper's baselines) for MLLMs and Stable Diffusion.

The default model and data everywhere is the built-in concept world (:mod:`unlearn.world`).
"""

__version__ = "0.1.0"
