"""knowtrace.sd_attention: cross-attention capture on a tiny random diffusers UNet."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from knowtrace.sd_attention import (RecordingProcessor, capture_cross_attention, group_by_resolution, mean_maps,
                                    spatial, token_map, upsample)

TOKENS, HIDDEN = 7, 16


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    # cross-attention on both levels: 8x8 and 4x4 grids (and the mid block at 4x4)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
        cross_attention_dim=HIDDEN, norm_num_groups=8, attention_head_dim=(1, 2),
    ).eval()


def inputs(batch=2, h=8, w=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, h, w, generator=g), torch.tensor([10] * batch),
            torch.randn(batch, TOKENS, HIDDEN, generator=g))


def attn2_names(unet):
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


def test_output_is_unchanged_and_originals_restored():
    unet = tiny_unet()
    before = unet.attn_processors
    z, t, cond = inputs()
    with torch.no_grad():
        ref = unet(z, t, encoder_hidden_states=cond).sample
        with capture_cross_attention(unet) as cap:
            assert all(isinstance(unet.attn_processors[n], RecordingProcessor) for n in attn2_names(unet))
            assert not any(isinstance(p, RecordingProcessor) for n, p in unet.attn_processors.items()
                           if n.endswith("attn1.processor"))
            out = unet(z, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    # one record per attn2 layer; shapes (batch, heads, h*w, tokens)
    assert len(cap.layers) == len(attn2_names(unet)) == 7  # down 1+1, mid 1, up 2+2
    grids = {r.hw for r in cap.all()}
    assert grids == {(8, 8), (4, 4)}
    for r in cap.all():
        heads = 1 if r.layer.startswith(("down_blocks.0", "up_blocks.1")) else 2
        assert r.probs.shape == (2, heads, r.hw[0] * r.hw[1], TOKENS) and not r.probs.requires_grad
        torch.testing.assert_close(r.probs.sum(-1), torch.ones_like(r.probs[..., 0]))


def test_probs_equal_a_manual_softmax():
    unet = tiny_unet()
    z, t, cond = inputs()
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    attn = unet.get_submodule(name)
    seen = {}

    def keep_input(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    hook = attn.register_forward_pre_hook(keep_input, with_kwargs=True)
    with torch.no_grad(), capture_cross_attention(unet, layers=[name]) as cap:
        unet(z, t, encoder_hidden_states=cond)
    hook.remove()
    x = seen["x"]  # (B, h*w, C): the attention's input
    with torch.no_grad():
        q = attn.to_q(x).view(2, -1, attn.heads, 32 // attn.heads).transpose(1, 2)
        k = attn.to_k(cond).view(2, -1, attn.heads, 32 // attn.heads).transpose(1, 2)
        manual = torch.softmax(q @ k.transpose(-1, -2) * (32 // attn.heads) ** -0.5, dim=-1)
    assert cap.layers == [name] and len(cap.records[name]) == 1
    torch.testing.assert_close(cap.records[name][0].probs, manual, rtol=0, atol=1e-5)


def test_same_output_with_the_classic_processor_too():
    unet = tiny_unet()
    unet.set_attn_processor(AttnProcessor())
    z, t, cond = inputs()
    with torch.no_grad():
        ref = unet(z, t, encoder_hidden_states=cond).sample
        with capture_cross_attention(unet):
            out = unet(z, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())


def test_restored_after_an_exception_and_no_nesting():
    unet = tiny_unet()
    before = unet.attn_processors
    with pytest.raises(ZeroDivisionError):
        with capture_cross_attention(unet):
            1 / 0
    assert all(unet.attn_processors[k] is before[k] for k in before)
    with capture_cross_attention(unet):
        with pytest.raises(RuntimeError, match="already attached"):
            with capture_cross_attention(unet):
                pass
        assert any(isinstance(p, RecordingProcessor) for p in unet.attn_processors.values())  # outer still on
    assert all(unet.attn_processors[k] is before[k] for k in before)
    assert all(isinstance(p, AttnProcessor2_0) for p in before.values())


def test_keep_grad_reaches_the_attn2_weights():
    unet = tiny_unet()
    z, t, cond = inputs()
    name = "mid_block.attentions.0.transformer_blocks.0.attn2"
    with capture_cross_attention(unet, keep_grad=True) as cap:
        unet(z, t, encoder_hidden_states=cond)
    loss = sum(p[..., 2:4].sum(-1).mean() for p in cap.probs())
    assert loss.requires_grad
    loss.backward()
    attn = unet.get_submodule(name)
    assert attn.to_k.weight.grad is not None and attn.to_k.weight.grad.abs().sum() > 0
    assert attn.to_q.weight.grad.abs().sum() > 0
    # detached by default, even with gradients enabled
    with capture_cross_attention(unet) as cap:
        unet(z, t, encoder_hidden_states=cond)
    assert not any(p.requires_grad for p in cap.probs())


def test_cfg_keeps_the_conditional_half_and_filters():
    unet = tiny_unet()
    z, t, cond = inputs(batch=4)
    with torch.no_grad():
        with capture_cross_attention(unet) as full:
            unet(z, t, encoder_hidden_states=cond)
        with capture_cross_attention(unet, cfg=True, mean_heads=True, tokens=[1, 3],
                                     layers=lambda n: n.startswith("up_blocks")) as half:
            unet(z, t, encoder_hidden_states=cond)
    assert half.layers == [n for n in full.layers if n.startswith("up_blocks")]
    for n in half.layers:
        a, b = full.records[n][0].probs, half.records[n][0].probs
        assert b.shape == (2, 1, a.shape[2], 2)
        torch.testing.assert_close(b, a[2:].mean(1, keepdim=True)[..., [1, 3]])
    with pytest.raises(ValueError, match="even size"):
        with torch.no_grad(), capture_cross_attention(unet, cfg=True):
            unet(*inputs(batch=3)[:2], encoder_hidden_states=inputs(batch=3)[2])
    with pytest.raises(ValueError, match="not cross-attention layers"):
        capture_cross_attention(unet, layers=["down_blocks.0.attentions.0.transformer_blocks.0.attn1"])


def test_non_square_grids_and_reductions():
    unet = tiny_unet()
    z, t, cond = inputs(batch=1, h=8, w=16)
    with torch.no_grad(), capture_cross_attention(unet) as cap:
        unet(z, t, encoder_hidden_states=cond)
        unet(z, t, encoder_hidden_states=cond)
    groups = group_by_resolution(cap.all())
    assert list(groups) == [(8, 16), (4, 8)]
    assert [r.call for r in cap.records[cap.layers[0]]] == [0, 1]
    m = cap.maps()  # mean over heads, layers, calls at the largest grid
    assert m.shape == (1, TOKENS, 8, 16)
    torch.testing.assert_close(m.sum(1), torch.ones(1, 8, 16))  # still a distribution over tokens
    only = cap.maps(resolutions=[(8, 16)], calls=[0])
    manual = torch.stack([spatial(r.probs, r.hw) for r in groups[(8, 16)] if r.call == 0]).mean(0)
    torch.testing.assert_close(only, manual)
    # a token's map, upsampled to an image size
    tm = token_map(only, [2, 5], size=(64, 128))
    assert tm.shape == (1, 64, 128)
    torch.testing.assert_close(token_map(only, [2, 5]), only[:, 2] + only[:, 5])
    with pytest.raises(ValueError, match="no cross-attention record"):
        mean_maps(cap.all(), resolutions=[(3, 3)])


def test_spatial_layout_is_row_major():
    # a synthetic record whose mass sits at query position (row 1, col 3) of a 2x4 grid
    probs = torch.zeros(1, 1, 8, 2)
    probs[0, 0, :, 0] = 1.0
    probs[0, 0, 1 * 4 + 3] = torch.tensor([0.0, 1.0])
    m = spatial(probs, (2, 4))
    assert m[0, 1].nonzero().tolist() == [[1, 3]]
    big = upsample(m[:, 1], (20, 40))
    assert divmod(int(big[0].argmax()), 40) in {(r, c) for r in range(10, 20) for c in range(30, 40)}


def test_text_padding_mask_is_honoured():
    unet = tiny_unet()
    z, t, cond = inputs()
    keep = torch.ones(2, TOKENS)
    keep[:, 5:] = 0  # the last two text tokens are padding
    with torch.no_grad():
        ref = unet(z, t, encoder_hidden_states=cond, encoder_attention_mask=keep).sample
        with capture_cross_attention(unet) as cap:
            out = unet(z, t, encoder_hidden_states=cond, encoder_attention_mask=keep).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for p in cap.probs():
        assert p[..., 5:].max() < 1e-6
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p[..., 0]))


def test_capture_through_a_peft_wrapper_records_and_restores():
    """A LoRA-wrapped UNet (peft; what `unlearn sd lora=true` trains) holds the attn2 layers under a
    prefix: the capture finds them, records the same maps, and puts the processors back."""
    from peft import LoraConfig, get_peft_model

    unet = tiny_unet()
    z, t, cond = inputs()
    with torch.no_grad(), capture_cross_attention(unet, mean_heads=True) as plain:
        unet(z, t, encoder_hidden_states=cond)
    wrapped = get_peft_model(unet, LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=True))
    before = unet.attn_processors
    with torch.no_grad(), capture_cross_attention(wrapped, mean_heads=True) as cap:
        wrapped(z, t, encoder_hidden_states=cond)
    assert cap.layers == plain.layers
    for a, b in zip(cap.all(), plain.all()):  # LoRA B starts at zero: the same model
        torch.testing.assert_close(a.probs, b.probs)
    assert all(unet.attn_processors[k] is before[k] for k in before)
