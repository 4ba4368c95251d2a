"""The built-in world of fictitious concepts: concepts, renderer, texts, tokenizer, tiny models.

Everything in the toolkit runs on this world by default, on a CPU, in minutes:

* :mod:`.concepts`  the 24 concepts (4 kinds) and the name rule;
* :mod:`.render`    seeded images with exact per-pixel masks, scenes, art styles;
* :mod:`.texts`     question/answer templates and splits;
* :mod:`.tokenizer` the world tokenizer and the world MLLM's LlavaProcessor;
* :mod:`.mllm`, :mod:`.sd`, :mod:`.classifier`  the trained world models and their gates;
* :mod:`.cache`, :mod:`.build`  the verified on-disk cache and ``unlearn world build/check``.
* :mod:`.source`, :mod:`.records`  the world as a source: the ``"world"`` model and classifier specs
  resolved to what a user would give, and the world's records in the toolkit's record types.
"""

from .concepts import BY_KEY, CONCEPTS, KINDS, Concept, get_concept
from .render import Rendered, render_concept, render_scene, world_image

__all__ = ["BY_KEY", "CONCEPTS", "KINDS", "Concept", "get_concept", "Rendered", "render_concept",
           "render_scene", "world_image"]
