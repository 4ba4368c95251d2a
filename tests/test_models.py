"""MLLM adapters on tiny random-weight LLaVA and Qwen2-VL: labels after image expansion, round trips; LoRA
targets found in the model; PaliGemma's prefix-LM token types."""

import re

import pytest
import torch

from tests.tiny_models import tiny_llava, tiny_mllama, tiny_paligemma, tiny_qwen2vl
from unlearn.data.records import Record
from unlearn.models import ADAPTERS, LlavaAdapter, MLLMAdapter, adapter_for, attention_projections, load_mllm
from unlearn.world.concepts import BY_KEY
from unlearn.world.records import ImageBank, world_records
from unlearn.world.texts import ImageRef, fact_qa, identify_qa

FAMILIES = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2vl}


def _records(size=48):
    bank = ImageBank(size, 0)
    vorn = BY_KEY["vorn"]
    qas = [identify_qa(vorn, ImageRef("vorn", "test", 0)), fact_qa(vorn, "home"),
           identify_qa(BY_KEY["oskel"], ImageRef("oskel", "test", 1))]
    return world_records(qas, bank)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_labels_are_the_answers_after_image_expansion(family):
    model, processor = FAMILIES[family]()
    adapter = adapter_for(model, processor)
    assert isinstance(adapter, ADAPTERS[family])
    records = _records()
    batch = adapter.encode(records, train=True)
    tok = adapter.tokenizer
    image_id = model.config.image_token_id
    expected_positions = {"llava": 16, "qwen2_vl": 4}[family]  # 32/8 squared; 56/14 squared / merge 2^2
    for i, r in enumerate(records):
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert tok.decode(labelled, skip_special_tokens=True).strip() == r.answer
        n_image = int((batch["input_ids"][i] == image_id).sum())
        assert n_image == (expected_positions if r.image is not None else 0)
        assert (batch["labels"][i][batch["input_ids"][i] == image_id] == -100).all()
        assert (batch["labels"][i][batch["attention_mask"][i] == 0] == -100).all()
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # the loss the model computes is the mean CE over exactly these labels
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    tgt = batch["labels"][:, 1:]
    keep = tgt != -100
    manual = -logp[keep].gather(1, tgt[keep][:, None]).mean()
    assert torch.allclose(out.loss, manual, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_batches_images_and_text(family):
    model, processor = FAMILIES[family]()
    answers = adapter_for(model, processor).generate(_records(), max_new_tokens=3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_and_load_by_path_round_trip(family, tmp_path):
    model, processor = FAMILIES[family]()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    adapter = load_mllm(str(tmp_path))
    assert adapter.family == ADAPTERS[family].family
    batch = adapter_for(model, processor).encode(_records(), train=True)
    again = adapter.encode(_records(), train=True)
    assert torch.equal(batch["input_ids"], again["input_ids"]) and torch.equal(batch["labels"], again["labels"])
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, adapter.model(**again).logits, atol=1e-6)


def test_unknown_model_type_is_a_clear_error():
    model, processor = tiny_llava()
    model.config.model_type = "whisper"  # a model type with no image-text-to-text class
    with pytest.raises(ValueError, match="'whisper' has no image-text-to-text class.*llava"):
        adapter_for(model, processor)
    model.config.model_type = "llava_next"  # any image-text-to-text model type: the generic adapter
    assert type(adapter_for(model, processor)) is MLLMAdapter


def test_lora_targets_are_the_language_models_attention_projections():
    """Found by walking the language model: on LLaVA the same modules the old name regex picked (so world
    runs are unchanged), never the vision tower's attention; on Mllama also its cross-attention layers."""
    model, processor = tiny_llava()
    names = [n for n, _ in model.named_modules()]
    old = {n for n in names if re.fullmatch(r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)", n)}
    found = attention_projections(model)
    assert set(found) == old and len(found) == 2 * 4
    targets = adapter_for(model, processor).lora_targets
    assert {n for n in names if re.fullmatch(targets, n)} == old and "\\d+" in targets  # short, and exact
    assert not any("vision" in n for n in found)
    mllama, _ = tiny_mllama()
    assert {n.split(".")[-2] for n in attention_projections(mllama)} == {"self_attn", "cross_attn"}


def test_text_only_records_have_no_pixels():
    model, processor = tiny_llava()
    batch = LlavaAdapter(model, processor).encode([Record("t", "Where does Vorn come from?", "Vorn comes from Ulmar.")])
    assert batch.get("pixel_values") is None


def test_paligemma_answer_is_the_causal_suffix():
    """PaliGemma (no chat template in its checkpoints: the adapter's declared format): the prompt is a
    token prefix, labels are the answer, and token_type_ids are 1 exactly from the answer on (0: the
    bidirectional prefix); without that the answer tokens would see each other."""
    model, processor = tiny_paligemma()
    adapter = adapter_for(model, processor)
    records = [r for r in _records() if r.image is not None]
    batch = adapter.encode(records)
    for i, r in enumerate(records):
        answer = batch["labels"][i] != -100
        assert adapter.tokenizer.decode(batch["labels"][i][answer], skip_special_tokens=True).strip() == r.answer
        assert torch.equal(batch["token_type_ids"][i].bool(), answer)
    assert (adapter.encode(records, train=False)["token_type_ids"] == 0).all()  # generation: the prefix only
    with pytest.raises(ValueError, match="has no image"):
        adapter.check_records(_records())
