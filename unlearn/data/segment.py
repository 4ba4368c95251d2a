"""Concept masks from SAM (transformers' `SamModel` / `SamProcessor`), prompted by points, a box, or
automatically by the peak of the concept tokens' cross-attention while the image is generated.

Why transformers' SAM: Meta's ``segment-anything`` package imports torchvision, which cannot be
installed here; `SamModel` loads the same official checkpoints (e.g. ``facebook/sam-vit-base``
saved locally) and runs without it, with `SamImageProcessorPil` as its image processor.

Automatic prompting (no human click): generate the image while
:func:`knowtrace.sd_attention.capture_cross_attention` records the UNet's ``attn2`` probabilities
(conditional half under classifier-free guidance), take the concept tokens' map (attention mass on
the tokens of its name, summed over those tokens; mean over heads, layers at the chosen
resolutions, and denoising steps), upsample it to the image size, smooth it lightly (Gaussian, sigma
half an attention cell by default) and use its argmax as a foreground point prompt for SAM. SAM
returns three candidate masks for a point; the one with the highest predicted IoU is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class AutoSegment:
    """One automatically segmented generated image."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool
    point: tuple[int, int]  # (x, y) pixel of the attention peak (SAM's prompt)
    attention: np.ndarray  # (H, W) float32: the concept tokens' map, upsampled (before smoothing)
    score: float  # SAM's predicted IoU of the chosen mask
    tokens: list[int]  # positions of the concept's tokens in the text-encoder input


