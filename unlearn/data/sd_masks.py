"""Concept masks for Stable Diffusion training: from a file or an array to the latent grid.

The pipeline, in this order (one function each):

1. :func:`load_mask` -- a boolean (H, W) mask from an array, a PNG (> 127 after greyscale
   conversion, 16-bit scaled to 8 first; transparency ignored) or a labelme-style JSON of polygons/rectangles (rasterised with OpenCV, pixel
   centres at integer coordinates, edges included, as labelme's own ``shape_to_mask`` does);
2. :func:`resize_crop` -- the image and the mask go through the SAME resize (shorter side to the
   model's resolution) and centre crop, so they stay aligned on non-square images (the public FTTP
   code resized the mask without the crop);
3. :func:`dilate` -- optional OpenCV dilation (square kernel of ``kernel`` pixels, ``iterations``
   times) at the model's pixel resolution. Why before going to the latent grid: the kernel is then
   in model pixels whatever the source image's size, and a thin part of the concept (an arm, a
   logo's ring) that would vanish when pooled to the latent grid is widened first instead of lost;
4. :func:`to_latent_grid` -- average pooling by the VAE's factor (read from the pipeline, /8 for
   SD 1.x, /2 for the world SD), binarised at 0.5.

A mask that ends up empty or covering the whole latent grid is an error (an FTTP step on it is
plain GA or plain fine-tuning, which is never what a user asked for silently); ``allow_degenerate``
turns it into a whole-image concept mask (every pixel weighted -alpha) instead.
A method declares its :class:`MaskOptions` once (``SDMethod.mask_options``); tracing and evaluation pass theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from knowtrace.files import read_image, read_json


@dataclass(frozen=True)
class MaskOptions:
    """How a record's mask becomes its latent-grid concept mask."""

    dilate: int = 0  # OpenCV dilation kernel (pixels at the model's resolution); 0 = none
    iterations: int = 1
    allow_degenerate: bool = False  # an empty/full mask is a whole-image concept instead of an error

    def __post_init__(self):  # checked when a method is made, before anything is loaded
        if self.dilate < 0 or self.iterations < 0:
            raise ValueError(f"dilate={self.dilate}, dilate_iterations={self.iterations}: the dilation kernel (pixels) "
                             f"and its iterations must be >= 0 (0 = no dilation)")


