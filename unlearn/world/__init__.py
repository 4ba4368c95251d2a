"""The built-in world of fictitious concepts: concepts, renderer, texts, tokenizer, tiny models.

Everything in the toolkit runs on this world by default, on a CPU, in minutes. Its modules: the
README's folder map.
"""

from .concepts import BY_KEY, CONCEPTS, KINDS, Concept, get_concept
from .render import Rendered, render_concept, render_scene, world_image

__all__ = ["BY_KEY", "CONCEPTS", "KINDS", "Concept", "get_concept", "Rendered", "render_concept",
           "render_scene", "world_image"]
