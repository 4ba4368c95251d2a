"""The SD audit's textual inversion and adversarial prompt (UnlearnDiffAtk) attacks: their losses
against hand computations on tiny random-weight pipelines (SD 1.x, 2.x v-prediction, SDXL), that
textual inversion changes only the new token's row, the simplex projection against the authors'
bisection, both attacks end to end on a finished world SD run (dims, coordinates, ranges, the shared
adapters untouched, determinism), and their verdicts on hand-made datasets."""

import dataclasses

import numpy as np
import pytest
import torch
import xarray as xr
from torch.nn import functional as F

from tests.sd_audit import sd_context
from tests.tiny_models import tiny_sd_pipeline
from unlearn.audit.run import merge_datasets
from unlearn.audit.sd_adversarial import (Adversarial, Slots, adversarial_verdict, candidate_tokens,
                                          simplex_projection, timesteps)
from unlearn.audit.sd_inversion import (ASKED, Inversion, NewTokens, inversion_loss, inversion_verdict, invert,
                                        text_encoders, with_token)
from unlearn.models.sd import make_adapter
from unlearn.world.records import world_sd_data
from unlearn.world.source import resolve_model

PROMPT = "a picture of vorn"


@pytest.fixture(scope="module")
def records():
    forget, _ = world_sd_data("vorn", 2, 32, n_retain=1, n_surrogate=1)
    return forget


def noised_by_hand(adapter, latents, noise, t):
    """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps and the training target (eps, or the velocity)."""
    abar = adapter.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    target = noise if adapter.prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    return z_t, target


