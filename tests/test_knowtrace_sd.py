"""SD tracer: per-latent-pixel errors, K_C / K_N (Eq. 4, 6) by hand, masks, the optional UNet hook."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from knowtrace import SDSample, SDTracer, open_trace


def _samples(n=3, h=8, w=8):
    rng = np.random.default_rng(0)
    return [SDSample(f"img{i}", rng.random((h, w)) < 0.3, "vorn") for i in range(n)]


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                cross_attention_dim=16, norm_num_groups=16, attention_head_dim=2)


def test_record_errors_and_knowledge_by_hand(tmp_path):
    samples = _samples()
    err = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1))
    with SDTracer(tmp_path / "sd.zarr", samples, lam=2.0) as tracer:
        tracer.record_errors(0, err, ["img2", "img0"], {"loss_forget": 0.5})
        tracer.record_errors(1, err[:1], ["img1"])
        assert list(open_trace(tmp_path / "sd.zarr").step.values) == [0]  # step 1 buffered (flush_seconds=5)
    ds = open_trace(tmp_path / "sd.zarr")
    assert ds.eps_err.dims == ("step", "sample", "y", "x") and list(ds.sample_id.values) == ["img0", "img1", "img2"]
    np.testing.assert_array_equal(ds.mask.values, np.stack([s.mask for s in samples]))
    np.testing.assert_allclose(ds.eps_err.values[0, 2], err[0].numpy())
    np.testing.assert_allclose(ds.eps_err.values[0, 0], err[1].numpy())
    assert np.isnan(ds.eps_err.values[0, 1]).all() and np.isnan(ds.K_C.values[0, 1])
    for row, s in ((0, samples[2]), (1, samples[0])):
        e = err[row].numpy()
        kc, kn = np.exp(-2.0 * e[s.mask].mean()), np.exp(-2.0 * e[~s.mask].mean())
        i = int(s.id[-1])
        np.testing.assert_allclose([ds.K_C.values[0, i], ds.K_N.values[0, i]], [kc, kn], rtol=1e-5)
    assert ds.loss_forget.values[0] == 0.5 and np.isnan(ds.loss_forget.values[1])


def test_unet_hook_gives_the_errors_of_the_step_forward(tmp_path):
    unet = _tiny_unet()
    samples = _samples(2)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    cond, noise = torch.randn(2, 5, 16), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = (unet(z, t, cond).sample - noise).pow(2).mean(1)
    with SDTracer(tmp_path / "sd.zarr", samples, unet=unet) as tracer:
        pred = unet(z, t, encoder_hidden_states=cond).sample  # the training step's own forward
        (pred - noise).pow(2).mean().backward()
        tracer.record_target(0, noise, ["img0", "img1"])
        with pytest.raises(RuntimeError, match="no forward since the last record"):
            tracer.record_target(1, noise, ["img0", "img1"])
    assert not unet._forward_hooks
    ds = open_trace(tmp_path / "sd.zarr")
    np.testing.assert_allclose(ds.eps_err.values[0], expected.numpy(), atol=1e-6)


def test_bad_input_is_a_clear_error(tmp_path):
    samples = _samples(2)
    with pytest.raises(ValueError, match="same latent grid"):
        SDTracer(tmp_path / "a.zarr", [samples[0], SDSample("x", np.zeros((4, 4), bool))])
    tracer = SDTracer(tmp_path / "b.zarr", samples)
    with pytest.raises(ValueError, match="err must be"):
        tracer.record_errors(0, torch.zeros(2, 4, 8, 8), ["img0", "img1"])
    with pytest.raises(KeyError, match="not traced"):
        tracer.record_errors(0, torch.zeros(1, 8, 8), ["nope"])
    with pytest.raises(RuntimeError, match="needs the UNet hook"):
        tracer.record_target(0, torch.zeros(1, 4, 8, 8), ["img0"])
    assert not (tmp_path / "b.zarr").exists()  # nothing half-written
    unet = _tiny_unet()
    with pytest.raises(ValueError, match="boom"):
        with SDTracer(tmp_path / "c.zarr", samples, unet=unet):
            raise ValueError("boom")
    assert not unet._forward_hooks


def test_xattn_needs_prompt_tokens_and_the_masks_grid(tmp_path):
    import numpy as np
    import pytest
    import torch

    from knowtrace import SDSample, SDTracer

    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    bare = SDTracer(tmp_path / "a.zarr", [SDSample("s", mask)])
    with pytest.raises(ValueError, match="needs the samples' prompt tokens"):
        bare.record_errors(0, torch.rand(1, 4, 4), ["s"], xattn=torch.rand(1, 1, 3, 4, 4))
    tokened = SDTracer(tmp_path / "b.zarr", [SDSample("s", mask, "c", [1, 2, 3], ["<s>", "c", "</s>"], [0, 1, 0])])
    with pytest.raises(ValueError, match="on the masks' grid"):
        tokened.record_errors(0, torch.rand(1, 4, 4), ["s"], xattn=torch.rand(1, 1, 3, 8, 8))
    with pytest.raises(ValueError, match="same length"):
        SDTracer(tmp_path / "c.zarr", [SDSample("s", mask, "c", [1, 2], ["<s>"], [0, 1])])
