"""unlearn.eval.sd: Fréchet distance against closed forms, CLIP zero-shot classifier (tiny random
CLIPModel), UA / FD / K_C, K_N on the cached world SD."""

import numpy as np
import pytest
import scipy.linalg
import torch

from knowtrace.knowledge import sd_knowledge
from tests.tiny_models import tiny_clip as make_tiny_clip
from unlearn.data.sd_masks import MaskOptions
from unlearn.eval.sd import (ClipZeroShotClassifier, ConceptClassifier, SDEvalSettings, evaluate_sd_run, feature_fd,
                             forget_knowledge, frechet_distance, frechet_distance_from_stats, ua_from_labels,
                             ua_labels)
from unlearn.models.sd import generate_images
from unlearn.world.build import build_world
from unlearn.world.concepts import BY_KEY
from unlearn.world.records import world_fd_reference, world_forget_records, world_prompts
from unlearn.world.sd import concept_prompt, load_sd
from unlearn.world.source import WorldConceptClassifier

STEPS = 10  # sampling steps in these tests (the default is 25)


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    d1, d2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt d1 - sqrt d2)^2
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance_from_stats(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(closed, rel=1e-10)
    # full covariances: the textbook formula with scipy's sqrtm
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    textbook = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(textbook, rel=1e-8)
    assert frechet_distance_from_stats(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_samples():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20000, 3))
    y = rng.normal(size=(20000, 3)) * 2.0 + np.array([1.0, 0.0, -1.0])  # N(m, 4 I)
    # closed form: |m|^2 + 3 * (1 - 2)^2 = 2 + 3
    assert frechet_distance(x, y) == pytest.approx(5.0, rel=0.03)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    # rank-deficient covariances (fewer samples than dimensions) still give a finite, symmetric value
    a, b = rng.normal(size=(6, 16)), rng.normal(size=(6, 16)) + 3
    assert np.isfinite(frechet_distance(a, b)) and frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(x, y[:, :2])
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(x[:1], y[:1])


def test_ua_from_labels():
    assert ua_from_labels(["a", "b", "a", "none"], "a") == 50.0
    with pytest.raises(ValueError, match="undefined"):
        ua_from_labels([], "a")


# ----------------------------------------------------------------------------- CLIP zero-shot


LABELS = ["Vorn", "Blip", "Korvex"]


@pytest.fixture(scope="module")
def tiny_clip():
    return make_tiny_clip()


def test_clip_zero_shot_classifier(tiny_clip):
    model, tok = tiny_clip
    clf = ClipZeroShotClassifier(model, tok, LABELS)
    assert isinstance(clf, ConceptClassifier)
    assert clf.prompts == ["a photo of Vorn", "a photo of Blip", "a photo of Korvex"]
    images = (np.random.default_rng(0).random((6, 40, 40, 3)) * 255).astype(np.uint8)
    got = clf.predict(images)
    assert len(got) == 6 and set(got) <= set(LABELS)
    # the same decision as CLIP's own logits_per_image
    enc = tok(clf.prompts, padding=True, return_tensors="pt")
    px = clf.image_processor(images=list(images), return_tensors="pt").pixel_values
    assert px.shape == (6, 3, 32, 32)
    with torch.no_grad():
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=px).logits_per_image
    assert got == [LABELS[i] for i in logits.argmax(-1).tolist()]
    assert clf.features(images).shape == (6, 16)
    np.testing.assert_array_equal(clf.features(images), ClipZeroShotClassifier(model, tok, LABELS).features(images))
    with pytest.raises(ValueError, match="distinct"):
        ClipZeroShotClassifier(model, tok, ["Vorn", "Vorn"])
    with pytest.raises(ValueError, match="uint8"):
        clf.predict(images.astype(np.float32))


def test_clip_classifier_round_trips_through_a_local_directory(tiny_clip, tmp_path):
    model, tok = tiny_clip
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    images = (np.random.default_rng(1).random((3, 32, 32, 3)) * 255).astype(np.uint8)
    loaded = ClipZeroShotClassifier.from_pretrained(tmp_path, LABELS)
    assert loaded.predict(images) == ClipZeroShotClassifier(model, tok, LABELS).predict(images)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipZeroShotClassifier.from_pretrained(tmp_path / "missing", LABELS)


# ----------------------------------------------------------------------------- on the world


@pytest.fixture(scope="module")
def world():
    paths = build_world(only=("classifier", "sd"), progress=False)  # cached: loads, never trains here
    return load_sd(paths["sd"]), WorldConceptClassifier.load(paths["classifier"])


def broken_copy(pipe, scale):
    """The same pipeline with the UNet's weights noised."""
    from copy import deepcopy

    p = deepcopy(pipe)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in p.unet.parameters():
            w.add_(torch.randn(w.shape, generator=g) * scale * w.std().nan_to_num(0) if w.numel() > 1 else 0)
    return p


