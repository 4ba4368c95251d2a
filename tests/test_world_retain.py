"""The retain MLLM (the world MLLM that never saw a concept) and the world's forgetting-audit data."""

import json
from dataclasses import fields, replace

import numpy as np
import pytest

from tests.test_world_mllm import TINY
from unlearn.cli import main
from unlearn.world import build, mllm
from unlearn.audit.world_data import REPHRASED, world_audit_data
from unlearn.world.build import WorldConfig, build_retain, component_key, retain_component
from unlearn.world.cache import check_component
from unlearn.world.concepts import BY_KEY, CONCEPTS, name_words
from unlearn.world.mllm import MLLMConfig, build_model, evaluate_mllm, pretraining_records
from unlearn.world.records import world_eval_set
from unlearn.world.sd import SDConfig
from unlearn.world.render import world_image
from unlearn.world.source import retain_mllm
from unlearn.world.texts import world_corpus
from unlearn.world.tokenizer import build_processor, build_tokenizer

# ----------------------------------------------------------------------------- the retain model


@pytest.mark.parametrize("component, config", [("mllm", MLLMConfig), ("sd", SDConfig)])
def test_the_world_cache_keys_are_unchanged_and_a_retain_key_differs(component, config):
    key = component_key(component, WorldConfig())["config"]
    # the key of the world built before left_out existed: every field but it, with its default value
    assert key == {f.name: f.default for f in fields(config) if f.name != "left_out"}
    retain = build._key_config(build.retain_config("Grom Tibble Wuzz", component=component))  # by name, too
    assert retain == {**key, "left_out": ("grom",)}
    assert retain_component("Tibble", component) == f"{component}-retain-grom"
    with pytest.raises(ValueError, match="no retain model for world component 'classifier'"):
        build.retain_config("grom", component="classifier")


def test_pretraining_leaves_out_the_concept_and_keeps_every_other_record_as_it_was():
    full = pretraining_records(MLLMConfig())
    kept = pretraining_records(replace(MLLMConfig(), left_out=("grom",)))
    # same random draws: the other records are exactly the world's, in its order
    assert kept == [qa for qa in full if qa.concept != "grom" and (qa.image is None or qa.image.key != "grom")]
    about = [qa for qa in full if qa.concept == "grom"]
    assert {qa.qtype for qa in about} == {"identify", "yesno", "linked", "fact"}
    assert any(qa.image is not None and qa.image.key != "grom" for qa in about)  # "is Grom in this image?" elsewhere
    assert len(full) - len(kept) > 4 * MLLMConfig().images_per_concept
    words = name_words(BY_KEY["grom"])
    assert not any(words & set(f"{qa.question} {qa.answer}".replace(",", " ").replace(".", " ").split()) for qa in kept)
    with pytest.raises(KeyError, match="world's concepts are"):
        pretraining_records(replace(MLLMConfig(), left_out=("nosuch",)))


def test_retain_build_is_a_verified_cache_component_built_once(tmp_path, monkeypatch):
    cfg = WorldConfig(mllm=TINY)
    path = build_retain(["Tibble"], tmp_path, cfg, progress=False)["grom"]  # an alias names the concept too
    assert path == tmp_path / retain_component("grom") == tmp_path / "mllm-retain-grom"
    assert json.loads((path / "world_mllm_config.json").read_text())["left_out"] == ["grom"]
    assert check_component(tmp_path, "mllm-retain-grom", {"config": build._key_config(build.retain_config("grom", cfg)),
                                                          "world": build.world_fingerprint()}) is None
    assert not (tmp_path / "mllm").exists()  # the world's own MLLM is another component
    monkeypatch.setitem(build._TRAIN, "mllm", lambda *a, **k: pytest.fail("rebuilt a verified retain model"))
    assert retain_mllm("grom", world_dir=tmp_path, world_config=cfg, progress=False) == path
    # its gate report reads the retain model with grom left out (answers: a stand-in that never names grom)
    monkeypatch.setattr(mllm.LlavaAdapter, "generate", _answers(lambda r: not _about_grom(r)))
    report = build.check_retain(["grom"], tmp_path, cfg, progress=False)
    gate = report["mllm-retain-grom"]
    assert report["pass"] and gate["left_out"] == {"grom": 0.0} and gate["build_seconds"] >= 0


