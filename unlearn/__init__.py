"""unlearn: concept unlearning (GA, FTTP and the paper's baselines) for MLLMs and Stable Diffusion.

The default model and data everywhere is the built-in concept world (:mod:`unlearn.world`).

Layers, bottom to top, each importing only those below it: data < models < methods | eval < world
(a *source* of models and records) < the run layer (docs/architecture.md; checked by tests/test_layers.py).
"""

__version__ = "0.1.0"
