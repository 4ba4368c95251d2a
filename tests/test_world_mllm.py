"""The world MLLM: a real LlavaForConditionalGeneration, its labels, determinism and round trips."""

from dataclasses import replace

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from unlearn.models import LlavaAdapter
from unlearn.world.concepts import BY_KEY
from unlearn.world.mllm import MLLMConfig, build_model, evaluate_mllm, load_mllm, train_mllm
from unlearn.world.records import ImageBank, world_records
from unlearn.world.texts import ImageRef, fact_qa, identify_qa
from unlearn.world.tokenizer import build_processor

TINY = MLLMConfig(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1,
                  heads=2, images_per_concept=2, fact_repeats=1, steps=3, batch_size=4, warmup=2)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("mllm")
    train_mllm(TINY, out, progress=False)
    return out


def test_labels_cover_exactly_the_answer_after_image_expansion():
    proc = build_processor(TINY.image_size, TINY.patch_size)
    bank = ImageBank(TINY.image_size, 0)
    vorn = BY_KEY["vorn"]
    records = world_records([identify_qa(vorn, ImageRef("vorn", "test", 0)), fact_qa(vorn, "home")], bank)
    model = build_model(TINY, proc)
    batch = LlavaAdapter(model, proc).encode(records, train=True)
    tok = proc.tokenizer
    assert batch["pixel_values"].shape == (1, 3, 32, 32)  # one image: the text-only record has none
    for i, qa in enumerate(records):
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert tok.decode(labelled, skip_special_tokens=False) == qa.answer + "</s>"
    image_positions = batch["input_ids"][0] == tok.convert_tokens_to_ids("<image>")
    assert image_positions.sum() == 16 and (batch["labels"][0][image_positions] == -100).all()
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == -100).all()  # padding is never a label


def test_model_is_a_real_llava_and_round_trips(tiny_world):
    model, proc = load_mllm(tiny_world)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert (tiny_world / "model.safetensors").exists() and not list(tiny_world.glob("*.bin"))
    bank = ImageBank(TINY.image_size, 0)
    records = world_records([identify_qa(BY_KEY["blip"], ImageRef("blip", "test", 1))], bank)
    batch = LlavaAdapter(model, proc).encode(records, train=True)
    with torch.no_grad():
        a = model(**batch).logits
        model2, _ = load_mllm(tiny_world)
        b = model2(**batch).logits
    assert torch.equal(a, b)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_world):
    train_mllm(TINY, tmp_path / "again", progress=False)
    first, _ = load_mllm(tiny_world)
    again, _ = load_mllm(tmp_path / "again")
    for (name, p), q in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    other = build_model(replace(TINY, seed=1), build_processor(TINY.image_size, TINY.patch_size))
    assert not torch.equal(other.lm_head.weight, build_model(TINY, build_processor(32, 8)).lm_head.weight)


def test_gate_report_shape_and_failure_on_an_untrained_model(tiny_world):
    model, proc = load_mllm(tiny_world)
    report = evaluate_mllm(model, proc, n_test=1)
    assert set(report["identify_per_kind"]) == {"person", "cartoon", "logo", "style"}
    assert report["n"] == {"identify": 24, "yesno": 48, "fact": 72}
    assert report["pass"] is False and report["fluent"] < 50  # 3 steps teach nothing
