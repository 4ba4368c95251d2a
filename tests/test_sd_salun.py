"""SalUn for SD against an independent transcription of its authors' code
(github.com/OPTML-Group/Unlearn-Saliency, SD/train-scripts/generate_mask.py and random_label.py) on
tiny random-weight StableDiffusionPipelines: the guided saliency gradient, the top-fraction mask
(full fine-tuning and LoRA) and the prompt-swap loss, value and gradient."""

from dataclasses import replace

import pytest
import torch

from tests.test_world_sd import TINY_SD
from unlearn.loop import apply_lora, select_parameters
from unlearn.methods import StepContext, get_method
from unlearn.methods.sd_salun import top_fraction
from unlearn.models.sd import LORA_PARTS, SDAdapter
from unlearn.world.concepts import BY_KEY
from unlearn.world.records import world_sd_data
from unlearn.world.sd import build_pipeline

VORN = BY_KEY["vorn"]


@pytest.fixture(scope="module")
def data():
    return world_sd_data("vorn", 5, 32, n_retain=1, n_surrogate=2)  # 5 forget images: two saliency batches of 4


def adapter(lora: bool) -> SDAdapter:
    torch.manual_seed(0)
    a = SDAdapter(build_pipeline(replace(TINY_SD, text_hidden=48)), name="tiny")  # attn2 to_k/to_v: A wider than B
    if lora:
        a.model = apply_lora(a.model, 4, 4, LORA_PARTS["attn"])
    else:
        select_parameters(a.model, None)
    a.model.train()
    return a


def ctx_for(a, retain, seed=0, rank=0):
    return StepContext(a, VORN.key, VORN.names, next_retain=lambda: retain[:2],
                       generator=torch.Generator().manual_seed(seed * 1009 + rank), seed=seed)


def noised(a, latents, g):
    """The forward process by hand: eps ~ N(0, I), t ~ U{0..999}, z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps."""
    eps = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
    abar = a.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    return eps, t, abar.sqrt() * latents + (1 - abar).sqrt() * eps


def unet(a, z, t, prompts):
    return a.model(z, t, encoder_hidden_states=a.text_embeddings(prompts).text).sample