def token_ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_inversion_loss_is_the_diffusion_mse_by_hand(kind, records):
    adapter = make_adapter(tiny_sd_pipeline(kind))
    tokens = NewTokens(adapter, ["<vorn-inverted>"])
    row = torch.randn(1, tokens.tables[0].shape[1], generator=torch.Generator().manual_seed(1))
    tokens.set_rows([row])
    prompts = [with_token(r.prompt, ["Vorn"], "<vorn-inverted>") for r in records]
    assert all("<vorn-inverted>" in p and "vorn" not in p.lower().replace("<vorn-inverted>", "") for p in prompts)
    latents = adapter.latents(records)
    loss = inversion_loss(adapter, latents, prompts, torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)  # the same draws: the noise, then the timesteps
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (len(records),), generator=g)
    z_t, target = noised_by_hand(adapter, latents, noise, t)
    ids = token_ids(adapter.pipe.tokenizer, prompts)
    assert (ids == tokens.ids[0]).any(1).all()  # every prompt holds the new token
    embedded = adapter.pipe.text_encoder.get_input_embeddings()(ids)
    assert torch.equal(embedded[ids == tokens.ids[0]], row.expand(len(records), -1))  # ... read as its row
    hand = F.mse_loss(adapter.pipe.unet(z_t, t, encoder_hidden_states=adapter.pipe.text_encoder(ids)[0]).sample,
                      target)
    torch.testing.assert_close(loss, hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_inversion_trains_only_the_new_row_of_every_text_encoder(kind, records):
    adapter = make_adapter(tiny_sd_pipeline(kind))
    pairs = text_encoders(adapter.pipe)
    assert len(pairs) == (2 if kind == "sdxl" else 1)
    tables = [enc.get_input_embeddings().weight.detach().clone() for _, enc in pairs]
    init = [table[tok.encode("picture", add_special_tokens=False)[0]] for (tok, _), table in zip(pairs, tables)]
    weights = {(i, name): p.detach().clone() for i, part in enumerate([adapter.pipe.unet, adapter.pipe.vae]
                                                                        + [enc for _, enc in pairs])
               for name, p in part.named_parameters() if "token_embedding" not in name}
    prompts = ["a picture of <vorn-inverted>"] * len(records)
    tokens, losses = invert(adapter, records, prompts, "<vorn-inverted>", "picture", steps=3, lr=0.1, batch=2, seed=0)
    assert losses.shape == (3,) and np.isfinite(losses).all()
    for e, table in enumerate(tokens.tables):
        v = tokens.vocab[e]
        assert table.shape[0] == v + 1 and tokens.ids[e].tolist() == [v]
        assert torch.equal(table[:v], tables[e])  # every other row bit-identical (AdamW's decay too is undone)
        assert not torch.equal(table[v], init[e])  # the new row moved from the initializer word's
        assert not table.requires_grad
    parts = [adapter.pipe.unet, adapter.pipe.vae] + [enc for _, enc in pairs]
    for (i, name), before in weights.items():
        assert torch.equal(dict(parts[i].named_parameters())[name], before), name  # the model frozen


def test_inversion_needs_a_new_token_and_a_one_token_initializer():
    adapter = make_adapter(tiny_sd_pipeline("sd1"))
    with pytest.raises(ValueError, match="already has"):
        NewTokens(adapter, ["picture</w>"])
    with pytest.raises(ValueError, match="one token"):
        NewTokens(adapter, ["<new>"]).word_rows("picture of")
    for bad in ({"steps": 0}, {"lr": 0.0}, {"init": " "}):
        with pytest.raises(ValueError, match="inversion"):
            Inversion.check_options({**Inversion.options, **bad})
    for bad in ({"tokens": 0}, {"per_timestep": 0}, {"lr": -1.0}):
        with pytest.raises(ValueError, match="adversarial"):
            Adversarial.check_options({**Adversarial.options, **bad})


def test_new_tokens_keep_sdxl_pooling_at_the_end_token():
    """A legacy CLIP config (eos_token_id 2, as SD 1.x / SDXL checkpoints have) pools at the highest id:
    with new tokens that would be a new token's position; the copy pools at the end token instead."""
    adapter = make_adapter(tiny_sd_pipeline("sdxl"))
    encoder, tokenizer = adapter.pipe.text_encoder_2, adapter.pipe.tokenizer_2
    encoder.text_model.eos_token_id = 2
    NewTokens(adapter, ["<new>"])
    ids = token_ids(tokenizer, ["a picture of <new>"])
    out = encoder(ids, output_hidden_states=True)
    end = (ids[0] == tokenizer.eos_token_id).nonzero()[0, 0]
    assert ids[0].argmax() != end  # the new token has the highest id
    torch.testing.assert_close(out.text_embeds[0], encoder.text_projection(out.last_hidden_state[0, end]))


def test_unlearndiffatk_objective_and_its_straight_through_gradient_by_hand(records):
    """The slots holding drawn tokens read as those words typed before the prompt; the objective is the
    denoising MSE of the target image; the gradient on the one-hot draw is autograd's through one_hot @ W."""
    adapter, reference = make_adapter(tiny_sd_pipeline("sd1")), make_adapter(tiny_sd_pipeline("sd1"))
    slots = Slots(adapter, 2)
    pick = torch.tensor([5, 40])
    one_hot = F.one_hot(pick, len(slots.candidates)).float()  # (2, C)
    latents = adapter.latents(records[:1])
    noise, t = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)), torch.tensor([300])
    loss, through = slots.loss_and_gradient(one_hot, latents, t, noise, PROMPT)

    words = reference.pipe.tokenizer.decode(slots.candidates[pick].tolist())
    ids = token_ids(reference.pipe.tokenizer, [f"{words} {PROMPT}"])
    assert ids[0, 1:3].tolist() == slots.candidates[pick].tolist()  # the words typed are the drawn tokens
    table = reference.pipe.text_encoder.get_input_embeddings()
    rows = table.weight.detach()[slots.candidates]  # (C, D)
    hot = one_hot.clone().requires_grad_(True)
    hook = table.register_forward_hook(lambda module, args, out: torch.cat([out[:, :1], (hot @ rows)[None],
                                                                            out[:, 3:]], 1))
    z_t, target = noised_by_hand(reference, latents, noise, t)
    hand = F.mse_loss(reference.pipe.unet(z_t, t, encoder_hidden_states=reference.pipe.text_encoder(ids)[0]).sample,
                      target)
    hook.remove()
    hand.backward()
    assert loss == pytest.approx(hand.item(), rel=1e-5)
    torch.testing.assert_close(through, hot.grad, rtol=1e-4, atol=1e-7)
    assert through.abs().sum() > 0


