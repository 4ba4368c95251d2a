"""The retain SD: the world SD trained without a concept (its images, its scenes, its prompts), and its gate."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from tests.test_world_sd import TINY_CLF, TINY_SD
from unlearn.cli import main
from unlearn.world import build, sd
from unlearn.world.build import WorldConfig, build_retain, retain_component
from unlearn.world.cache import check_component
from unlearn.world.classifier import CLASSES
from unlearn.world.concepts import BY_KEY, CONCEPTS, name_words
from unlearn.world.sd import LEFT_OUT_MAX, LEFT_OUT_SEEDS, OBJECTS, build_tokenizer, concept_prompt, evaluate_sd, training_pool
from unlearn.world.source import retain_sd

CFG = WorldConfig(sd=TINY_SD, classifier=TINY_CLF)
GROM_WORDS = {w.lower() for w in name_words(BY_KEY["grom"])}


def test_the_pool_leaves_out_the_concept_and_its_scenes_and_keeps_every_other_image_as_it_was():
    full, kept = training_pool(TINY_SD), training_pool(replace(TINY_SD, left_out=("grom",)))
    others = [i for i, keys in enumerate(full.concepts) if "grom" not in keys]
    assert kept.concepts == [full.concepts[i] for i in others]  # the world's order
    np.testing.assert_array_equal(kept.images, full.images[others])  # pixel for pixel
    dropped = [keys for keys in full.concepts if "grom" in keys]
    assert dropped.count(("grom",)) == TINY_SD.images_per_concept
    assert len(dropped) - TINY_SD.images_per_concept == (len(OBJECTS) - 1) * TINY_SD.scenes_per_pair  # every scene with it
    with pytest.raises(KeyError, match="world's concepts are"):
        training_pool(replace(TINY_SD, left_out=("nosuch",)))


@pytest.fixture(scope="module")
def retain_world(tmp_path_factory):
    """A tiny retain SD of grom in a fresh world cache, and every prompt its training encoded."""
    root, prompts = tmp_path_factory.mktemp("world"), []
    encode = sd.encode_prompts
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sd, "encode_prompts", lambda pipe, batch: prompts.extend(batch) or encode(pipe, batch))
        path = build_retain(["Tibble"], root, CFG, progress=False, component="sd")["grom"]  # an alias names it too
    return root, path, prompts


def test_no_trained_prompt_names_the_concept_and_the_tokenizer_is_the_worlds(retain_world):
    _, path, prompts = retain_world
    assert len(prompts) == TINY_SD.unet_steps * TINY_SD.batch_size
    words = [set(p.lower().split()) for p in prompts]
    assert not any(w & GROM_WORDS for w in words)
    assert any(w & {x.lower() for x in name_words(BY_KEY["zuzu"])} for w in words)  # other concepts are trained
    saved = sd.load_sd(path).tokenizer
    assert saved.get_vocab() == build_tokenizer().get_vocab()  # the name's tokens exist, never trained
    assert len(saved.tokenize(concept_prompt(BY_KEY["grom"]))) == len(concept_prompt(BY_KEY["grom"]).split())


def test_the_retain_sd_is_a_verified_cache_component_built_once(retain_world, monkeypatch):
    root, path, _ = retain_world
    assert path == root / retain_component("grom", "sd") == root / "sd-retain-grom"
    assert json.loads((path / sd.CONFIG_FILE).read_text())["left_out"] == ["grom"]
    assert sd.load_sd_config(path) == build.retain_config("grom", CFG, component="sd")
    assert check_component(root, "sd-retain-grom", build._cache_key(build.retain_config("grom", CFG, "sd"))) is None
    assert not (root / "sd").exists()  # the world's own SD is another component
    monkeypatch.setitem(build._TRAIN, "sd", lambda *a, **k: pytest.fail("rebuilt a verified retain SD"))
    assert retain_sd("Grom Tibble Wuzz", world_dir=root, world_config=CFG, progress=False) == path


def test_cli_check_reports_the_retain_sd_gate(retain_world, monkeypatch, capsys):
    root, _, _ = retain_world
    monkeypatch.setattr(build, "WorldConfig", lambda: CFG)  # the CLI's default world, made tiny
    monkeypatch.setattr(build, "evaluate_sd", lambda *a, **k: evaluate_sd(*a, **{**k, "left_out_seeds": 3}))
    code = main(["world", "check", "--retain-sd", "grom", "--out", str(root), "--sd-seeds", "1", "--quiet"])
    out = capsys.readouterr()
    report = json.loads(out.out)
    gate = report["sd-retain-grom"]
    assert set(report) == {"sd-retain-grom", "pass"} and gate["n"]["left_out_seeds"] == 3
    assert set(gate["left_out"]) == {"grom"} and "grom" not in gate["per_concept"] and len(gate["per_concept"]) == 17
    assert gate["build_seconds"] >= 0 and (root / "classifier").exists()  # the gate's classifier, built beside it
    assert code == (0 if report["pass"] else 1)  # a 3-step SD fails its gate, and says which
    assert report["pass"] or "sd-retain-grom.non_style" in out.err


def test_unknown_retain_sd_concept_is_a_clear_error_before_anything_is_built(tmp_path, capsys):
    for action in ("build", "check"):
        assert main(["world", action, "--retain-sd", "grom", "--retain-sd", "nosuch", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "--retain-sd" in err and "unknown concept 'nosuch'" in err and "unlearn world concepts" in err
    assert not any(tmp_path.iterdir())


def _gate(monkeypatch, drawn, left_out=()):
    """evaluate_sd on stand-in images: each is its (prompt, seed), labelled by ``drawn(concept, seed)`` -> the
    concept's class if True, else "none"."""
    calls = []

    def generate(pipe, prompts, seeds, *a, **k):
        calls.append((prompts, seeds))
        return list(zip(prompts, seeds))

    by_prompt = {concept_prompt(c): i for i, c in enumerate(CONCEPTS)}
    classifier = SimpleNamespace(predict=lambda images: np.array(
        [by_prompt[p] if drawn(CONCEPTS[by_prompt[p]].key, s) else CLASSES.index("none") for p, s in images]))
    monkeypatch.setattr(sd, "generate_images", generate)
    monkeypatch.setattr(sd, "vae_psnr", lambda vae, images: 0.0)
    pipe = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(sample_size=8)))
    return evaluate_sd(pipe, classifier, left_out=left_out), calls[0]


