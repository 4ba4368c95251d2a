"""unlearn: concept unlearning (GA, FTTP and the paper's baselines) for MLLMs and Stable Diffusion.

The default model and data everywhere is the built-in concept world (:mod:`unlearn.world`).

Layers, bottom to top; a layer imports only layers below it (checked by ``tests/test_layers.py``):

1. :mod:`.data`     records, names, masks, record files;
2. :mod:`.models`   adapters; loaders take local directories and hub ids;
3. :mod:`.methods`, :mod:`.eval`  side by side, neither imports the other;
4. :mod:`.world`    the built-in world as a *source* of models and records, used through the same
   interfaces as a user's checkpoint and record directory (``world.source.resolve_model("world", ...)``,
   ``world.records``); its quality gates use eval and models;
5. the run layer, the top-level modules (loop, runs, run_mllm, run_sd, tracing, sd_tracing, sweep,
   claims, demo, report, cli, world_export, token_count): it resolves ``"world"`` and loads the
   world's records before calling the layers below.
"""

__version__ = "0.1.0"
