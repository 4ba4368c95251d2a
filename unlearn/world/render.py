"""Deterministic, seeded rendering of world concepts with exact per-pixel masks.

Shapes are evaluated analytically at pixel centres (no anti-aliasing), so a concept's mask is
exactly the set of pixels its drawing wrote, after occlusion by concepts drawn later. Pixel noise
is added after drawing and changes colours, never masks.

Non-style concepts are objects placed with a random position, size, rotation and flip on a random
pale background with faint clutter. Art-style concepts change the whole image: the content is
quantised into the style's palette and overlaid with its pattern; their mask is the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .concepts import BY_KEY, COLOURS, CONCEPTS, Concept

RENDER_VERSION = 1  # bump whenever a change makes the same seed draw other pixels (invalidates caches)


@dataclass
class Rendered:
    image: np.ndarray  # (H, W, 3) uint8
    masks: dict[str, np.ndarray]  # concept key -> (H, W) bool, exact pixels of that concept
    concepts: tuple[str, ...]  # keys, in drawing order

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)


# ----------------------------------------------------------------------------- primitives
# All primitives take local coordinates u, v (arrays, object units: the object spans about
# [-0.5, 0.5]^2, v pointing down) and return a boolean array.


def _circle(u, v, cx, cy, r):
    return (u - cx) ** 2 + (v - cy) ** 2 <= r * r


def _rect(u, v, x0, y0, x1, y1):
    return (u >= x0) & (u <= x1) & (v >= y0) & (v <= y1)


def _polygon(u, v, pts):
    """Even-odd rule, vectorised over pixels; pts is a list of (x, y) vertices."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % n]
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def _regular(n, r, cy=0.0, rot=0.0):
    a = rot + np.arange(n) * 2 * np.pi / n - np.pi / 2
    return list(zip(r * np.cos(a), cy + r * np.sin(a)))


def _star(r_out, r_in, cy=0.0):
    radii_angles = [(r_out if i % 2 == 0 else r_in, -np.pi / 2 + i * np.pi / 5) for i in range(10)]
    return [(r * np.cos(a), cy + r * np.sin(a)) for r, a in radii_angles]


# ----------------------------------------------------------------------------- concept parts
# Each returns a list of (boolean region, colour name); later parts are drawn over earlier ones.


def _person_parts(look, u, v):
    parts = [
        (_rect(u, v, -0.34, -0.08, -0.22, 0.30) | _rect(u, v, 0.22, -0.08, 0.34, 0.30), look["skin"]),  # arms
        (_polygon(u, v, [(-0.2, -0.12), (0.2, -0.12), (0.25, 0.46), (-0.25, 0.46)]), look["shirt"]),  # body
        (_circle(u, v, 0.0, -0.28, 0.16), look["skin"]),  # head
        (_circle(u, v, 0.0, -0.28, 0.17) & (v <= -0.33), look["hair"]),  # hair cap
    ]
    acc = look["accessory"]
    if acc == "hat":
        parts.append((_rect(u, v, -0.15, -0.52, 0.15, -0.40) | _rect(u, v, -0.25, -0.42, 0.25, -0.37), "gray"))
    elif acc == "glasses":
        parts.append((_rect(u, v, -0.14, -0.31, 0.14, -0.25), "black"))
    elif acc == "scarf":
        parts.append((_rect(u, v, -0.19, -0.14, 0.19, -0.06) | _rect(u, v, 0.06, -0.08, 0.15, 0.12), "white"))
    return parts


def _cartoon_body(body, u, v):
    if body == "circle":
        return _circle(u, v, 0.0, 0.05, 0.34)
    if body == "square":
        return _rect(u, v, -0.3, -0.25, 0.3, 0.35)
    if body == "triangle":
        return _polygon(u, v, [(0.0, -0.32), (0.38, 0.38), (-0.38, 0.38)])
    if body == "star":
        return _polygon(u, v, _star(0.44, 0.2, cy=0.05))
    if body == "pear":
        return _circle(u, v, 0.0, -0.12, 0.2) | _circle(u, v, 0.0, 0.16, 0.3)
    raise ValueError(f"unknown cartoon body {body!r}")


def _cartoon_parts(look, u, v):
    return [
        (_circle(u, v, -0.2, -0.34, 0.09) | _circle(u, v, 0.2, -0.34, 0.09), look["accent"]),  # ears
        (_rect(u, v, -0.25, 0.36, -0.08, 0.46) | _rect(u, v, 0.08, 0.36, 0.25, 0.46), look["accent"]),  # feet
        (_cartoon_body(look["body"], u, v), look["colour"]),
        (_circle(u, v, -0.11, 0.0, 0.08) | _circle(u, v, 0.11, 0.0, 0.08), "white"),  # eyes
        (_circle(u, v, -0.11, 0.01, 0.04) | _circle(u, v, 0.11, 0.01, 0.04), "black"),  # pupils
    ]


