"""SD training side on tiny random-weight StableDiffusionPipelines (real diffusers/transformers classes
built from configs): registry per modality, the mask pipeline, the adapter, each method's loss or
gradient property, and the loop's part selection."""

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_world_sd import TINY_SD
from unlearn.data.sd_masks import MaskOptions, dilate, latent_mask, load_mask, resize_crop, to_latent_grid
from unlearn.data.sd_records import SDRecord, check_forget_records, load_image
from unlearn.loop import TrainConfig, run_loop
from unlearn.methods import METHODS, SD_METHODS, StepContext, get_method
from unlearn.methods.sd_esd import esd_target, partial_sample
from unlearn.data.token_weights import concept_token_positions
from unlearn.models.sd import SDAdapter
from unlearn.world.concepts import BY_KEY
from unlearn.world.records import world_sd_data
from unlearn.world.sd import build_pipeline

VORN = BY_KEY["vorn"]


def tiny_adapter(**cfg) -> SDAdapter:
    return SDAdapter(build_pipeline(replace(TINY_SD, **cfg)), name="tiny")


@pytest.fixture(scope="module")
def data():
    return world_sd_data("vorn", 2, 32, n_retain=1, n_surrogate=2)


def ctx_for(adapter, seed=0, reference=None, retain=None):
    ctx = StepContext(adapter, VORN.key, VORN.names, generator=torch.Generator().manual_seed(seed))
    if reference is not None:
        ctx.run_reference = lambda fn: torch.no_grad()(fn)(reference)
    if retain is not None:
        ctx.next_retain = lambda: retain[:2]
    return ctx


def trained(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- registry


def test_registries_per_modality():
    assert {"ga", "fttp"} <= set(METHODS) and {"ga", "fttp"} <= set(SD_METHODS)
    assert type(get_method("fttp")).__module__ == "unlearn.methods.fttp"
    sd = get_method("fttp", modality="sd", alpha="0.7")
    assert type(sd).__module__ == "unlearn.methods.sd_fttp" and sd.alpha == 0.7 and sd.beta == 0.5
    assert get_method("fttp_dilated", modality="sd").dilate > 1
    with pytest.raises(KeyError) as e:
        get_method("siu", modality="sd")
    assert "esd_x" in str(e.value) and "salun" in str(e.value) and "siu" not in str(e.value).split(";")[1]
    with pytest.raises(KeyError, match="modalit"):
        get_method("ga", modality="audio")


# ----------------------------------------------------------------------------- masks


def test_labelme_polygon_and_rectangle_give_exact_masks(tmp_path):
    shapes = [{"label": "vorn", "shape_type": "polygon", "points": [[2, 3], [6, 3], [6, 8], [2, 8]]},
              {"label": "other", "shape_type": "rectangle", "points": [[10, 1], [12, 2]]}]
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"imageHeight": 16, "imageWidth": 16, "shapes": shapes}))
    expected = np.zeros((16, 16), bool)
    expected[3:9, 2:7] = True  # pixel centres on integer coordinates, edges included
    both = expected.copy()
    both[1:3, 10:13] = True
    np.testing.assert_array_equal(load_mask(path), both)
    np.testing.assert_array_equal(load_mask(path, labels=("vorn",)), expected)
    png = tmp_path / "m.png"
    Image.fromarray(expected.astype(np.uint8) * 255).save(png)
    np.testing.assert_array_equal(load_mask(png), expected)
    path.write_text(json.dumps({"imageHeight": 16, "imageWidth": 16, "shapes": [{"shape_type": "circle", "points": [[1, 1], [2, 2]]}]}))
    with pytest.raises(ValueError, match="circle"):
        load_mask(path)
    with pytest.raises(FileNotFoundError):
        load_mask(tmp_path / "none.png")


