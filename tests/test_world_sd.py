"""The world SD (a real StableDiffusionPipeline) and the world classifier: tokenizer, round trips, determinism."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from unlearn.world.classifier import CLASSES, ClassifierConfig, as_input, background_image, load_classifier, train_classifier
from unlearn.world.concepts import CONCEPTS
from unlearn.world.render import world_image
from unlearn.world.sd import (SDConfig, build_tokenizer, concept_prompt, encode_prompts, generate_images, load_sd,
                              prompt_words, scene_prompt, train_sd)

TINY_SD = SDConfig(images_per_concept=2, scenes_per_pair=1, vae_steps=3, vae_batch_size=8, unet_steps=3, batch_size=8,
                   warmup=2, text_hidden=32, text_layers=1, vae_channels=(16, 32), unet_channels=(16, 32),
                   unet_attention=(False, True), unet_heads=(1, 2))
TINY_CLF = ClassifierConfig(width=8, steps=3, batch_size=8)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd")
    train_sd(TINY_SD, out, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_clf(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf")
    train_classifier(TINY_CLF, out, progress=False)
    return out


def test_every_prompt_word_is_one_token():
    tok = build_tokenizer()
    words = prompt_words()
    assert {w for c in CONCEPTS for n in c.names for w in n.lower().split()} <= set(words)
    for w in words:
        assert len(tok.tokenize(w)) == 1, (w, tok.tokenize(w))
    for c in CONCEPTS:  # in context too: a k-word name is k tokens, plus start and end
        for name in c.names:
            prompt = concept_prompt(c, name)
            assert len(tok(prompt).input_ids) == len(prompt.split()) + 2
    longest = max((scene_prompt(a, b) for a in CONCEPTS if a.kind != "style" for b in CONCEPTS if b.kind != "style"),
                  key=lambda p: len(p.split()))
    assert len(tok(longest).input_ids) <= tok.model_max_length


def test_pipeline_is_real_and_round_trips(tiny_sd):
    pipe = load_sd(tiny_sd)
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is None
    assert list(tiny_sd.rglob("*.safetensors")) and not list(tiny_sd.rglob("*.bin"))
    assert any(name.endswith("attn2.processor") for name in pipe.unet.attn_processors)
    prompts, seeds = ["a picture of Vorn", "a picture of the logo of Korvex", ""], [0, 1, 0]
    a = generate_images(pipe, prompts, seeds, num_inference_steps=3)
    assert a.shape == (3, TINY_SD.image_size, TINY_SD.image_size, 3) and a.dtype == np.uint8
    b = generate_images(load_sd(tiny_sd), prompts, seeds, num_inference_steps=3)
    np.testing.assert_array_equal(a, b)  # same weights, same seed: same pixels
    # the plain diffusers call works too
    out = pipe("a picture of Blip", num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, TINY_SD.image_size, TINY_SD.image_size, 3)


def test_saved_vocab_files_give_the_same_tokenizer(tiny_sd):
    saved = load_sd(tiny_sd).tokenizer
    classic = CLIPTokenizer(vocab=str(tiny_sd / "tokenizer" / "vocab.json"),
                            merges=str(tiny_sd / "tokenizer" / "merges.txt"), model_max_length=saved.model_max_length)
    for c in CONCEPTS:
        p = concept_prompt(c)
        assert saved(p).input_ids == classic(p).input_ids == build_tokenizer()(p).input_ids


def test_training_is_deterministic(tiny_sd, tmp_path):
    train_sd(TINY_SD, tmp_path, progress=False)
    for part in ("unet", "vae", "text_encoder"):
        a = load_file(str(tiny_sd / part / "diffusion_pytorch_model.safetensors")) if part != "text_encoder" else \
            load_file(str(tiny_sd / part / "model.safetensors"))
        b = load_file(str(tmp_path / part / "diffusion_pytorch_model.safetensors")) if part != "text_encoder" else \
            load_file(str(tmp_path / part / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    assert json.loads((tmp_path / "world_sd_config.json").read_text())["seed"] == TINY_SD.seed


def test_text_encoder_trains_with_the_unet_or_stays_frozen(tiny_sd, tmp_path):
    from unlearn.world.sd import build_pipeline
    p = ["a picture of Zuzu Pim"]
    train_sd(replace(TINY_SD, train_text_encoder=False), tmp_path, progress=False)
    with torch.no_grad():
        init = encode_prompts(build_pipeline(TINY_SD), p)
        assert not torch.equal(encode_prompts(load_sd(tiny_sd), p), init)  # trained by default
        torch.testing.assert_close(encode_prompts(load_sd(tmp_path), p), init, rtol=0, atol=0)


def test_classifier_round_trip_and_determinism(tiny_clf, tmp_path):
    model = load_classifier(tiny_clf)
    images = np.stack([world_image(c.key, "test", 0, 32).image for c in CONCEPTS] + [background_image("test", 0).image])
    with torch.no_grad():
        a = model(images)
        b = load_classifier(tiny_clf)(images)
    assert a.shape == (len(CLASSES), len(CLASSES)) and CLASSES[-1] == "none"
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert model.features(images).shape == (len(CLASSES), model.feature_dim)
    assert model.predict(images).shape == (len(CLASSES),)
    # float input (N, 3, H, W) in [0, 1] is the same as uint8 input
    torch.testing.assert_close(model(as_input(images)), a)
    train_classifier(TINY_CLF, tmp_path, progress=False)
    assert (tmp_path / "model.safetensors").read_bytes() == (tiny_clf / "model.safetensors").read_bytes()