class SamSegmenter:
    """SAM prompted by points (x, y in image pixels) and/or a box (x0, y0, x1, y1)."""

    def __init__(self, model, processor=None, mask_threshold: float = 0.0):
        from transformers import SamImageProcessorPil, SamProcessor

        if processor is None:  # sized to the model (tiny test models use small images)
            s = model.config.vision_config.image_size
            processor = SamProcessor(SamImageProcessorPil(size={"longest_edge": s}, pad_size={"height": s, "width": s}))
        self.model = model.eval()
        self.processor = processor
        self.mask_threshold = mask_threshold

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> SamSegmenter:
        """A SAM checkpoint in a local directory (``SamModel`` weights + ``preprocessor_config.json``)."""
        from transformers import SamImageProcessorPil, SamModel, SamProcessor

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"SAM checkpoint directory {path} does not exist; save a SAM model there first "
                                    f"(SamModel.from_pretrained(...).save_pretrained({str(path)!r}) on a machine with the hub)")
        model = SamModel.from_pretrained(path, local_files_only=True)
        processor = SamProcessor(SamImageProcessorPil.from_pretrained(path, local_files_only=True)) \
            if (path / "preprocessor_config.json").exists() else None
        return cls(model, processor, **kwargs)

    @torch.no_grad()
    def predict(self, image: np.ndarray, points: Sequence[Sequence[float]] | None = None,
                labels: Sequence[int] | None = None, box: Sequence[float] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """SAM's candidate masks (K, H, W) bool and predicted IoUs (K,) for one image and one object.

        points: [(x, y), ...] in image pixels; labels: 1 foreground (default) / 0 background per point."""
        image = _check_image(image)
        h, w = image.shape[:2]
        if points is None and box is None:
            raise ValueError("give SAM a prompt: points=[(x, y), ...] and/or box=(x0, y0, x1, y1)")
        kwargs = {}
        if points is not None:
            pts = [[float(p[0]), float(p[1])] for p in points]
            if not pts or any(len(p) != 2 for p in points):
                raise ValueError(f"points must be a non-empty list of (x, y), got {points}")
            if any(not (0 <= x < w and 0 <= y < h) for x, y in pts):
                raise ValueError(f"points {pts} fall outside the {w}x{h} image (x in [0, {w}), y in [0, {h}))")
            lab = [1] * len(pts) if labels is None else [int(v) for v in labels]
            if len(lab) != len(pts) or any(v not in (0, 1) for v in lab):
                raise ValueError(f"labels must be 0/1, one per point; got {labels} for {len(pts)} points")
            kwargs["input_points"], kwargs["input_labels"] = [[pts]], [[lab]]
        if box is not None:
            x0, y0, x1, y1 = (float(v) for v in box)
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise ValueError(f"box {tuple(box)} must satisfy 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}")
            kwargs["input_boxes"] = [[[x0, y0, x1, y1]]]
        inputs = self.processor(images=image, return_tensors="pt", **kwargs)
        dev = self.model.device
        out = self.model(pixel_values=inputs.pixel_values.to(dev),
                         **{k: inputs[k].to(dev) for k in ("input_points", "input_labels", "input_boxes") if k in inputs},
                         multimask_output=True)
        masks = self.processor.post_process_masks(out.pred_masks.cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"],
                                                  mask_threshold=self.mask_threshold)[0]  # (1, K, H, W) bool
        return masks[0].numpy().astype(bool), out.iou_scores[0, 0].float().cpu().numpy()

    def segment(self, image: np.ndarray, points: Sequence[Sequence[float]] | None = None,
                box: Sequence[float] | None = None, labels: Sequence[int] | None = None,
                return_score: bool = False):
        """The (H, W) bool mask SAM rates best (highest predicted IoU) for the prompt; an empty
        mask is an error (SAM found no object there)."""
        masks, scores = self.predict(image, points, labels, box)
        best = int(np.argmax(scores))
        mask = masks[best]
        if not mask.any():
            raise ValueError(f"SAM returned an empty mask for points={points} box={box} (best predicted IoU "
                             f"{scores[best]:.3f}); give another point or a box around the concept")
        return (mask, float(scores[best])) if return_score else mask

    def auto_segment(self, pipe, prompt: str, names: Sequence[str], seed: int = 0, *,
                     resolutions: Sequence[tuple[int, int]] | None = None, calls: Sequence[int] | None = None,
                     sigma: float | None = None, guidance_scale: float = 4.0,
                     num_inference_steps: int = 25) -> AutoSegment:
        """Generate ``prompt`` with seed ``seed`` and segment the concept named by ``names`` (its name
        and aliases, one of which must be in the prompt) at its cross-attention peak."""
        image, attention, tokens, grid = generate_with_attention(
            pipe, prompt, names, seed, resolutions=resolutions, calls=calls, guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps)
        if sigma is None:  # half a cell of the coarsest attention grid used, in image pixels
            sigma = 0.5 * image.shape[0] / grid
        point = peak_point(attention, sigma)
        mask, score = self.segment(image, points=[point], return_score=True)
        return AutoSegment(image, mask, point, attention, score, tokens)


def _check_image(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def gaussian_smooth(a: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W) Gaussian blur (OpenCV, reflecting borders); sigma <= 0 returns a copy."""
    import cv2

    a = np.asarray(a, dtype=np.float32)
    if sigma <= 0:
        return a.copy()
    k = 2 * int(np.ceil(3 * sigma)) + 1
    return cv2.GaussianBlur(a, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def peak_point(attention: np.ndarray, sigma: float = 1.0) -> tuple[int, int]:
    """(x, y) of the maximum of the smoothed (H, W) map (first one in row-major order on ties)."""
    a = np.asarray(attention, dtype=np.float32)
    if a.ndim != 2 or not a.size:
        raise ValueError(f"attention map must be (H, W), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("attention map contains NaN or infinite values")
    y, x = np.unravel_index(int(np.argmax(gaussian_smooth(a, sigma))), a.shape)
    return int(x), int(y)


@torch.no_grad()
def generate_with_attention(pipe, prompt: str, names: Sequence[str], seed: int = 0, *,
                            resolutions: Sequence[tuple[int, int]] | None = None, calls: Sequence[int] | None = None,
                            guidance_scale: float = 4.0, num_inference_steps: int = 25
                            ) -> tuple[np.ndarray, np.ndarray, list[int], int]:
    """(image (H, W, 3) uint8, attention (H, W) float32, token positions, side of the coarsest
    attention grid used): one image generated with
    ``torch.Generator().manual_seed(seed)`` (as :func:`unlearn.models.sd.generate_images`), and the
    attention mass on the concept's tokens, mean over heads, layers (at ``resolutions``, default all)
    and denoising steps (``calls``, default all), upsampled bilinearly to the image size."""
    from knowtrace.sd_attention import capture_cross_attention, token_map

    from .token_weights import concept_token_positions

    tokens = concept_token_positions(pipe.tokenizer, prompt, list(names))
    cfg = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None  # the pipeline's own CFG test
    with capture_cross_attention(pipe.unet, cfg=cfg, mean_heads=True, tokens=tokens, to_cpu=True) as cap:
        out = pipe(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   generator=torch.Generator().manual_seed(int(seed)), output_type="np").images
    image = np.clip(np.rint(out[0] * 255), 0, 255).astype(np.uint8)  # (H, W, 3)
    maps = cap.maps(resolutions=resolutions, calls=calls, size=image.shape[:2])  # (1, len(tokens), H, W)
    attention = token_map(maps, list(range(len(tokens))))[0].float().numpy()
    used = [hw for hw in cap.by_resolution() if resolutions is None or hw in {tuple(r) for r in resolutions}]
    return image, attention, tokens, min(min(hw) for hw in used)