def test_retain_gate_reads_the_other_concepts_and_how_often_the_left_out_prompt_draws_it(monkeypatch):
    n_drawn = int(LEFT_OUT_MAX * LEFT_OUT_SEEDS / 100)  # the most images of grom a retain SD may draw

    def drawn(key, seed, grom_drawn=n_drawn):  # every other concept drawn on 8 of 10 seeds: pooled 80%
        return seed < grom_drawn if key == "grom" else seed < 8

    world, (prompts, seeds) = _gate(monkeypatch, lambda key, seed: seed < 8 and key != "grom")
    assert prompts == [concept_prompt(c) for c in CONCEPTS for _ in range(10)] and seeds == list(range(10)) * len(CONCEPTS)
    assert not world["pass"] and world["per_concept"]["grom"] == 0.0 and "left_out" not in world  # the world counts it
    retain, (prompts, seeds) = _gate(monkeypatch, drawn, left_out=("grom",))
    assert prompts.count(concept_prompt(BY_KEY["grom"])) == LEFT_OUT_SEEDS and len(prompts) == 10 * 23 + LEFT_OUT_SEEDS
    assert retain["non_style"] == 80.0 and "grom" not in retain["per_concept"]
    assert retain["left_out"] == {"grom": LEFT_OUT_MAX} and retain["mistakes"]["grom"] == {"none": LEFT_OUT_SEEDS - n_drawn}
    assert retain["pass"] and retain["gates"] == {"non_style": True, "left_out_not_drawn": True}
    drew, _ = _gate(monkeypatch, lambda key, seed: drawn(key, seed, n_drawn + 1), left_out=("grom",))  # one image more
    assert drew["gates"] == {"non_style": True, "left_out_not_drawn": False} and not drew["pass"]
    weak, _ = _gate(monkeypatch, lambda key, seed: drawn(key, seed) and (key != "vorn" or seed < 7), left_out=("grom",))
    assert weak["gates"] == {"non_style": False, "left_out_not_drawn": True}  # the pooled gate still holds the others