def test_candidates_are_whole_words_read_back_as_themselves():
    pipe = tiny_sd_pipeline("sdxl")
    ids = candidate_tokens(pipe)
    tok = pipe.tokenizer
    for i in ids.tolist():
        assert tok.convert_ids_to_tokens(i).endswith("</w>") and i not in tok.all_special_ids
        assert tok.encode(tok.decode([i]), add_special_tokens=False) == [i]
    assert tok.convert_tokens_to_ids("vorn</w>") in ids.tolist()


def bisection(a, eps=1.0, xi=1e-5, ub=1.0):
    """The authors' projection of one row (text_grad_.py ``bisection``), transcribed."""
    pa = torch.clip(a, 0, ub)
    if abs(torch.sum(pa).item() - eps) <= xi:
        return pa
    mu_l, mu_u = torch.min(a - 1).item(), torch.max(a).item()
    while abs(mu_u - mu_l) > xi:
        mu_a = (mu_u + mu_l) / 2
        gu = torch.sum(torch.clip(a - mu_a, 0, ub)) - eps
        gu_l = torch.sum(torch.clip(a - mu_l, 0, ub)) - eps + 1e-8
        if gu == 0:
            break
        if gu * gu_l < 0:
            mu_u = mu_a
        else:
            mu_l = mu_a
    return torch.clip(a - mu_a, 0, ub)