def _logo_parts(look, u, v):
    e, outer, inner = look["emblem"], look["outer"], look["inner"]
    if e == "hexagon":
        return [(_polygon(u, v, _regular(6, 0.46, rot=np.pi / 6)), outer), (_circle(u, v, 0, 0, 0.2), inner)]
    if e == "diamond":
        return [(_polygon(u, v, _regular(4, 0.48)), outer), (_polygon(u, v, _regular(4, 0.22)), inner)]
    if e == "ring":
        ring = _circle(u, v, 0, 0, 0.46) & ~_circle(u, v, 0, 0, 0.28)
        return [(ring, outer), (_circle(u, v, 0, 0, 0.13), inner)]
    if e == "cross":
        cross = _rect(u, v, -0.16, -0.46, 0.16, 0.46) | _rect(u, v, -0.46, -0.16, 0.46, 0.16)
        return [(cross, outer), (_rect(u, v, -0.1, -0.1, 0.1, 0.1), inner)]
    if e == "chevron":
        chev = _polygon(u, v, [(-0.46, -0.3), (0.0, 0.12), (0.46, -0.3), (0.46, 0.02), (0.0, 0.44), (-0.46, 0.02)])
        return [(chev, outer), (_rect(u, v, -0.12, -0.46, 0.12, -0.22), inner)]
    if e == "triangle":
        return [(_polygon(u, v, _regular(3, 0.5, cy=0.08)), outer),
                (_polygon(u, v, _regular(3, 0.2, cy=0.12, rot=np.pi)), inner)]
    raise ValueError(f"unknown logo emblem {e!r}")


_PARTS = {"person": _person_parts, "cartoon": _cartoon_parts, "logo": _logo_parts}
_MAX_ROTATION = {"person": 0.35, "cartoon": 0.45, "logo": 0.15}  # radians


# ----------------------------------------------------------------------------- scene pieces


def _grid(size):
    c = np.arange(size, dtype=np.float64) + 0.5  # pixel centres
    return np.meshgrid(c, c)  # x, y: (H, W)


def _background(rng, size) -> np.ndarray:
    """Pale gradient with faint clutter; float (H, W, 3) in 0..255."""
    x, y = _grid(size)
    c0, c1 = rng.uniform(175, 245, 3), rng.uniform(175, 245, 3)
    a = rng.uniform(0, 2 * np.pi)
    t = ((np.cos(a) * x + np.sin(a) * y) / size + 1) / 2
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    for _ in range(rng.integers(0, 3)):
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.08, 0.25, 2) * size
        blob = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        img[blob] = img[blob] * 0.5 + rng.uniform(150, 230, 3) * 0.5
    return img


def _place(rng, size, kind, region=None):
    """Random pose: local coordinates (u, v) of every pixel for one object."""
    x, y = _grid(size)
    x0, y0, x1, y1 = region if region is not None else (0, 0, size, size)
    extent = min(x1 - x0, y1 - y0)
    s = rng.uniform(0.6, 0.92) * extent  # object size in pixels
    cx = rng.uniform(x0 + s / 2, x1 - s / 2) if x1 - x0 > s else (x0 + x1) / 2
    cy = rng.uniform(y0 + s / 2, y1 - s / 2) if y1 - y0 > s else (y0 + y1) / 2
    th = rng.uniform(-_MAX_ROTATION[kind], _MAX_ROTATION[kind])
    flip = -1.0 if (kind != "logo" and rng.random() < 0.5) else 1.0
    dx, dy = x - cx, y - cy
    u = flip * (np.cos(th) * dx + np.sin(th) * dy) / s
    v = (-np.sin(th) * dx + np.cos(th) * dy) / s
    return u, v


def _draw_object(img, labels, concept: Concept, label: int, u, v):
    for region, colour in _PARTS[concept.kind](concept.look, u, v):
        img[region] = COLOURS[colour]
        labels[region] = label


def _pattern(rng, look, size) -> np.ndarray:
    x, y = _grid(size)
    period = max(4.0, look["period"] * size / 64)
    ph = rng.uniform(0, period)
    a = np.pi / 4 + rng.uniform(-0.2, 0.2)
    p = look["pattern"]
    d = np.cos(a) * x + np.sin(a) * y + ph
    if p == "stripes":
        return (d % period) < period / 2
    if p == "hatch":
        d2 = np.cos(a) * x - np.sin(a) * y + ph
        return ((d % period) < period / 4) | ((d2 % period) < period / 4)
    if p == "checker":
        return (np.floor((x + ph) / period) + np.floor((y + ph) / period)) % 2 == 0
    if p == "dots":
        return ((x + ph) % period - period / 2) ** 2 + ((y + ph) % period - period / 2) ** 2 <= (period / 3.2) ** 2
    if p == "waves":
        return ((y + ph + period / 2 * np.sin(2 * np.pi * x / (2 * period))) % period) < period / 2
    if p == "rings":
        cx, cy = rng.uniform(0, size, 2)
        return (np.hypot(x - cx, y - cy) % period) < period / 2
    raise ValueError(f"unknown style pattern {p!r}")