def test_world_ua_and_fd(world, tiny_clip):
    pipe, clf = world
    # before unlearning the world SD draws the concept: UA is low
    _, labels = ua_labels(pipe, concept_prompt(BY_KEY["korvex"]), range(10), clf, "korvex", num_inference_steps=STEPS)
    ua = ua_from_labels(labels, "korvex")
    assert ua < 30
    with pytest.raises(ValueError, match="not a label"):
        ua_labels(pipe, "a picture of Vorn", range(2), clf, "Vorn")
    # FD on the retained concepts: a model against itself ~0, against a noised UNet larger
    keys = ["vorn", "blip", "tenzo", "moko", "ostra"]
    prompts = [concept_prompt(BY_KEY[k]) for k in keys for _ in range(4)]
    seeds = [s for _ in keys for s in range(4)]
    a = generate_images(pipe, prompts, seeds, num_inference_steps=STEPS)
    b = generate_images(pipe, prompts, [s + 4 for s in seeds], num_inference_steps=STEPS)
    c = generate_images(broken_copy(pipe, 0.5), prompts, [s + 4 for s in seeds], num_inference_steps=STEPS)
    same = feature_fd(a, a, clf.features, clf.feature_space)
    other_seeds, broken = (feature_fd(a, x, clf.features, clf.feature_space)["fd"] for x in (b, c))
    assert same["fd_space"] == "world-classifier-features" and same["fd"] == pytest.approx(0, abs=1e-6)
    # measured: 2.5 between seed sets of the same model, 113 against the noised UNet
    assert broken > 5 * other_seeds > 0, (broken, other_seeds)
    # the CLIP classifier goes through the same UA interface
    model, tok = tiny_clip
    clip = ClipZeroShotClassifier(model, tok, LABELS)
    _, labels = ua_labels(pipe, "a picture of Vorn", range(3), clip, "Vorn", num_inference_steps=2)
    ua_clip = ua_from_labels(labels, "Vorn")
    images = generate_images(pipe, ["a picture of Vorn"] * 3, [0, 1, 2], num_inference_steps=2)
    assert ua_clip == ua_from_labels(clip.predict(images), "Vorn")


def test_forget_knowledge_uses_fixed_noise(world):
    pipe, _ = world
    records = world_forget_records("vorn", 2, 32)
    k = forget_knowledge(pipe, records, timesteps=(200, 600), noise_seed=3)
    assert k == forget_knowledge(pipe, records, timesteps=(200, 600), noise_seed=3)  # deterministic
    assert 0 < k["K_C"] <= 1 and 0 < k["K_N"] <= 1 and set(k["per_record"]) == {r.id for r in records}
    # by hand: one draw of noise (T, N, C, h, w) from the seed, error averaged over timesteps
    from unlearn.models.sd import SDAdapter

    ad = SDAdapter(pipe)
    batch = ad.encode(records, masks=MaskOptions())
    noise = torch.randn((2, *batch.latents.shape), generator=torch.Generator().manual_seed(3))
    err = 0
    with torch.no_grad():
        for eps, t in zip(noise, (200, 600)):
            tt = torch.full((2,), t)
            pred = pipe.unet(ad.noise_scheduler.add_noise(batch.latents, eps, tt), tt, encoder_hidden_states=batch.cond.text).sample
            err = err + (eps - pred).pow(2).mean(1) / 2
    kc, kn = sd_knowledge(err, batch.mask)
    assert k["K_C"] == pytest.approx(kc.mean().item(), rel=1e-5) and k["K_N"] == pytest.approx(kn.mean().item(), rel=1e-5)
    # a noised UNet, same noise: less knowledge
    worse = forget_knowledge(broken_copy(pipe, 0.3), records, timesteps=(200, 600), noise_seed=3)
    assert worse["K_C"] < k["K_C"] and worse["K_N"] < k["K_N"]
    with pytest.raises(ValueError, match="timesteps"):
        forget_knowledge(pipe, records, timesteps=(1000,))


def test_evaluate_sd_run_on_the_world(world):
    pipe, clf = world
    settings = SDEvalSettings(num_inference_steps=STEPS, fd_seeds=2, timesteps=(500,))
    # the world's inputs, as a world run gives them: canonical prompts, test renders, forget images
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    retained = world_prompts(["vorn", "blip", "tenzo"])
    references, reference_name = world_fd_reference(retained, settings.fd_seeds, size)
    out = evaluate_sd_run(pipe, "korvex", classifier=clf, n_seeds=4, prompts=concept_prompt(BY_KEY["korvex"]),
                          retained=retained, reference_images=references, reference_name=reference_name,
                          forget_records=world_forget_records("korvex", 2, size),
                          train_steps=7, train_images=2, settings=settings)
    for key in ("ua", "fd", "fd_space", "K_C", "K_N", "TS", "TI", "retained", "ua_detail"):
        assert key in out
    assert out["fd_space"] == "world-classifier-features" and out["fd_n"] == [6, 6]
    assert out["TS"] == 7 and out["TI"] == 2 and len(out["knowledge"]["per_record"]) == 2
    assert out["ua_detail"]["n"] == 4 and sum(out["ua_detail"]["labels"].values()) == 4
    assert out["ua"] == 100.0 * (4 - out["ua_detail"]["labels"].get("korvex", 0)) / 4
    assert set(out["retained"]) == {"vorn", "blip", "tenzo"}
    with pytest.raises(ValueError, match="cannot also be retained"):
        evaluate_sd_run(pipe, "korvex", classifier=clf, n_seeds=1, retained=["korvex"], settings=settings)
    with pytest.raises(ValueError, match="prompts="):
        evaluate_sd_run(pipe, "none", classifier=clf, n_seeds=1, settings=settings)