def test_image_and_mask_share_resize_and_centre_crop():
    # a 64 x 128 image whose red square is exactly the mask; after resize to 32 the crop keeps columns 16..48
    image = np.full((64, 128, 3), 255, np.uint8)
    mask = np.zeros((64, 128), bool)
    mask[16:48, 72:104] = True
    image[mask] = (255, 0, 0)
    img, m = resize_crop(image, mask, 32)
    assert img.shape == (32, 32, 3) and m.shape == (32, 32)
    expected = np.zeros((32, 32), bool)
    expected[8:24, 20:32] = True  # (72..104)/2 - 16 = 20..36, clipped by the crop at 32
    np.testing.assert_array_equal(m >= 0.5, expected)
    red = (img[..., 0] > 200) & (img[..., 1] < 60)
    assert (red == expected).mean() > 0.95  # the image moved with the mask
    with pytest.raises(ValueError, match="mask is 64x64 but its image is 64x128"):
        resize_crop(image, mask[:, :64], 32)


def test_dilation_then_latent_grid():
    m = np.zeros((16, 16), bool)
    m[8, 8] = True
    assert dilate(m, 3, 1).sum() == 9 and dilate(m, 3, 2).sum() == 25 and dilate(m, 0).sum() == 1
    # one pixel alone vanishes on the /2 latent grid (1/4 < 0.5); dilated first it survives
    assert to_latent_grid(m, 2).sum() == 0
    assert to_latent_grid(dilate(m, 3, 1), 2).sum() >= 1
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="empty"):
        latent_mask(m, image, 16, 2)
    with pytest.raises(ValueError, match="whole image"):
        latent_mask(np.ones((16, 16), bool), image, 16, 2)
    assert latent_mask(m, image, 16, 2, MaskOptions(allow_degenerate=True)).eq(1).all()
    assert latent_mask(m, image, 16, 2, MaskOptions(dilate=3)).sum() >= 1