def test_simplex_projection_is_the_authors_bisection_and_timesteps_theirs():
    v = torch.randn(4, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v[3] = 1 / 50  # already on the simplex: unchanged
    p = simplex_projection(v)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(p, torch.stack([bisection(row) for row in v]), atol=1e-4, rtol=0)
    torch.testing.assert_close(p[3], v[3])
    assert timesteps(50) == list(range(10, 1000, 20))  # theirs: n_samples = 50
    assert timesteps(4) == [125, 375, 625, 875]


# ----------------------------------------------------------------------------- on a finished world SD run

TINY = {"inversion.steps": 2, "inversion.images": 2, "inversion.batch": 2, "inversion.seeds": 1,
        "adversarial.steps": 2, "adversarial.per_timestep": 1, "adversarial.tokens": 2, "adversarial.seeds": 1}


@pytest.fixture(scope="module")
def world_run(finished_sd_run):
    return finished_sd_run


def cheap_context(run):
    """The audit's context with the world SD as the stand-in retain model (plumbing only), sampling with
    2 steps instead of 25 (the images are judged all the same)."""
    ctx = sd_context(run, TINY, retain_model=str(resolve_model("world", "sd")))
    ctx.data = dataclasses.replace(ctx.data, inference_steps=2)
    return ctx


@pytest.fixture(scope="module")
def attacked(world_run):
    ctx = cheap_context(world_run)
    return ctx, {"inversion": Inversion().run(ctx), "adversarial": Adversarial().run(ctx)}


def test_attacks_on_a_world_run(attacked, tmp_path):
    ctx, ds = attacked
    models = ["original", "unlearned", "retain"]
    inv, adv = ds["inversion"], ds["adversarial"]
    assert inv.inversion_drawn.dims == ("model", "asked") and list(inv.model.values) == models
    assert list(inv.asked.values) == list(ASKED) and inv.inversion_loss.dims == ("model", "step")
    assert inv.sizes["step"] == 2 and np.isfinite(inv.inversion_loss).all() and (inv.inversion_loss > 0).all()
    assert inv.attrs["token"] == "<grom-inverted>" and inv.attrs["images"] == 2
    assert adv.adversarial_drawn.dims == ("model", "asked") and list(adv.model.values) == models
    assert adv.adversarial_loss.dims == ("model", "target", "step") and adv.sizes["step"] == 2
    assert adv.adversarial_prompt.dims == ("model", "target")
    for m in models:
        prompt = adv.adversarial_prompt.sel(model=m, target=0).item()
        steps = int(adv.adversarial_steps.sel(model=m, target=0))
        assert prompt.endswith(ctx.data.prompts[0]) and 0 <= steps <= 2
        assert (steps == 0) == (prompt == ctx.data.prompts[0])  # 0 steps: the plain prompt already draws it
        assert np.isfinite(adv.adversarial_loss.sel(model=m, target=0)[:steps]).all()
    for d in (inv.inversion_drawn, adv.adversarial_drawn):
        assert ((d >= 0) & (d <= 100)).all()
    # the shared adapters are untouched: the attacks worked on fresh copies
    assert "<grom-inverted>" not in ctx.adapter("original").pipe.tokenizer.get_vocab()
    merged = merge_datasets(ds, ctx.models)  # as the audit writes them
    merged.to_netcdf(tmp_path / "audit.nc", engine="h5netcdf")
    back = xr.open_dataset(tmp_path / "audit.nc", engine="h5netcdf")
    assert back.adversarial_prompt.values.tolist() == adv.adversarial_prompt.values.tolist()
    for name in ("inversion", "adversarial"):  # verdicts read the datasets
        attack = Inversion() if name == "inversion" else Adversarial()
        assert attack.verdict(ds[name], ctx).verdict in ("removed", "hidden", "inconclusive")


def test_same_seed_same_datasets(attacked, world_run):
    ctx = cheap_context(world_run)
    xr.testing.assert_identical(Inversion().run(ctx), attacked[1]["inversion"])
    xr.testing.assert_identical(Adversarial().run(ctx), attacked[1]["adversarial"])


# ----------------------------------------------------------------------------- verdicts on hand-made datasets


def drawn_dataset(var, values: dict):
    """``var`` (model, asked) from {model: (by name, attacked)}."""
    return xr.Dataset({var: (("model", "asked"), np.array(list(values.values()), dtype=float))},
                      coords={"model": list(values), "asked": list(ASKED)})


FORGOTTEN = {"original": (100, 100), "unlearned": (0, 0)}
CASES = [
    ({**FORGOTTEN, "unlearned": (0, 80), "retain": (0, 20)}, "hidden"),  # back 60 points above the baseline
    ({**FORGOTTEN, "unlearned": (0, 40), "retain": (0, 20)}, "removed"),  # within the margin of the baseline
    ({"unlearned": (0, 80), "retain": (0, 20)}, "hidden"),  # no original (the control is optional)
    ({**FORGOTTEN, "unlearned": (0, 80)}, "inconclusive"),  # no retain model: no reference
    ({"original": (100, 30), "unlearned": (0, 80), "retain": (0, 0)}, "inconclusive"),  # attack fails on the original
    ({"original": (100, 100), "unlearned": (90, 100), "retain": (0, 0)}, "inconclusive"),  # the run did not forget
]


@pytest.mark.parametrize("values, verdict", CASES)
@pytest.mark.parametrize("read, var", [(inversion_verdict, "inversion_drawn"),
                                       (adversarial_verdict, "adversarial_drawn")])
def test_verdicts(read, var, values, verdict):
    v = read(drawn_dataset(var, values), margin=25.0, min_original=50.0)
    assert v.verdict == verdict and v.attack == var.split("_")[0]
    assert v.numbers["unlearned_attack"] == values["unlearned"][1]
    if "retain" in values and verdict != "inconclusive":
        assert v.numbers["gap_unlearned_minus_retain"] == values["unlearned"][1] - values["retain"][1]
