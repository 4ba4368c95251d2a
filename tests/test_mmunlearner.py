"""MMUnlearner's saliency mask against an independent transcription of the authors' rule
(github.com/Z1zs/MMUnlearner, data_process/SFRon.py and MLLMU_gen_mask.py, baselines/MLLMU_manifold.py),
on the tiny world MLLM, under LoRA and under full fine-tuning."""

import re

import pytest
import torch
from torch.nn import functional as F

from tests.test_world_mllm import TINY
from unlearn.loop import apply_lora, select_parameters
from unlearn.methods import StepContext, get_method
from unlearn.models import load_mllm
from unlearn.run_mllm import world_data
from unlearn.world.build import WorldConfig
from unlearn.world.source import resolve_model

WORLD = WorldConfig(mllm=TINY)
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"  # the MLLM adapters' default


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    load_mllm(resolve_model("world", "mllm", d, WORLD))
    return d


def setup_method(world_dir, lora: bool, **options):
    adapter = load_mllm(resolve_model("world", "mllm", world_dir, WORLD))
    concept, forget, retain = world_data("vorn", 1, image_size=TINY.image_size)
    if lora:
        adapter.model = apply_lora(adapter.model, 8, 16, LORA_TARGETS)
    else:
        select_parameters(adapter.model, None)
    method = get_method("mmunlearner", **options)
    ctx = StepContext(adapter, concept.key, concept.names, next_retain=lambda: retain[:2])
    method.setup(ctx, forget, retain)
    return adapter, ctx, method, forget, retain


def hand_fisher(adapter, records, batch_size=4):
    """The authors' Fisher: sum over batches of grad(HF mean token loss)^2 / number of batches."""
    params = {n: p for n, p in adapter.model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
    for b in batches:
        enc = adapter.encode(b)
        logits = adapter.model(**enc).logits
        labels = enc["labels"]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                acc[n] += g ** 2 / len(batches)
    return acc


def hand_mask(adapter, forget, retain):
    """(F_f + 1e-15) / (F_p + 1e-15) >= 1; F_p per part as in MLLMU_gen_mask.py."""
    visual = [r for r in forget if r.image is not None]
    facts = [r for r in forget if r.image is None]
    f_f = hand_fisher(adapter, visual)
    f_lang = hand_fisher(adapter, list(retain) + facts)
    f_vis = hand_fisher(adapter, [r for r in retain if r.image is not None])
    out = {}
    for n in f_f:
        f_p = f_vis[n] if re.search(r"vision_tower|multi_modal_projector", n) else f_lang[n]
        out[n] = ((f_f[n] + 1e-15) / (f_p + 1e-15) >= 1.0, (f_f[n] + 1e-15) / (f_p + 1e-15))
    return out


def assert_masks_agree(method, expected):
    assert set(method.mask) == set(expected)
    for n, (salient, ratio) in expected.items():
        clear = (ratio - 1.0).abs() > 1e-4  # away from the cut, float summation order cannot flip an element
        assert torch.equal(method.mask[n].bool()[clear], salient[clear]), n


@pytest.mark.parametrize("lora", [True, False])
def test_mask_is_the_authors_rule(world_dir, lora):
    adapter, ctx, method, forget, retain = setup_method(world_dir, lora)
    expected = hand_mask(adapter, forget, retain)
    if lora:  # lora_B = 0: no lora_A element gets a gradient from either set; main marked them all non-salient
        assert all(method.mask[n].eq(1).all() for n in method.mask if "lora_A" in n)
    zero = {n: (r == 1.0) for n, (_, r) in expected.items()}  # no gradient from either set
    assert any(z.any() for z in zero.values())
    assert all(method.mask[n][z].eq(1).all() for n, z in zero.items())  # ratio exactly 1 >= tau: salient
    assert_masks_agree(method, expected)


def test_ascent_updates_lora_A(world_dir):
    """The ascent's gradient after the mask, against hand-computed gradient x the authors' mask. With
    lora_B = 0 every lora_A gradient is 0 anyway; so the check runs after lora_B moved (as after the
    first steps): lora_A's masked gradient must then be its full gradient, not zero (main's rule zeroed it)."""
    adapter, ctx, method, forget, retain = setup_method(world_dir, lora=True)
    expected = hand_mask(adapter, forget, retain)
    with torch.no_grad():
        for n, p in adapter.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    ctx.step = 0
    out = method.loss(ctx, forget[:2])
    visual = [r for r in forget if r.image is not None]
    enc = adapter.encode([visual[i % len(visual)] for i in range(2)])
    logits = adapter.model(**enc).logits
    labels = enc["labels"]
    hand = -F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                            ignore_index=-100)
    torch.testing.assert_close(out.loss, hand)
    params = {n: p for n, p in adapter.model.named_parameters() if p.requires_grad}
    hand_grads = dict(zip(params, torch.autograd.grad(hand, list(params.values()))))
    adapter.model.zero_grad(set_to_none=True)
    out.loss.backward()
    method.gradient_hook(ctx)
    lora_a_norm = sum(float(p.grad.norm()) for n, p in params.items() if "lora_A" in n)
    assert lora_a_norm > 0  # main: 0 (its mask marked every lora_A element non-salient)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, hand_grads[n] * expected[n][0], rtol=1e-4, atol=1e-7)


def test_full_finetuning_masks_linear_weights_only(world_dir):
    """The authors drop the masks of names without proj / fc / linear / mlp / qkv: norms and embeddings
    ascend unmasked, linear layers are masked."""
    adapter, ctx, method, forget, retain = setup_method(world_dir, lora=False)
    ctx.step = 0
    adapter.model.zero_grad(set_to_none=True)
    method.loss(ctx, forget[:2]).loss.backward()
    raw = {n: p.grad.clone() for n, p in adapter.model.named_parameters() if p.grad is not None}
    method.gradient_hook(ctx)
    masked_any = unmasked_with_nonsalient = 0
    for n, p in adapter.model.named_parameters():
        if n not in raw:
            continue
        if re.search(r"proj|fc|linear|mlp|qkv", n):
            torch.testing.assert_close(p.grad, raw[n] * method.mask[n])
            masked_any += int(method.mask[n].eq(0).any())
        else:
            torch.testing.assert_close(p.grad, raw[n])  # main masked these too
            unmasked_with_nonsalient += int((method.mask[n].eq(0) & raw[n].ne(0)).any())
    assert masked_any and unmasked_with_nonsalient  # both cases occur on this model


def test_options_checked(world_dir):
    with pytest.raises(ValueError, match="saliency_batch_size"):
        setup_method(world_dir, lora=True, saliency_batch_size=0)


@pytest.mark.parametrize("build, vision_prefixes", [
    ("tiny_llava", ("model.vision_tower.", "model.multi_modal_projector.")),
    ("tiny_mllama", ("model.vision_model.", "model.multi_modal_projector.")),
    ("tiny_idefics3", ("model.vision_model.", "model.connector.")),
    ("tiny_qwen2vl", ("model.visual.",)),
])
def test_vision_side_found_from_the_model(build, vision_prefixes):
    """The parameters whose preserve Fisher uses image records only are the vision encoder's and the projector's,
    found from the model's structure for any family (a name regex missed Mllama's and Idefics3's)."""
    import tests.tiny_models as tiny
    from unlearn.methods.mmunlearner import language_side

    model = getattr(tiny, build)()[0]
    names = {n for n, _ in model.named_parameters()}
    vision = names - language_side(model)
    assert vision and vision == {n for n in names if n.startswith(vision_prefixes)}