def _stylise(rng, img, concept: Concept) -> np.ndarray:
    """Quantise luminance into the style's palette (dark to light), then overlay its pattern."""
    palette = np.array([COLOURS[c] for c in concept.look["palette"]], dtype=np.float64)
    order = np.argsort(palette.mean(axis=1))
    lum = img.mean(axis=2)
    lo, hi = np.percentile(lum, 2), np.percentile(lum, 98)
    level = np.clip(((lum - lo) / max(hi - lo, 1.0) * len(palette)).astype(int), 0, len(palette) - 1)
    out = palette[order][level]
    pat = _pattern(rng, concept.look, img.shape[0])
    out[pat] = out[pat] * 0.55
    return out


def _style_content(rng, size) -> np.ndarray:
    """Generic content for a style image: background plus a few grey shapes of varied lightness."""
    img = _background(rng, size)
    x, y = _grid(size)
    for _ in range(rng.integers(2, 5)):
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.12, 0.35, 2) * size
        if rng.random() < 0.5:
            region = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        else:
            region = (abs(x - cx) <= rx) & (abs(y - cy) <= ry)
        img[region] = rng.uniform(0, 255)
    return img


def _finish(rng, img, noise: bool) -> np.ndarray:
    if noise:
        img = img * rng.uniform(0.9, 1.1) + rng.normal(0, rng.uniform(0, 8), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- public API


def render_scene(keys, size: int = 64, seed=0, style: str | None = None, noise: bool = True) -> Rendered:
    """Render 1-3 non-style concepts side by side (optionally under an art style).

    ``seed`` is anything ``numpy.random.default_rng`` accepts (an int or a list of ints); the same
    arguments always give the same pixels. ``noise=False`` gives the clean drawing (same masks).
    """
    keys = list(keys)
    concepts = [BY_KEY[k] for k in keys]
    if any(c.kind == "style" for c in concepts):
        raise ValueError("art styles are not objects: pass them as style=..., not among the scene's concepts")
    if not 1 <= len(concepts) <= 3:
        raise ValueError(f"a scene holds 1 to 3 concepts, got {len(concepts)}")
    rng = np.random.default_rng(seed)
    img = _background(rng, size)
    labels = np.zeros((size, size), dtype=np.int16)
    n = len(concepts)
    # one vertical band per concept so that objects overlap little; masks stay exact either way
    order = rng.permutation(n)
    for slot, i in enumerate(order):
        region = (slot * size / n, 0, (slot + 1) * size / n, size) if n > 1 else None
        u, v = _place(rng, size, concepts[i].kind, region)
        _draw_object(img, labels, concepts[i], i + 1, u, v)
    masks = {c.key: labels == i + 1 for i, c in enumerate(concepts)}
    if style is not None:
        sc = BY_KEY[style]
        if sc.kind != "style":
            raise ValueError(f"{style!r} is a {sc.kind}, not an art style")
        img = _stylise(rng, img, sc)
        masks[sc.key] = np.ones((size, size), dtype=bool)
        keys.append(sc.key)
    return Rendered(_finish(rng, img, noise), masks, tuple(keys))


def render_concept(key: str, size: int = 64, seed=0, noise: bool = True) -> Rendered:
    """One image of one concept: an object on a background, or generic content in an art style."""
    concept = BY_KEY[key]
    if concept.kind != "style":
        return render_scene([key], size=size, seed=seed, noise=noise)
    rng = np.random.default_rng(seed)
    img = _stylise(rng, _style_content(rng, size), concept)
    return Rendered(_finish(rng, img, noise), {key: np.ones((size, size), dtype=bool)}, (key,))


SPLITS = {"pretrain": 0, "unlearn": 1, "test": 2, "classifier": 3, "scene": 4, "audit": 5}  # audit: unlearn.audit.world_data
CONCEPT_INDEX = {c.key: i for i, c in enumerate(CONCEPTS)}


def split_seed(world_seed: int, split: str, key: str, index: int) -> list[int]:
    """Seed of image ``index`` of concept ``key`` in ``split``: disjoint streams per split."""
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; splits are {sorted(SPLITS)}")
    return [world_seed, SPLITS[split], CONCEPT_INDEX[key], index]


def world_image(key: str, split: str, index: int, size: int = 64, world_seed: int = 0) -> Rendered:
    return render_concept(key, size=size, seed=split_seed(world_seed, split, key, index))


def render_background(size: int = 64, seed=0, noise: bool = True) -> Rendered:
    """A background with its clutter and no concept (the world classifier's "none" class)."""
    rng = np.random.default_rng(seed)
    return Rendered(_finish(rng, _background(rng, size), noise), {}, ())