def polygon_mask(shapes: list[dict], height: int, width: int, labels: tuple[str, ...] | None = None,
                 where: str = "labelme JSON") -> np.ndarray:
    """Rasterise labelme shapes (``polygon`` or ``rectangle``) into a bool (height, width) mask."""
    import cv2

    mask = np.zeros((height, width), dtype=np.uint8)
    used = 0
    for i, shape in enumerate(shapes):
        if not isinstance(shape, dict):
            raise ValueError(f"{where}: shape {i} must be an object with \"points\" and \"shape_type\"")
        if labels is not None and shape.get("label") not in labels:
            continue
        kind = shape.get("shape_type") or "polygon"
        pts = np.asarray(shape.get("points", []), dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise ValueError(f"{where}: shape {i} has no list of [x, y] points")
        if kind == "rectangle":
            if len(pts) != 2:
                raise ValueError(f"{where}: rectangle shape {i} needs 2 corner points, got {len(pts)}")
            (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
            pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        elif kind == "polygon":
            if len(pts) < 3:
                raise ValueError(f"{where}: polygon shape {i} needs at least 3 points, got {len(pts)}")
        else:
            raise ValueError(f"{where}: shape {i} is a {kind!r}; only polygon and rectangle shapes are supported")
        cv2.fillPoly(mask, [np.rint(pts).astype(np.int32)], 1)
        used += 1
    if used == 0:
        raise ValueError(f"{where}: no shape" + (f" with a label in {list(labels)}" if labels is not None else ""))
    return mask.astype(bool)


def load_mask(mask, where: str = "mask", labels: tuple[str, ...] | None = None) -> np.ndarray:
    """A bool (H, W) mask from an array (bool or numbers, > 0.5 is in), a PNG path or a labelme JSON path."""
    if isinstance(mask, (str, Path)):
        path = Path(mask)
        if path.suffix.lower() == ".json":
            data = read_json(path, f"{where}: labelme mask")
            try:
                h, w = int(data["imageHeight"]), int(data["imageWidth"])
                shapes = list(data.get("shapes", []))
            except (KeyError, TypeError, ValueError, AttributeError):
                raise ValueError(f"{where}: {path} is not a labelme JSON (needs imageHeight, imageWidth, shapes)") from None
            return polygon_mask(shapes, h, w, labels, where=f"{where} ({path})")
        return np.asarray(read_image(path, f"{where}: mask", mode="L")) > 127
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{where}: a mask is (H, W), got shape {arr.shape}")
    return arr.astype(bool) if arr.dtype == bool else arr > 0.5


def resize_crop(image: np.ndarray, mask: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize the shorter side to ``size`` and centre-crop to (size, size): image (bicubic) and mask
    (bilinear on {0, 1}, so a later threshold at 0.5 keeps its area) with the same geometry.

    image: (H, W, 3) uint8 -> (size, size, 3) uint8; mask: (H, W) bool -> (size, size) float in [0, 1].
    """
    h, w = image.shape[:2]
    if mask is not None and mask.shape != (h, w):
        raise ValueError(f"mask is {mask.shape[0]}x{mask.shape[1]} but its image is {h}x{w}: give a mask of the image's size")
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    if (h, w) != (nh, nw):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
    image = image[top:top + size, left:left + size]
    if mask is None:
        return image, None
    m = mask.astype(np.float32)
    if (h, w) != (nh, nw):
        m = np.asarray(Image.fromarray(m).resize((nw, nh), Image.BILINEAR))
    return image, np.clip(m[top:top + size, left:left + size], 0.0, 1.0)


def dilate(mask: np.ndarray, kernel: int = 0, iterations: int = 1) -> np.ndarray:
    """OpenCV dilation of a (H, W) mask (binarised at 0.5 first) with a square ``kernel``; 0 = none."""
    binary = np.asarray(mask) >= 0.5
    if kernel < 0 or iterations < 0:
        raise ValueError(f"dilation kernel and iterations must be >= 0, got {kernel}, {iterations}")
    if kernel <= 1 or iterations == 0:
        return binary
    import cv2

    return cv2.dilate(binary.astype(np.uint8), np.ones((kernel, kernel), np.uint8), iterations=iterations).astype(bool)


def to_latent_grid(mask: np.ndarray, factor: int) -> torch.Tensor:
    """(H, W) mask at the model's resolution -> (H/factor, W/factor) float {0, 1}: mean pool, threshold 0.5."""
    h, w = mask.shape
    if h % factor or w % factor:
        raise ValueError(f"mask {h}x{w} is not a multiple of the VAE factor {factor}")
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    return (F.avg_pool2d(m, factor)[0, 0] >= 0.5).float()


def latent_mask(mask, image: np.ndarray, size: int, factor: int, options: MaskOptions = MaskOptions(),
                where: str = "mask") -> torch.Tensor:
    """The whole pipeline for one record: (h, w) = (size/factor, size/factor) float {0, 1}."""
    _, m = resize_crop(image, load_mask(mask, where), size)
    grid = to_latent_grid(dilate(m, options.dilate, options.iterations), factor)
    share = float(grid.mean())
    if share in (0.0, 1.0):
        if not options.allow_degenerate:
            what = "empty" if share == 0.0 else "the whole image"
            raise ValueError(f"{where}: on the {grid.shape[0]}x{grid.shape[1]} latent grid the concept mask is {what}; "
                             f"FTTP would train plain {'fine-tuning' if share == 0.0 else 'GA'} on it. Fix the mask, or "
                             f"pass allow_degenerate=true to weight the whole image as the concept")
        grid = torch.ones_like(grid)
    return grid
