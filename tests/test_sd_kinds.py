"""SD 1.x, SD 2.x (v-prediction) and SDXL checkpoints as diffusers saves them: tiny random-weight
pipelines of each kind (tests/tiny_models.py: tiny_sd_pipeline) saved with save_pretrained
(safetensors) and loaded back by the toolkit's loader; every SD method trains through the real loop
on each; `unlearn sd --model PATH --data DIR --method fttp --trace` runs end to end on each; the
conditioning equals what the pipeline feeds its UNet; the per-pixel error uses the scheduler's target
(checked by hand under v-prediction); other pipeline kinds are clear errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_sd_record_files import clip_dir  # noqa: F401  (fixture: a tiny CLIP classifier directory)
from tests.tiny_models import SD_KINDS, tiny_sd_pipeline
from unlearn.cli import main
from unlearn.data.sd_masks import MaskOptions
from unlearn.loop import run_loop
from unlearn.methods import SD_METHODS, get_method
from unlearn.methods.sd_esd import esd_target
from unlearn.models.sd import SDXLAdapter, adapter_class, load_sd_adapter
from unlearn.run_sd import train_config
from unlearn.world.concepts import BY_KEY
from unlearn.world.records import world_sd_data

VORN = BY_KEY["vorn"]
KEPT = ("blip", "korvex")  # the retained concepts of these tests
# small, fast settings per method (the loop and the method's objective stay the real ones)
FAST_OPTIONS = {"sa": dict(replay_per_prompt=1, replay_inference_steps=2, fisher_timesteps=2, fisher_batch=2),
                "esd_x": dict(latents="sampled", sample_steps=2)}


@pytest.fixture(scope="module")
def kind_dirs(tmp_path_factory):
    """kind -> a directory holding that kind's tiny pipeline, written by save_pretrained (safetensors)."""
    out = {}
    for kind in SD_KINDS:
        out[kind] = tmp_path_factory.mktemp(kind)
        tiny_sd_pipeline(kind).save_pretrained(out[kind], safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def records():
    forget, retain = world_sd_data("vorn", 2, 32, n_retain=1, n_surrogate=1)
    return forget, [r for r in retain if r.concept in KEPT or r.concept is None]


def test_each_kind_saves_as_safetensors_and_loads_with_its_adapter(kind_dirs):
    for kind, path in kind_dirs.items():
        assert list(path.glob("unet/*.safetensors")) and not list(path.glob("unet/*.bin"))
        a = load_sd_adapter(path)
        assert isinstance(a, SDXLAdapter) == (kind == "sdxl")
        assert a.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
        assert a.resolution == 32 and not any(p.requires_grad for p in a.pipe.text_encoder.parameters())


@pytest.mark.parametrize("kind", SD_KINDS)
def test_conditioning_is_what_the_pipeline_feeds_its_unet(kind, kind_dirs):
    """The adapter's conditioning of a prompt and of the empty prompt (the unconditional input of
    classifier-free guidance) equals the pipeline's own UNet inputs while it generates; the adapter's
    prediction equals that UNet call."""
    a = load_sd_adapter(kind_dirs[kind])
    seen = []
    hook = a.pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    a.generate(["a picture of Vorn"], [0], num_inference_steps=1)
    hook.remove()
    (z, t), kwargs = seen[0]  # guidance: the batch is [unconditional, conditional]
    cond = a.text_embeddings(["", "a picture of Vorn"])  # (equal up to the round-off of another batch size)
    torch.testing.assert_close(cond.text, kwargs["encoder_hidden_states"], rtol=1e-5, atol=1e-6)
    if kind == "sdxl":
        added = kwargs["added_cond_kwargs"]
        torch.testing.assert_close(cond.pooled, added["text_embeds"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cond.time_ids, added["time_ids"], rtol=0, atol=0)
        assert cond.text[0].abs().sum() == 0 and cond.text[1].abs().sum() > 0  # force_zeros_for_empty_prompt
    else:
        assert cond.pooled is None and "added_cond_kwargs" not in cond.unet_kwargs()
    with torch.no_grad():
        torch.testing.assert_close(a.predict(z, t, cond), a.pipe.unet(z, t, **{**kwargs, "return_dict": True}).sample,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", SD_KINDS)
def test_every_method_trains_through_the_loop(kind, kind_dirs, records):
    forget, retain = records
    for name in SD_METHODS:
        a = load_sd_adapter(kind_dirs[kind])
        before = {n: p.detach().clone() for n, p in a.model.named_parameters()}
        method = get_method(name, modality="sd", **FAST_OPTIONS.get(name, {}))
        out = run_loop(a, method, forget, retain, train_config({"steps": 1, "lr": 1e-3}), VORN.key, VORN.names,
                       progress=False)
        assert all(np.isfinite(v) for step in out["history"] for v in step.values()), (kind, name, out["history"])
        changed = [n for n, p in a.model.named_parameters() if not torch.equal(p.detach(), before[n])]
        assert changed, (kind, name)
        if name == "esd_x":  # cross-attention only, wherever the kind has it
            assert all(".attn2." in n for n in changed) and len(changed) > 4, (kind, changed)


def test_v_prediction_error_is_the_velocity_error_by_hand(kind_dirs, records):
    """Under v-prediction e_x = mean over channels of (v - v_theta)^2 with v = sqrt(abar) eps -
    sqrt(1 - abar) z_0; the epsilon error of the same draw is another number (this fails with eps)."""
    forget, _ = records
    a = load_sd_adapter(kind_dirs["sd2"])
    batch = a.encode(forget)
    err = a.pixel_error(batch, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the adapter's draws, in its order: noise, then timesteps
    eps = torch.randn(batch.latents.shape, generator=g)
    t = torch.randint(0, 1000, (len(forget),), generator=g)
    abar = a.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = abar.sqrt() * batch.latents + (1 - abar).sqrt() * eps
    v = abar.sqrt() * eps - (1 - abar).sqrt() * batch.latents
    with torch.no_grad():
        pred = a.pipe.unet(z_t, t, encoder_hidden_states=batch.cond.text).sample
    torch.testing.assert_close(err.detach(), (v - pred).pow(2).mean(1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(err.detach(), (eps - pred).pow(2).mean(1), rtol=1e-2)
    # the probe / K_C, K_N path uses the same target
    from unlearn.eval.sd import fixed_noise_errors

    noise = torch.randn((1, *batch.latents.shape), generator=torch.Generator().manual_seed(1))
    probe = fixed_noise_errors(a, a.model, batch.latents, batch.cond, noise, [500])
    abar = a.noise_scheduler.alphas_cumprod[500]
    with torch.no_grad():
        pred = a.pipe.unet(abar.sqrt() * batch.latents + (1 - abar).sqrt() * noise[0], torch.full((2,), 500),
                           encoder_hidden_states=batch.cond.text).sample
    v = abar.sqrt() * noise[0] - (1 - abar).sqrt() * batch.latents
    torch.testing.assert_close(probe, (v - pred).pow(2).mean(1), rtol=1e-5, atol=1e-6)


def test_salun_saliency_and_sa_fisher_compare_with_the_velocity_under_v_prediction(kind_dirs, records):
    """The two methods that compare a UNet output with the training target themselves (SalUn's guided
    saliency loss, SA's Fisher) use the velocity on SD 2.x-v, by hand; with eps they would differ."""
    from unlearn.methods.sd_sa import diffusion_fisher, fisher_timesteps

    forget, _ = records
    a = load_sd_adapter(kind_dirs["sd2"])
    salun = get_method("salun", modality="sd")
    got = salun.saliency_loss(a, forget, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    batch = a.encode(forget)
    eps, t, z_t = a.noise(batch.latents, g)
    w = salun.saliency_guidance
    with torch.no_grad():
        guided = (1 + w) * a.predict(z_t, t, batch.cond) - w * a.predict(z_t, t, a.text_embeddings(["", ""]))
    v = a.noise_scheduler.get_velocity(batch.latents, eps, t)
    torch.testing.assert_close(got.detach(), -(v - guided).pow(2).mean(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.detach(), -(eps - guided).pow(2).mean(), rtol=1e-2)

    param = a.model.conv_out.weight
    fisher = diffusion_fisher(a, forget[:1], [param], 2, 2, torch.Generator().manual_seed(4))[0]
    g = torch.Generator().manual_seed(4)
    ts = fisher_timesteps(1000, 2, g)
    noise = torch.randn((2, *batch.latents.shape[1:]), generator=g)
    z0 = batch.latents[:1].expand(2, -1, -1, -1)
    z_t = a.noise_scheduler.add_noise(z0, noise, ts)
    pred = a.pipe.unet(z_t, ts, encoder_hidden_states=batch.cond.text[:1].expand(2, -1, -1)).sample
    loss = 500 * (a.noise_scheduler.get_velocity(z0, noise, ts) - pred).pow(2).mean((1, 2, 3)).sum()
    (grad,) = torch.autograd.grad(loss, param)
    torch.testing.assert_close(fisher, grad ** 2, rtol=1e-4, atol=1e-10)


def test_esd_target_in_v_space_is_the_velocity_of_the_eps_target():
    """Why ESD (and SalUn's guided saliency) is right under v-prediction: for a fixed z_t, v is affine in
    eps (v = eps / a - (s / a) z_t) and the guided combination's weights sum to 1, so combining
    velocities gives the velocity of the eps-space combination."""
    g = torch.Generator().manual_seed(0)
    z_t, e_c, e_u = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    abar = torch.tensor([0.9, 0.2]).view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()

    def velocity(eps):
        return eps / a - s / a * z_t

    for eta in (1.0, 2.5):
        torch.testing.assert_close(esd_target(velocity(e_c), velocity(e_u), eta), velocity(esd_target(e_c, e_u, eta)))


def test_esd_sampling_schedule_keeps_the_kinds_prediction_and_does_not_clip(kind_dirs):
    """ESD's DDIM sampling schedule comes from each pipeline's scheduler config: the same prediction
    type, and no clipping of the predicted latents (SDXL's Euler config does not mention clip_sample,
    where DDIM's default would clip to [-1, 1])."""
    for kind, path in kind_dirs.items():
        a = load_sd_adapter(path)
        ddim = get_method("esd_x", modality="sd", sample_steps=2).ddim(a)
        assert ddim.config.prediction_type == a.prediction_type and ddim.config.clip_sample is False, kind


# ----------------------------------------------------------------------------- CLI, errors


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path.relative_to(path.parent.parent))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, records):
    """An SD record directory (unlearn.data.sd_record_files layout) of world renders: 2 forget images of
    Vorn with masks, the kept concepts' images as FD references."""
    forget, retain = records
    out = tmp_path_factory.mktemp("data")
    (out / "concept.json").write_text(json.dumps({"name": "Vorn", "aliases": ["Vornel"]}))
    rows = [{"id": r.id.replace(":", "-"), "prompt": r.prompt,
             "image": _save(out / "images" / f"f{i}.png", r.image),
             "mask": _save(out / "masks" / f"f{i}.png", (np.asarray(r.mask) * 255).astype(np.uint8))}
            for i, r in enumerate(forget)]
    (out / "forget.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # the audit's optional files: unseen images of the concept (mirrored renders) and a scene prompt
    unseen = [{"id": f"u{i}", "prompt": r.prompt, "image": _save(out / "images" / f"u{i}.png", np.asarray(r.image)[:, ::-1]),
               "mask": _save(out / "masks" / f"u{i}.png", (np.asarray(r.mask)[:, ::-1] * 255).astype(np.uint8))}
              for i, r in enumerate(forget)]
    (out / "unseen.jsonl").write_text("\n".join(json.dumps(r) for r in unseen) + "\n")
    (out / "scenes.txt").write_text("Vorn beside a cat\n")
    kept = [r for r in retain if r.concept in KEPT]
    refs = {r.concept: [_save(out / "images" / f"ref-{r.concept}-{k}.png", np.asarray(r.image)[:, ::-1] if k else r.image)
                        for k in range(2)] for r in kept}
    (out / "eval.json").write_text(json.dumps({"prompts": [forget[0].prompt], "label": "vorn",
                                               "retained": {r.concept: r.prompt for r in kept}, "references": refs}))
    return out


@pytest.mark.parametrize("kind", SD_KINDS)
def test_cli_run_with_trace_on_each_kind(kind, kind_dirs, data_dir, clip_dir, tmp_path, capsys):  # noqa: F811
    import knowtrace

    out = tmp_path / "run"
    rc = main(["sd", "--model", str(kind_dirs[kind]), "--data", str(data_dir), "--method", "fttp", "--trace-attention",
               "--steps", "2", "--classifier", f"clip:{clip_dir}", "--eval-seeds", "1", "--fd-seeds", "2", "--retained", "blip",
               "--out", str(out), "--quiet", "lr=1e-3"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == str(kind_dirs[kind]) and metrics["steps"] == 2
    assert metrics["fd_space"] == "clip-image-embeddings" and 0 < metrics["K_C"] and 0 < metrics["K_N"]
    assert (out / "weights" / "unet.safetensors").exists()
    ds = knowtrace.open_trace(out / "trace.zarr")
    assert list(ds.step.values) == [-1, 0, 1] and ds.eps_err.shape == (3, 2, 16, 16)
    # the probe is the evaluation's K computation: step -1 is the original model's, the last the unlearned one's
    assert float(ds.K_C.isel(step=0).mean()) == pytest.approx(metrics["original"]["K_C"], rel=1e-5)
    assert float(ds.K_C.isel(step=-1).mean()) == pytest.approx(metrics["K_C"], rel=1e-5)
    assert np.isfinite(ds.xattn.values).all() and ds.xattn.shape[-2:] == (16, 16)
    if kind == "sdxl":  # `unlearn eval RUN` loads the trained UNet back onto its pipeline and reproduces the metrics
        capsys.readouterr()
        assert main(["eval", str(out)]) == 0
        again = json.loads(capsys.readouterr().out)
        assert again["K_C"] == pytest.approx(metrics["K_C"], rel=1e-5) and again["fd"] == pytest.approx(metrics["fd"])


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])  # SD 1.x: the audit tests on the world SD
def test_cli_audit_on_each_kind_against_a_retain_pipeline(kind, kind_dirs, data_dir, clip_dir, tmp_path, capsys):  # noqa: F811
    """`unlearn audit RUN --retain-model DIR` on a record-directory run of a v-prediction SD 2.x and an SDXL
    pipeline: every SD attack runs through the same adapter on the three models (tiny budgets)."""
    from tests.test_audit_sd import QUICK_ARGS

    run, retain = tmp_path / "run", tmp_path / "retain"
    tiny_sd_pipeline(kind, seed=1).save_pretrained(retain, safe_serialization=True)  # another model of the kind
    assert main(["sd", "--model", str(kind_dirs[kind]), "--data", str(data_dir), "--method", "fttp", "--steps", "1",
                 "--classifier", f"clip:{clip_dir}", "--eval-seeds", "1", "--fd-seeds", "2", "--retained", "blip",
                 "--out", str(run), "--quiet", "lr=1e-3"]) == 0, capsys.readouterr().err
    assert main(["audit", str(run), "--retain-model", str(retain), "--quiet", *QUICK_ARGS,
                 "--set", "adversarial.tokens=2"]) == 0, capsys.readouterr().err
    report = json.loads((run / "audit" / "audit.json").read_text())
    assert report["kind"] == "sd" and report["models"] == ["original", "unlearned", "retain"]
    assert sorted(report["attacks"]) == sorted(["knowledge", "sampling", "relearn", "inversion", "adversarial"])
    assert report["records"]["unseen"] == 2 and report["records"]["scenes"] == 1
    import xarray as xr

    ds = xr.open_dataset(run / "audit" / "audit.nc", engine="h5netcdf")
    assert list(ds["model"].values) == ["original", "unlearned", "retain"]
    for name in ("sampling_drawn", "relearn_drawn", "inversion_drawn", "adversarial_drawn", "knowledge_K_C"):
        values = ds[name].values
        assert np.isfinite(values).any(), name
    # the retain model is the one given: its K_C differs from the original's on the same images and noise
    k_c = ds["knowledge_K_C"]
    assert not np.allclose(k_c.sel(model="retain").values, k_c.sel(model="original").values)


def _index(path, class_name, parts):
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": class_name, **parts}))
    return path


def test_other_pipeline_kinds_are_clear_errors(tmp_path, data_dir, clip_dir, capsys):  # noqa: F811
    sd3 = _index(tmp_path / "sd3", "StableDiffusion3Pipeline",
                 {"transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                  "text_encoder_3": ["transformers", "T5EncoderModel"]})
    with pytest.raises(ValueError, match=r"StableDiffusion3Pipeline.*not a supported.*missing for SDXL: .*unet"):
        adapter_class(sd3)
    no_te2 = _index(tmp_path / "xl", "StableDiffusionXLPipeline",
                    {k: ["diffusers", "X"] for k in ("unet", "vae", "text_encoder", "tokenizer", "tokenizer_2",
                                                     "scheduler")} | {"text_encoder_2": [None, None]})
    with pytest.raises(ValueError, match="no text_encoder_2"):
        adapter_class(no_te2)
    out = tmp_path / "run"  # through the CLI: refused before anything is written
    assert main(["sd", "--model", str(sd3), "--data", str(data_dir), "--method", "fttp", "--classifier",
                 f"clip:{clip_dir}", "--out", str(out), "--quiet"]) == 2
    assert "StableDiffusion3Pipeline" in capsys.readouterr().err and not out.exists()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_sd_adapter(tmp_path)


def test_probe_and_masks_on_the_sdxl_grid(kind_dirs, records):
    """Masks, the probe and K on SDXL: the probe's errors equal a hand-made UNet call with the added
    conditioning (time ids, pooled embeddings) at the fixed noise."""
    from unlearn.sd_tracing import SDProbe

    forget, _ = records
    a = load_sd_adapter(kind_dirs["sdxl"])
    probe = SDProbe(a, forget, timesteps=[300])
    mask = a.masks(forget, MaskOptions())
    assert mask.shape == (2, 16, 16) and 0 < float(mask.mean()) < 1
    abar = a.noise_scheduler.alphas_cumprod[300]
    with torch.no_grad():
        z_t = abar.sqrt() * probe.latents + (1 - abar).sqrt() * probe.noise[0]
        pred = a.pipe.unet(z_t, torch.full((2,), 300), encoder_hidden_states=probe.cond.text,
                           added_cond_kwargs={"text_embeds": probe.cond.pooled, "time_ids": probe.cond.time_ids}).sample
    torch.testing.assert_close(probe.errors(a.model), (probe.noise[0] - pred).pow(2).mean(1), rtol=1e-5, atol=1e-6)