def hand_saliency(a, forget, seed_gen, batch=4, w=7.5):
    """generate_mask.py: per batch loss = -mse(noise, (1 + w) eps(c) - w eps("")); gradients summed over
    batches; score = |sum|. Returns (per-batch losses, scores per trained tensor)."""
    params = [p for p in a.model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    losses = []
    for s in range(0, len(forget), batch):
        chunk = forget[s:s + batch]
        eps, t, z = noised(a, a.latents(chunk), seed_gen)
        guided = (1 + w) * unet(a, z, t, [r.prompt for r in chunk]) - w * unet(a, z, t, [""] * len(chunk))
        loss = -((eps - guided) ** 2).mean()
        losses.append(loss.detach())
        for acc, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                acc += g
    return losses, [x.abs() for x in total]


def check_top_fraction(masks, scores, fraction):
    """Exactly int(fraction * N) salient; every score above the k-th largest salient, every one below not."""
    flat = torch.cat([s.flatten() for s in scores])
    k = int(fraction * flat.numel())
    cut = flat.sort(descending=True).values[k - 1]
    m = torch.cat([x.flatten().bool() for x in masks])
    assert int(m.sum()) == k
    assert m[flat > cut].all() and not m[flat < cut].any()
    return cut


def test_saliency_loss_is_the_guided_one_value_and_gradient(data):
    forget, retain = data
    a = adapter(lora=False)
    salun = get_method("salun", modality="sd")
    params = [p for p in a.model.parameters() if p.requires_grad]
    hand_losses, hand_scores = hand_saliency(a, forget, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    total = [torch.zeros_like(p) for p in params]
    for i, s in enumerate(range(0, len(forget), 4)):
        loss = salun.saliency_loss(a, forget[s:s + 4], g)
        torch.testing.assert_close(loss.detach(), hand_losses[i])
        for acc, grad in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if grad is not None:
                acc += grad
    for x, h in zip(total, hand_scores):
        torch.testing.assert_close(x.abs(), h, rtol=1e-4, atol=1e-8)


def test_mask_is_the_top_half_of_the_guided_gradient(data):
    """Full fine-tuning: the mask from setup against the hand-computed guided saliency (main's plain
    eps(c) gradient puts other elements above the cut)."""
    forget, retain = data
    a = adapter(lora=False)
    salun = get_method("salun", modality="sd")
    salun.setup(ctx_for(a, retain), forget, retain)  # its saliency generator is seeded 0 + 1
    _, scores = hand_saliency(a, forget, torch.Generator().manual_seed(1))
    check_top_fraction([m for _, m in salun._masks], scores, 0.5)


def test_lora_zero_gradient_elements_fill_the_quota_at_random(data):
    """LoRA: every lora_A scores 0 (lora_B = 0). With fraction 0.7 the zeros reach the cut: exactly 70%
    of the elements are salient (main: the cut-off score >= 0 made all of them salient), all of lora_B
    first, then lora_A elements drawn at random; the same seed draws the same ones on every process."""
    forget, retain = data
    masks = []
    for seed, rank in ((0, 0), (0, 1), (1, 0)):  # processes of one run draw the same mask
        a = adapter(lora=True)
        salun = get_method("salun", modality="sd", fraction=0.7)
        salun.setup(ctx_for(a, retain, seed, rank), forget, retain)
        names = [n for n, p in a.model.named_parameters() if p.requires_grad]
        masks.append([m for _, m in salun._masks])
        assert salun.salient_share < 0.71  # main: 1.0
    _, scores = hand_saliency(a, forget, torch.Generator().manual_seed(2))
    cut = check_top_fraction(masks[2], scores, 0.7)
    assert cut == 0
    a_share = [float(m.mean()) for n, m in zip(names, masks[2]) if "lora_A" in n]
    b_share = [float(m.mean()) for n, m in zip(names, masks[2]) if "lora_B" in n]
    assert sum(m.numel() for n, m in zip(names, masks[2]) if "lora_A" in n) > 0.5 * sum(m.numel() for m in masks[2])
    assert 0.2 < sum(a_share) / len(a_share) < 0.8 and min(b_share) > 0.9
    assert all(torch.equal(x, y) for x, y in zip(masks[0], masks[1]))
    assert any(not torch.equal(x, y) for x, y in zip(masks[0], masks[2]))


def test_top_fraction_ties_and_errors():
    g = torch.Generator().manual_seed(0)
    scores = [torch.tensor([3.0, 0.0, 0.0]), torch.tensor([[0.0, 2.0], [0.0, 0.0]])]
    masks = top_fraction(scores, 0.5, g)  # 7 elements -> 3: the two nonzero and one of the five zeros
    assert [m.shape for m in masks] == [s.shape for s in scores]
    flat = torch.cat([m.flatten() for m in masks])
    assert int(flat.sum()) == 3 and flat[0] and flat[4]
    assert all(m.all() for m in top_fraction(scores, 1.0, g))
    with pytest.raises(ValueError, match="selects none"):
        top_fraction(scores, 0.1, g)


def test_loss_keeps_the_image_and_swaps_the_prompt_value_and_gradient(data):
    """random_label.py: mse(eps(z_f, c), stopgrad eps(z_f, c')) + 0.1 * mse(eps_r, eps(z_r, c_r)), c' one
    fixed other concept (the first of the retain records); same z_t, noise and t for both forget terms."""
    forget, retain = data
    a = adapter(lora=False)
    salun = get_method("salun", modality="sd")
    ctx = ctx_for(a, retain)
    salun.setup(ctx, forget, retain)
    state = ctx.generator.get_state()
    out = salun.loss(ctx, forget[:2])
    params = [p for p in a.model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)

    g = torch.Generator()
    g.set_state(state)
    other = next(r.prompt for r in retain if r.concept is not None)
    _, t, z = noised(a, a.latents(forget[:2]), g)
    pred = unet(a, z, t, [r.prompt for r in forget[:2]])
    target = unet(a, z, t, [other, other]).detach()
    forget_term = ((pred - target) ** 2).mean()
    eps_r, t_r, z_r = noised(a, a.latents(retain[:2]), g)
    retain_term = ((eps_r - unet(a, z_r, t_r, [r.prompt for r in retain[:2]])) ** 2).mean()
    hand = forget_term + 0.1 * retain_term
    torch.testing.assert_close(out.loss, hand)  # main: another image, the true noise, retain weight 1
    torch.testing.assert_close(out.logs["loss_forget"], forget_term.detach())
    want = torch.autograd.grad(hand, params, allow_unused=True)
    for x, y in zip(got, want):
        if y is None:
            assert x is None or not x.any()
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


def test_pseudo_options(data):
    forget, retain = data
    a = adapter(lora=False)
    others = list(dict.fromkeys(r.concept for r in retain if r.concept is not None))
    salun = get_method("salun", modality="sd", pseudo="random")
    ctx = ctx_for(a, retain)
    salun.setup(ctx, forget, retain)
    drawn = salun.pseudo_prompts(200, torch.Generator().manual_seed(0))
    assert len(set(drawn)) == len(others) and not any("Vorn" in p for p in drawn)
    fixed = get_method("salun", modality="sd", pseudo=others[3])
    fixed.setup(ctx, forget, retain)
    assert set(fixed.pseudo_prompts(3, None)) == {next(r.prompt for r in retain if r.concept == others[3])}
    with pytest.raises(ValueError, match="salun.pseudo"):
        get_method("salun", modality="sd", pseudo="nobody").setup(ctx, forget, retain)
    with pytest.raises(ValueError, match="other concepts"):
        get_method("salun", modality="sd").setup(ctx, forget, [r for r in retain if r.concept is None])