def test_record_errors(tmp_path, data):
    forget, _ = data
    with pytest.raises(FileNotFoundError, match="r1"):
        load_image(SDRecord("r1", "a picture of Vorn", tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="does not name the concept"):
        check_forget_records([replace(forget[0], prompt="a picture of Blip")], VORN.names)
    with pytest.raises(ValueError, match="needs a concept mask"):
        check_forget_records([replace(forget[0], mask=None)], VORN.names, need_masks=True)
    check_forget_records(forget, VORN.names, need_masks=True)


# ----------------------------------------------------------------------------- adapter


def test_adapter_reads_the_vae_factor():
    a = tiny_adapter(vae_channels=(16, 16, 32))  # three VAE levels: /4
    assert a.factor == 4 and a.resolution == a.pipe.unet.config.sample_size * 4
    forget, _ = world_sd_data("vorn", 2, a.resolution, n_retain=0, n_surrogate=0)
    b = a.encode(forget, masks=MaskOptions())
    h = a.resolution // 4
    assert b.latents.shape == (2, 4, h, h) and b.mask.shape == (2, h, h) and len(b.cond) == 2
    e = a.pixel_error(b, torch.Generator().manual_seed(0))
    assert e.shape == (2, h, h) and (e >= 0).all()


# ----------------------------------------------------------------------------- methods


def test_fttp_gradient_is_the_weighted_combination(data):
    forget, _ = data
    a = tiny_adapter()
    params = [p for p in a.model.parameters()]
    fttp = get_method("fttp", modality="sd")
    out = fttp.loss(ctx_for(a, 3), forget)
    loss, logs = out.loss, out.logs
    g = torch.autograd.grad(loss, params, allow_unused=True)
    # by hand, same noise: the two groups' means over all pixels
    m = a.masks(forget)
    e = a.pixel_error(a.encode(forget), torch.Generator().manual_seed(3))
    ga = torch.autograd.grad((m * e).mean(), params, retain_graph=True, allow_unused=True)
    gn = torch.autograd.grad(((1 - m) * e).mean(), params, allow_unused=True)
    for x, c, n in zip(g, ga, gn):
        if x is not None:
            torch.testing.assert_close(x, -0.8 * c + 0.5 * n, rtol=1e-4, atol=1e-7)
    assert 0 < logs["concept_share"] < 1 and logs["err_concept"] > 0
    dil = get_method("fttp_dilated", modality="sd")
    assert dil.loss(ctx_for(a, 3), forget).logs["concept_share"] > logs["concept_share"]
    ga_loss = get_method("ga", modality="sd").loss(ctx_for(a, 3), forget).loss
    torch.testing.assert_close(ga_loss, -e.mean(), rtol=1e-5, atol=1e-7)


def test_esd_target_and_parts(data):
    forget, _ = data
    a = tiny_adapter()
    frozen = copy.deepcopy(a.model).requires_grad_(False)
    with torch.no_grad():  # make the trained model differ from the reference
        for p in a.model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    esd = get_method("esd_x", modality="sd", eta=2.0)
    loss = esd.loss(ctx_for(a, 5, reference=frozen), forget).loss
    b = a.encode(forget)
    _, t, z = a.noise(b.latents, torch.Generator().manual_seed(5))
    with torch.no_grad():
        ec = frozen(z, t, encoder_hidden_states=b.cond.text).sample
        e0 = frozen(z, t, encoder_hidden_states=a.text_embeddings([""] * 2).text).sample
    target = e0 - 2.0 * (ec - e0)
    torch.testing.assert_close(esd_target(ec, e0, 2.0), target)
    torch.testing.assert_close(loss, ((a.model(z, t, encoder_hidden_states=b.cond.text).sample - target) ** 2).mean())


def test_esd_partial_sampling_is_the_pipelines_ddim_sampler(data):
    """k = all steps gives the pipeline's own finished latents from the same noise; k = 0 the noise."""
    forget, _ = data
    a = tiny_adapter()
    esd = get_method("esd_x", modality="sd", latents="sampled", sample_steps=4, sample_guidance=3.0)
    scheduler = esd.ddim(a)
    cond, empty = a.text_embeddings([forget[0].prompt]), a.text_embeddings([""])
    full = partial_sample(a, a.model, scheduler, cond, empty, 4, 3.0, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = a.pipe(prompt_embeds=cond.text, negative_prompt_embeds=empty.text, num_inference_steps=4, guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(3), output_type="latent").images
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-4)
    start = partial_sample(a, a.model, scheduler, cond, empty, 0, 3.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(start, torch.randn(start.shape, generator=torch.Generator().manual_seed(3)))
    assert not torch.allclose(start, full)


def test_esd_sampled_latents_train_on_the_timestep_they_reached(data, monkeypatch):
    forget, _ = data
    a = tiny_adapter()
    frozen = copy.deepcopy(a.model).requires_grad_(False)
    esd = get_method("esd_x", modality="sd", latents="sampled", sample_steps=5)
    seen = []
    original = a.predict
    monkeypatch.setattr(a, "predict", lambda z, t, c, model=None: seen.append(t.clone()) or original(z, t, c, model))
    loss = esd.loss(ctx_for(a, 2, reference=frozen), forget).loss
    assert torch.isfinite(loss)
    k = int(torch.randint(0, 5, (1,), generator=torch.Generator().manual_seed(2)))
    assert k == 3  # the step's generator draws k first: 3 sampling steps here
    reached = esd.ddim(a).timesteps[k]
    # the sampling run visits timesteps[:k]; the reference and the trained model then see timesteps[k]
    assert [int(t[0]) for t in seen[:k]] == [int(t) for t in esd.ddim(a).timesteps[:k]]
    assert all(torch.all(t == reached) for t in seen[k:]) and len(seen) == k + 2
    with pytest.raises(ValueError, match="latents must be one of forget, sampled"):
        get_method("esd_u", modality="sd", latents="noise")


@pytest.mark.parametrize("method,lora", [("esd_x", False), ("esd_u", False), ("fmn", False), ("esd_x", True)])
def test_methods_train_only_their_parts(method, lora, data):
    forget, _ = data
    a = tiny_adapter()
    before = trained(a.model)
    run_loop(a, get_method(method, modality="sd"), forget, [], TrainConfig(steps=2, lr=1e-2, lora=lora, batch_size=2),
             VORN.key, VORN.names, progress=False)
    unet = a.pipe.unet  # LoRA is injected into the base UNet, in place
    if lora:
        lora_names = [n for n, _ in unet.named_parameters() if "lora_" in n]
        assert lora_names and all(".attn2." in n for n in lora_names)
        return
    after = trained(unet)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed
    xattn = {n for n in before if ".attn2." in n}
    if method == "esd_u":
        assert not changed & xattn
    elif method == "fmn":  # the whole UNet, as its authors train it; nothing past the last attn2 moves
        assert changed - xattn and {"conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"} <= changed
        assert not {n for n in changed if n.startswith(("conv_out.", "conv_norm_out."))}
    else:
        assert changed <= xattn


def test_fmn_only_xattn_trains_all_of_attn2(data):
    """Cross-attention only (their only_optimize_ca): every attn2 parameter is trained, and the value /
    output projections do move: later layers' queries depend on earlier layers' values."""
    forget, _ = data
    a = tiny_adapter()
    before = trained(a.model)
    run_loop(a, get_method("fmn", modality="sd", only_xattn=True), forget, [],
             TrainConfig(steps=2, lr=1e-2, lora=False, batch_size=2), VORN.key, VORN.names, progress=False)
    assert {n for n, p in a.model.named_parameters() if p.requires_grad} == {n for n in before if ".attn2." in n}
    changed = {n for n, p in a.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed <= {n for n in before if ".attn2." in n}
    assert any(".attn2.to_v." in n for n in changed) and any(".attn2.to_out." in n for n in changed)


def compvis_noxattn_keeps(name: str) -> bool:
    """ESD's ``noxattn`` filter (CompVis train-esd.py) on a diffusers UNet name: the three diffusers
    names that differ from CompVis' at the top level are renamed first, then their test is applied."""
    for ours, theirs in (("time_embedding.", "time_embed."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")):
        if name.startswith(ours):
            name = theirs + name[len(ours):]
    return not (name.startswith("out.") or "attn2" in name or "time_embed" in name)


def test_esd_u_parts_are_the_authors_on_the_sd1_layout():
    """SD 1.x's UNet layout (no weights: meta device): full fine-tuning trains the parameters ESD's
    noxattn filter keeps; LoRA adapts the Linear / Conv2d modules among them (215 of 282)."""
    import re

    from diffusers import UNet2DConditionModel

    from unlearn.models.sd import LORA_PARTS, PARAM_PARTS

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
    params = {n for n, _ in unet.named_parameters()}
    assert {n for n in params if re.search(PARAM_PARTS["non_xattn"], n)} == {n for n in params if compvis_noxattn_keeps(n)}
    assert "time_embedding.linear_1.weight" in params and not compvis_noxattn_keeps("time_embedding.linear_1.weight")
    linear_conv = [n for n, m in unet.named_modules() if type(m).__name__ in ("Linear", "Conv2d")]
    theirs = {n for n in linear_conv if compvis_noxattn_keeps(n + ".")}
    ours = {n for n, _ in unet.named_modules() if re.fullmatch(LORA_PARTS["non_xattn"], n)}  # peft's test
    assert len(linear_conv) == 282 and len(theirs) == 215 and ours == theirs


@pytest.mark.parametrize("lora", [False, True])
def test_esd_u_trains_the_authors_parameters(lora, data):
    forget, _ = data
    a = tiny_adapter()
    unet = a.pipe.unet
    modules = {n for n, m in unet.named_modules() if type(m).__name__ in ("Linear", "Conv2d") and compvis_noxattn_keeps(n + ".")}
    params = {n for n, _ in unet.named_parameters() if compvis_noxattn_keeps(n)}
    run_loop(a, get_method("esd_u", modality="sd"), forget, [], TrainConfig(steps=1, lr=1e-2, lora=lora, batch_size=2),
             VORN.key, VORN.names, progress=False)
    if lora:  # the modules that got LoRA weights (injected into the base UNet in place)
        assert {n.split(".lora_A.")[0] for n, _ in unet.named_parameters() if ".lora_A." in n} == modules
        assert {"conv_in", "down_blocks.0.downsamplers.0.conv"} <= modules and any(".conv_shortcut" in n for n in modules)
    else:
        assert {n for n, p in unet.named_parameters() if p.requires_grad} == params
        assert "conv_norm_out.weight" not in params and "down_blocks.1.attentions.0.norm.weight" in params


def test_salun_updates_salient_weights_only(data):
    forget, retain = data
    a = tiny_adapter()
    before = trained(a.model)
    salun = get_method("salun", modality="sd", fraction=0.2)
    run_loop(a, salun, forget, retain, TrainConfig(steps=3, lr=1e-2, lora=False, batch_size=2), VORN.key, VORN.names,
             progress=False)
    assert abs(salun.salient_share - 0.2) < 0.01
    moved_salient = 0
    for (name, p), (_, m) in zip(a.model.named_parameters(), salun._masks):
        delta = (p.detach() - before[name]).abs()
        assert torch.all(delta[m == 0] == 0), name
        moved_salient += int((delta[m == 1] > 0).sum())
    assert moved_salient > 0


def test_selective_amnesia_penalty_and_replay(data):
    forget, retain = data
    a = tiny_adapter()
    a.model.train()
    sa = get_method("sa", modality="sd", replay_per_prompt=1, replay_inference_steps=2, fisher_samples=3,
                    fisher_timesteps=10)
    ctx = ctx_for(a, 0, retain=retain)
    sa.setup(ctx, forget, retain)
    assert len(sa._replay) == len({r.prompt for r in retain if r.concept is not None})
    assert sa.penalty().item() == 0.0 and all((f >= 0).all() for f in sa._fisher)
    assert any(f.sum() > 0 for f in sa._fisher)
    p, f = next((p, f) for p, f in zip(sa._params, sa._fisher) if f.sum() > 0)
    with torch.no_grad():
        p.add_(0.5)
    torch.testing.assert_close(sa.penalty(), (f * 0.25).sum())
    out = sa.loss(ctx, forget)
    loss, logs = out.loss, out.logs
    assert torch.isfinite(loss) and logs["ewc"] > 0
    with pytest.raises(ValueError, match="surrogate"):
        sa.setup(ctx, forget, [r for r in retain if r.concept is not None])


def test_selective_amnesia_fisher_and_penalty_are_the_authors(data):
    """The Fisher of selective-amnesia's ddpm_fim.py, computed here independently on the records that
    setup chose: per image, the gradient of the diffusion loss summed over all 1000 timesteps (each its
    own noise; the documented draw order: one (T, C, h, w) draw per image from the seed the method
    documents), squared, averaged over images; then lambda * sum F (theta - theta*)^2, value and gradient,
    with the authors' lambda 50."""
    forget, retain = data
    a = tiny_adapter()
    sa = get_method("sa", modality="sd", replay_per_prompt=1, replay_inference_steps=2, fisher_samples=2)
    assert sa.ewc == 50.0 and sa.fisher_timesteps == 0
    ctx = ctx_for(a, 4, retain=retain)
    sa.setup(ctx, forget, retain)
    params = list(a.model.parameters())
    assert len(sa._params) == len(params)
    records = [sa._replay[0], sa._replay[len(sa._replay) // 2]]
    gen = torch.Generator().manual_seed(4 + 2)
    ac = a.noise_scheduler.alphas_cumprod  # (1000,)
    expected = [torch.zeros_like(p) for p in params]
    for r in records:
        z = a.latents([r])  # (1, C, h, w)
        c = a.text_embeddings([r.prompt]).text
        eps = torch.randn((1000, *z.shape[1:]), generator=gen)
        grad = [torch.zeros_like(p) for p in params]
        for t in torch.arange(1000).split(200):
            z_t = ac[t].sqrt()[:, None, None, None] * z + (1 - ac[t]).sqrt()[:, None, None, None] * eps[t]
            pred = a.model(z_t, t, encoder_hidden_states=c.expand(len(t), -1, -1)).sample
            summed = sum(((eps[t][i] - pred[i]) ** 2).mean() for i in range(len(t)))  # sum over these t
            grad = [g + d for g, d in zip(grad, torch.autograd.grad(summed, params, allow_unused=True))]
        expected = [e + g ** 2 / 2 for e, g in zip(expected, grad)]
    # atol: parameters whose gradients cancel to float noise (biases right before a norm: ~1e-14)
    top = max(float(e.max()) for e in expected)
    for f, e in zip(sa._fisher, expected):
        torch.testing.assert_close(f, e, rtol=1e-3, atol=1e-7 * top)
    assert sum(float(f.sum()) for f in sa._fisher) > 0
    # the penalty: value and gradient after moving every parameter
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    a.model.zero_grad(set_to_none=True)
    penalty = sa.penalty()
    penalty.backward()
    delta = [p.detach() - s for p, s in zip(params, sa._star)]
    torch.testing.assert_close(penalty, sum((f * d ** 2).sum() for f, d in zip(expected, delta)), rtol=1e-3, atol=0)
    for p, f, d in zip(params, expected, delta):
        torch.testing.assert_close(p.grad, 2 * f * d, rtol=1e-3, atol=1e-9 * top)
    out = sa.loss(ctx, forget)
    torch.testing.assert_close(out.loss - out.logs["loss_forget"] - out.logs["loss_retain"], 50 * out.logs["ewc"])


def test_selective_amnesia_cheaper_fisher_estimates_the_sum():
    from unlearn.methods.sd_sa import fisher_timesteps

    g = torch.Generator().manual_seed(0)
    assert torch.equal(fisher_timesteps(1000, 0, g), torch.arange(1000))
    ts = fisher_timesteps(1000, 4, g)  # one in each quarter
    assert [int(t) // 250 for t in ts] == [0, 1, 2, 3]
    assert torch.equal(fisher_timesteps(10, 20, g), torch.arange(10))
    with pytest.raises(ValueError, match="fisher_timesteps"):
        get_method("sa", modality="sd", fisher_timesteps=-1)


def test_fmn_finds_the_concept_tokens_and_lowers_their_attention(data):
    forget, _ = data
    a = tiny_adapter()
    tok = a.pipe.tokenizer
    assert concept_token_positions(tok, "a picture of Quilla Dennet", BY_KEY["quilla"].names) == [4, 5]
    assert concept_token_positions(tok, "a picture of the logo of Korvex", BY_KEY["korvex"].names) == [7]
    with pytest.raises(ValueError, match="none of the concept's names"):
        concept_token_positions(tok, "a picture of Blip", VORN.names)
    fmn = get_method("fmn", modality="sd")
    first = fmn.loss(ctx_for(a, 1), forget).loss
    run_loop(a, fmn, forget, [], TrainConfig(steps=5, lr=1e-2, lora=False, batch_size=2), VORN.key, VORN.names,
             progress=False)
    after = fmn.loss(ctx_for(a, 1), forget).loss
    assert after.item() < first.item()
    assert all(type(p).__name__ != "RecordingProcessor" for p in a.pipe.unet.attn_processors.values())


class AuthorsAttention:
    """Forget-Me-Not's cross-attention processor and controller (train_attn.py), transcribed for one
    record: attend as diffusers' classic processor does, keep the probabilities at ``positions``."""

    def __init__(self, kept: list, positions: list[int]):
        self.kept, self.positions = kept, positions

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (heads, hw, d)
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)  # (heads, hw, L)
        self.kept.append(probs[:, :, self.positions].reshape(-1))
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))


@pytest.mark.parametrize("eot", ["pooler", "all", "none"])
def test_fmn_loss_is_the_authors_attention_norm(eot, data):
    """The norm of every attn2 layer's concept-token (and end-token) probabilities concatenated, per
    record (their batch of one), averaged over records: value and gradient on every UNet parameter."""
    forget, _ = data
    a = tiny_adapter()
    fmn = get_method("fmn", modality="sd", eot=eot)
    assert get_method("fmn", modality="sd").eot == "pooler" and not fmn.only_xattn  # their defaults
    loss = fmn.loss(ctx_for(a, 3), forget).loss
    mine = torch.autograd.grad(loss, list(a.model.parameters()), allow_unused=True)

    theirs = copy.deepcopy(a.model)
    b = a.encode(forget)
    _, t, z = a.noise(b.latents, torch.Generator().manual_seed(3))
    tok = a.pipe.tokenizer
    norms = []
    for i, r in enumerate(forget):
        ids = tok(r.prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        positions = set()
        for name in VORN.names:  # the name's token ids wherever they occur in the prompt's ids
            c = tok(name, add_special_tokens=False).input_ids
            positions |= {j + m for j in range(len(ids)) if ids[j:j + len(c)] == c for m in range(len(c))}
        ends = [j for j, x in enumerate(ids) if x == tok.eos_token_id]
        positions |= set({"pooler": ends[:1], "all": ends, "none": []}[eot])
        assert len(positions) >= {"none": 1, "pooler": 2, "all": 12}[eot]
        kept = []
        for n, m in theirs.named_modules():
            if n.endswith("attn2"):
                m.set_processor(AuthorsAttention(kept, sorted(positions)))
        theirs(z[i:i + 1], t[i:i + 1], encoder_hidden_states=b.cond.text[i:i + 1])
        assert len(kept) == 4  # the tiny UNet's attn2 layers
        norms.append(torch.cat(kept).norm())
    expected = torch.stack(norms).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    grads = torch.autograd.grad(expected, list(theirs.parameters()), allow_unused=True)
    top = max(float(g.abs().max()) for g in grads if g is not None)
    for p, g, h in zip(theirs.parameters(), mine, grads):
        g, h = (torch.zeros_like(p) if x is None else x for x in (g, h))
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6 * top)
    assert any(g is not None and ".attn2.to_v" not in n and g.abs().max() > 0
               for (n, _), g in zip(theirs.named_parameters(), mine))


def test_step_output_reaches_the_callbacks(data):
    """The method's StepOutput comes to every callback (per-pixel errors and their record ids), and
    its tensor logs arrive as the numbers the loop read once per step (what the history holds)."""
    forget, _ = data
    a = tiny_adapter()
    seen = []

    class Spy:
        def on_step_end(self, step, logs, state):
            seen.append((logs, state.output, [r.id for r in state.batch]))

    result = run_loop(a, get_method("fttp", modality="sd"), forget, [], TrainConfig(steps=2, lr=1e-3, batch_size=2),
                      VORN.key, VORN.names, callbacks=[Spy()], progress=False)
    assert len(seen) == 2
    h = a.resolution // a.factor
    for (logs, out, ids), hist in zip(seen, result["history"]):
        assert out.ids == ids and out.per_element.shape == (2, h, h) and not out.per_element.requires_grad
        assert all(isinstance(v, torch.Tensor) for v in out.logs.values())
        assert logs == {k: v.item() for k, v in out.logs.items()} and hist == {"step": hist["step"], **logs}
        assert all(type(v) is float for v in logs.values())