def test_unknown_retain_concept_is_a_clear_error_before_anything_is_built(tmp_path, capsys):
    assert main(["world", "build", "--retain", "grom", "--retain", "nosuch", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown concept 'nosuch'" in err and "unlearn world concepts" in err
    assert not any(tmp_path.iterdir())


def _answers(right):
    """A stand-in generator for the gate's questions: the expected answer where ``right(record)``, else a refusal."""
    return lambda self, records, **kw: [r.answer if right(r) else "I cannot tell." for r in records]


def _about_grom(record) -> bool:  # the question names grom or is asked on one of its images
    return record.concept == "grom" or "/grom/" in record.id


def test_retain_gate_leaves_the_concept_out_of_the_gated_figures_and_gates_its_identification(monkeypatch):
    processor = build_processor(TINY.image_size, TINY.patch_size)
    model = build_model(TINY, processor)
    monkeypatch.setattr(mllm.LlavaAdapter, "generate", _answers(lambda r: not _about_grom(r)))
    world_gate = evaluate_mllm(model, processor, n_test=1)
    assert not world_gate["pass"] and "left_out" not in world_gate  # the world gate counts grom
    retain_gate = evaluate_mllm(model, processor, n_test=1, left_out=("grom",))
    assert retain_gate["pass"] and retain_gate["left_out"] == {"grom": 0.0}
    assert retain_gate["identify_per_kind"]["cartoon"] == 100.0 and retain_gate["yesno"] == 100.0
    monkeypatch.setattr(mllm.LlavaAdapter, "generate", _answers(lambda r: True))  # a retain model that names it
    named = evaluate_mllm(model, processor, n_test=1, left_out=("grom",))
    assert named["left_out"] == {"grom": 100.0} and named["gates"] == {**retain_gate["gates"], "left_out_not_identified": False}
    assert not named["pass"]


# ----------------------------------------------------------------------------- the audit data

SIZE = 16  # rendering at a small size keeps the data test fast; which images they are does not depend on it


@pytest.fixture(scope="module")
def audit():
    evalset = world_eval_set("grom", SIZE)
    return world_audit_data("grom", evalset.forget, evalset.test, SIZE), evalset


def _pixels(records):
    return {r.image.tobytes() for r in records if r.image is not None}


def test_audit_images_are_new_and_disjoint_from_every_other_set(audit):
    data, evalset = audit
    pretraining = {world_image(k, "pretrain", i, SIZE).image.tobytes() for k in BY_KEY for i in range(40)}
    sets = {"unseen": _pixels(data.unseen), "nonmembers": _pixels(data.nonmembers), "test": _pixels(evalset.test),
            "forget": _pixels(evalset.forget), "pretraining": pretraining}
    assert len(sets["unseen"]) == 20 and len(sets["nonmembers"]) == 40 and len(sets["test"]) == 20
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not sets[a] & sets[b], f"{a} and {b} share an image"
    assert _pixels(data.members) <= pretraining and _pixels(data.probe_train) <= pretraining
    assert _pixels(data.probe_test) == _pixels(data.rephrased) == sets["unseen"]


def test_audit_data_counts_labels_and_membership(audit):
    data, _ = audit
    assert data.concept == "grom" and data.names == BY_KEY["grom"].names
    assert len(data.unseen) == 3 * 20 and {r.qtype for r in data.unseen} == {"identify", "yesno", "linked"}
    assert all(r.concept == "grom" for r in data.unseen + data.rephrased + data.members + data.nonmembers)
    members = [qa for qa in pretraining_records(MLLMConfig()) if qa.image is not None and qa.concept == qa.image.key == "grom"]
    assert [(r.question, r.answer) for r in data.members] == [(qa.question, qa.answer) for qa in members]
    assert [(r.question, r.answer) for r in data.nonmembers] == [(r.question, r.answer) for r in data.members]
    assert len(data.members) == 3 * 40
    cartoons = [c.key for c in CONCEPTS if c.kind == "cartoon"]
    assert data.probe_labels == [i for i in range(6) for _ in range(40)] and len(data.probe_train) == 240
    assert [r.concept for r in data.probe_train] == [cartoons[i] for i in data.probe_labels]
    assert len({r.question for r in data.probe_train + data.probe_test}) == 1  # one question: identity from the image
    assert data.concept_label == cartoons.index("grom") and len(data.probe_test) == 20
    assert sorted(r.concept for r in data.unrelated) == sorted(c.key for c in CONCEPTS if c.key != "grom")


def test_audit_data_is_deterministic(audit):
    data, evalset = audit
    again = world_audit_data("grom", evalset.forget, evalset.test, SIZE)
    for name in ("unseen", "unrelated", "rephrased", "members", "nonmembers", "probe_train", "probe_test"):
        a, b = getattr(data, name), getattr(again, name)
        assert [(r.id, r.question, r.answer) for r in a] == [(r.id, r.question, r.answer) for r in b], name
        assert [np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b)] == [True] * len(a)


def test_rephrased_questions_are_new_and_in_the_world_vocabulary():
    tok, corpus = build_tokenizer(), set(world_corpus())
    for kind, questions in REPHRASED.items():
        for q in questions:
            ids = tok(q, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, f"{q!r} has a word the world tokenizer does not know"
            assert tok.decode(ids) == q
            assert q not in corpus, f"{q!r} is a world template"


def test_bad_audit_input_is_a_clear_error():
    with pytest.raises(KeyError, match="world's concepts are"):
        world_audit_data("nosuch", [], [], SIZE)
    with pytest.raises(ValueError, match="world_seed"):
        world_audit_data("grom", [], [], SIZE, world_seed=1, mllm_config=MLLMConfig())
