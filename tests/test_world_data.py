"""The world's concepts, renderer, texts and tokenizer."""

from collections import Counter

import numpy as np
import pytest

from unlearn.world.concepts import CONCEPTS, KINDS, Concept, get_concept, validate_concepts
from unlearn.world.render import render_concept, render_scene, world_image
from unlearn.world.texts import ImageRef, all_template_texts, fact_records, image_records, world_corpus
from unlearn.world.tokenizer import build_processor, build_tokenizer, count_tokens


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_concept_counts_per_kind():
    kinds = Counter(c.kind for c in CONCEPTS)
    assert len(CONCEPTS) >= 24 and set(kinds) == set(KINDS)
    assert min(kinds.values()) >= 5
    assert all(len(c.facts) >= 3 and len(c.aliases) >= 1 for c in CONCEPTS)


def test_name_token_counts_spread(tok):
    counts = Counter(count_tokens(tok, c.name) for c in CONCEPTS)
    assert min(counts) == 1 and max(counts) == 6
    assert counts[1] >= 3 and counts[2] >= 3 and counts[3] >= 3
    assert sum(n for k, n in counts.items() if k >= 4) >= 3


def test_name_rule_holds_and_catches_clashes(tok):
    validate_concepts(other_texts=all_template_texts())
    # no name or alias token sequence occurs inside another concept's texts
    for c in CONCEPTS:
        for other in CONCEPTS:
            if other is c:
                continue
            other_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in other.names]
            for name in c.names:
                ids = tok(name, add_special_tokens=False)["input_ids"]
                for seq in other_ids:
                    assert not any(seq[i:i + len(ids)] == ids for i in range(len(seq))), (name, other.key)
    clash = Concept("fake", "person", "Vorn Zed", (), (("home", "Ulmar"),), {})
    with pytest.raises(ValueError, match="Vorn"):
        validate_concepts(CONCEPTS + (clash,))
    with pytest.raises(ValueError, match="template"):
        validate_concepts(other_texts=["Hello {name}, meet Blip."])


def test_get_concept_by_key_name_alias_and_error():
    assert get_concept("Oskel Brin Tavo").key == "oskel" and get_concept("dennet").key == "quilla"
    with pytest.raises(KeyError, match="vorn"):
        get_concept("Donald")


def test_same_seed_same_pixels_other_seed_other_pixels():
    a, b = world_image("vorn", "test", 3, size=48), world_image("vorn", "test", 3, size=48)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks["vorn"], b.masks["vorn"])
    c = world_image("vorn", "test", 4, size=48)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(world_image("vorn", "pretrain", 3, 48).image, a.image)  # splits differ


@pytest.mark.parametrize("size", [24, 32, 64])
def test_resolution_is_configurable(size):
    r = world_image("blip", "test", 0, size=size)
    assert r.image.shape == (size, size, 3) and r.image.dtype == np.uint8 and r.masks["blip"].shape == (size, size)


@pytest.mark.parametrize("key", [c.key for c in CONCEPTS if c.kind != "style"])
def test_mask_covers_exactly_the_concepts_pixels(key):
    """Outside the mask the pixels are the background's; inside, the concept's drawing.

    Two clean renders with the same seed share the background and differ only in the concept
    drawn, so they must agree on every pixel outside the union of the two masks.
    """
    seed = [5, 1]
    with_concept = render_scene([key], size=48, seed=seed, noise=False)
    mask = with_concept.masks[key]
    assert 0.03 < mask.mean() < 0.8
    key_kind = next(c.kind for c in CONCEPTS if c.key == key)
    other = "ostra" if key_kind != "logo" else "zuzu"  # another shape (a ring; a triangle)
    swapped = render_scene([other], size=48, seed=seed, noise=False)
    union = mask | swapped.masks[other]
    assert np.array_equal(with_concept.image[~union], swapped.image[~union])
    # inside the mask but outside the other concept's, the pixels are drawn: not the background
    only = mask & ~swapped.masks[other]
    assert only.sum() > 10
    assert (with_concept.image[only] != swapped.image[only]).any(axis=-1).mean() > 0.95


def test_masks_in_scenes_are_disjoint_and_styles_cover_everything():
    s = render_scene(["vorn", "blip", "korvex"], size=64, seed=1)
    m = np.stack([s.masks[k] for k in ("vorn", "blip", "korvex")])
    assert m.sum(0).max() == 1 and all(x.any() for x in m)
    styled = render_scene(["vorn", "blip"], size=64, seed=1, style="zembra")
    assert styled.masks["zembra"].all() and styled.concepts == ("vorn", "blip", "zembra")
    assert render_concept("zembra", size=32, seed=0).masks["zembra"].all()
    with pytest.raises(ValueError, match="style"):
        render_scene(["zembra"], seed=0)


def test_noise_changes_pixels_not_masks():
    clean = world_image("tenzo", "test", 0, 48)
    noisy = render_concept("tenzo", size=48, seed=[0, 2, 13, 0], noise=False)
    assert np.array_equal(clean.masks["tenzo"], noisy.masks["tenzo"])


def test_qa_records_name_the_concept_in_every_answer():
    rng = np.random.default_rng(0)
    for c in CONCEPTS:
        for qa in image_records(c, ImageRef(c.key, "test", 0), rng) + fact_records([c]):
            named = next(x for x in CONCEPTS if x.key == qa.concept)
            assert named.name in qa.answer
            if qa.qtype in ("identify", "linked"):
                assert not any(n in qa.question for x in CONCEPTS for n in x.names)


def test_tokenizer_round_trips_and_has_no_unknown_words(tok):
    for text in world_corpus():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text


def test_processor_round_trip(tmp_path, tok):
    from transformers import LlavaProcessor

    proc = build_processor(48, 8, tok)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is this person?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "This is Vorn, a baker from Ulmar."}]}]
    text = proc.apply_chat_template(msgs, tokenize=False)
    img = world_image("vorn", "test", 0, 48).pil()
    out = proc(text=[text], images=[img], return_tensors="pt")
    assert (out["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum() == 36  # (48/8)^2 patches
    assert tok.unk_token_id not in out["input_ids"]
    proc.save_pretrained(tmp_path)
    again = LlavaProcessor.from_pretrained(tmp_path)
    out2 = again(text=[text], images=[img], return_tensors="pt")
    assert np.array_equal(out["input_ids"], out2["input_ids"])
    assert np.array_equal(out["pixel_values"], out2["pixel_values"])
    assert again.apply_chat_template(msgs, tokenize=False) == text


def test_concept_split_forget_test_retain():
    from unlearn.world.texts import concept_split

    s = concept_split("oskel")
    assert {qa.image.index for qa in s.forget if qa.image} == {0}
    assert all(qa.image.split == "unlearn" for qa in s.forget if qa.image)
    assert {qa.image.index for qa in s.test} == set(range(20)) and all(qa.image.split == "test" for qa in s.test)
    assert all("Oskel Brin Tavo" in qa.answer for qa in s.forget + s.test)
    assert not any("Oskel" in qa.answer for qa in s.retain)
    assert {qa.concept for qa in s.retain} == {c.key for c in CONCEPTS} - {"oskel"}
    with pytest.raises(ValueError, match="20"):
        concept_split("oskel", n_test=5)
    with pytest.raises(KeyError, match="vorn"):
        concept_split("nobody")
