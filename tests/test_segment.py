"""unlearn.data.segment: SAM prompts (tiny random SamModel) and attention-peak automatic prompting
(tiny random StableDiffusionPipeline)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import SamConfig, SamModel
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

from unlearn.data.segment import SamSegmenter, generate_with_attention, peak_point
from unlearn.world.sd import SDConfig, build_pipeline, generate_images

SAM_SIZE = 64


def tiny_sam(seed=0):
    torch.manual_seed(seed)
    cfg = SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=SAM_SIZE, patch_size=8, window_size=4, global_attn_indexes=(1,),
                                      num_pos_feats=8, mlp_dim=64),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=SAM_SIZE, patch_size=8,
                                                     mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                                 iou_head_hidden_dim=16),
    )
    return SamModel(cfg).eval()


@pytest.fixture(scope="module")
def segmenter():
    return SamSegmenter(tiny_sam())


@pytest.fixture(scope="module")
def tiny_pipe():
    cfg = replace(SDConfig(), text_hidden=32, text_layers=1, vae_channels=(16, 32), unet_channels=(16, 32))
    pipe = build_pipeline(cfg)  # every part at its seeded random init: plumbing only
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(h=40, w=48, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_segment_shapes_determinism_and_best_mask(segmenter):
    img = image()
    masks, scores = segmenter.predict(img, points=[(10, 20)])
    assert masks.shape == (3, 40, 48) and masks.dtype == bool and scores.shape == (3,)
    segmenter.mask_threshold = -1e9  # random weights: make sure something is segmented
    try:
        mask, score = segmenter.segment(img, points=[(10, 20)], return_score=True)
    finally:
        segmenter.mask_threshold = 0.0
    assert mask.shape == (40, 48) and mask.dtype == bool and mask.all()
    assert score == pytest.approx(float(scores.max()))
    a, sa = segmenter.predict(img, points=[(10, 20)])
    b, sb = SamSegmenter(tiny_sam()).predict(img, points=[(10, 20)])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sa, sb)
    # the best of the three by predicted IoU is the one returned (at the default threshold)
    best = masks[int(np.argmax(scores))]
    if best.any():
        np.testing.assert_array_equal(segmenter.segment(img, points=[(10, 20)]), best)


def test_prompts_reach_the_model_in_its_coordinates(segmenter):
    seen = {}
    forward = segmenter.model.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return forward(*args, **kwargs)

    segmenter.model.forward = spy
    try:
        img = image(40, 48)  # resized to 53 x 64 (longest edge 64, rounded): x scales by 64/48, y by 53/40
        sx, sy = 64 / 48, 53 / 40
        segmenter.predict(img, points=[(12, 30), (3, 6)], labels=[1, 0])
        torch.testing.assert_close(seen["input_points"].float(),
                                   torch.tensor([[[[12 * sx, 30 * sy], [3 * sx, 6 * sy]]]]))
        assert seen["input_labels"].tolist() == [[[1, 0]]]
        seen.clear()
        segmenter.predict(img, box=(6, 3, 24, 30))
        torch.testing.assert_close(seen["input_boxes"].float(), torch.tensor([[[6 * sx, 3 * sy, 24 * sx, 30 * sy]]]))
        assert "input_points" not in seen
    finally:
        del segmenter.model.forward
    # different prompts, different predictions
    a, _ = segmenter.predict(img, points=[(2, 2)])
    b, _ = segmenter.predict(img, box=(20, 10, 47, 39))
    assert not np.array_equal(a, b)


def test_bad_prompts_and_empty_results_are_clear_errors(segmenter):
    img = image()
    with pytest.raises(ValueError, match="give SAM a prompt"):
        segmenter.segment(img)
    with pytest.raises(ValueError, match="outside"):
        segmenter.segment(img, points=[(48, 3)])
    with pytest.raises(ValueError, match="box"):
        segmenter.segment(img, box=(10, 10, 5, 30))
    with pytest.raises(ValueError, match="labels"):
        segmenter.segment(img, points=[(1, 1)], labels=[1, 1])
    with pytest.raises(ValueError, match="uint8"):
        segmenter.segment(img.astype(np.float32), points=[(1, 1)])
    segmenter.mask_threshold = 1e9
    try:
        with pytest.raises(ValueError, match="empty mask"):
            segmenter.segment(img, points=[(1, 1)])
    finally:
        segmenter.mask_threshold = 0.0


def test_peak_point_finds_a_synthetic_peak():
    y, x = np.mgrid[0:32, 0:40]
    bump = np.exp(-((x - 27) ** 2 + (y - 9) ** 2) / (2 * 3.0 ** 2))
    noisy = bump + 0.05 * np.random.default_rng(0).random(bump.shape)
    assert peak_point(noisy, sigma=1.0) == (27, 9)
    # one hot pixel beside a broad bump: the raw argmax takes the spike, light smoothing the bump
    spiky = bump.copy()
    spiky[30, 2] = 1.5
    assert peak_point(spiky, sigma=0) == (2, 30)
    assert peak_point(spiky, sigma=2.0) == (27, 9)
    with pytest.raises(ValueError, match="NaN"):
        peak_point(np.full((4, 4), np.nan))


def test_generate_with_attention_keeps_the_image_and_maps_the_concept(tiny_pipe):
    prompt, names = "a picture of Zuzu Pim", ["Zuzu Pim", "Pim"]
    img, att, tokens, grid = generate_with_attention(tiny_pipe, prompt, names, seed=3, num_inference_steps=2)
    ref = generate_images(tiny_pipe, [prompt], [3], num_inference_steps=2)[0]
    np.testing.assert_array_equal(img, ref)  # capture on: same pixels
    assert tokens == [4, 5]  # <start> a picture of zuzu pim
    assert att.shape == (32, 32) and grid == 8 and np.isfinite(att).all()
    assert 0 < att.max() <= 2.0  # mass on two tokens: at most 2 per position
    again = generate_with_attention(tiny_pipe, prompt, names, seed=3, num_inference_steps=2)
    np.testing.assert_array_equal(att, again[1])
    with pytest.raises(ValueError, match="none of the concept's names"):
        generate_with_attention(tiny_pipe, "a picture of Vorn", names, num_inference_steps=1)


def test_auto_segment_prompts_sam_at_the_attention_peak(tiny_pipe, segmenter):
    segmenter.mask_threshold = -1e9  # random SAM: a non-empty mask whatever it predicts
    try:
        out = segmenter.auto_segment(tiny_pipe, "a picture of Blip", ["Blip", "Blippo"], seed=1, num_inference_steps=2)
    finally:
        segmenter.mask_threshold = 0.0
    assert out.image.shape == (32, 32, 3) and out.mask.shape == (32, 32) and out.mask.dtype == bool
    assert out.point == peak_point(out.attention, sigma=0.5 * 32 / 8)  # half a cell of the 8x8 grid
    assert out.tokens == [4]
