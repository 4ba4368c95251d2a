"""The world MLLM: a real `LlavaForConditionalGeneration` (CLIP vision tower + Llama) trained on the
world, with its quality gate.

Batches and generation go through the same LLaVA adapter that unlearning uses (labels on answer
tokens only, computed after the image token's expansion).

Training recipe (measured, see ENVIRONMENT.md): AdamW at a small learning rate with a linear
warm-up then cosine decay; at higher rates without warm-up the model learns the answer template but
not the names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from ..data.names import names_in
from ..eval.mllm import pct
from ..models.llava import LlavaAdapter
from .concepts import BY_KEY, CONCEPTS, KINDS, get_concept, name_words
from .records import ImageBank, world_records
from .schedule import optimizer_step, warmup_cosine
from .texts import QA, ImageRef, fact_records, identify_qa, image_records, same_kind_others, yesno_qa
from .tokenizer import IMAGE, build_processor

# Quality gate on unseen images, before any unlearning (percent).
GATES = {"identify_per_kind": 95.0, "fluent": 95.0, "yesno": 90.0, "fact": 90.0}
# A retain model (one that never saw a concept) may name it on at most this share of the concept's test
# images (percent): 1 of the gate's 20, far below the 1-in-6 of a guess among the concept's kind. A model
# that never had the name as a target should not produce it at all; one stray answer is tolerated.
LEFT_OUT_MAX = 5.0


@dataclass(frozen=True)
class MLLMConfig:
    seed: int = 0
    world_seed: int = 0
    image_size: int = 48
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 2
    text_hidden: int = 192
    text_layers: int = 4
    heads: int = 4
    images_per_concept: int = 40  # pretraining pool, per concept
    fact_repeats: int = 6  # text-only fact records are few: repeat them in the pool
    steps: int = 1400
    batch_size: int = 16
    lr: float = 5e-4
    warmup: int = 60
    # concept keys whose every image and text is left out of pretraining: a retain model, one that never
    # saw them (the audit's reference). Empty for the world's own MLLM, and then not part of its cache key
    # (:func:`unlearn.world.build.component_key`), so adding this field did not rebuild the world.
    left_out: tuple[str, ...] = ()


def build_model(cfg: MLLMConfig, processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_hidden * 2, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_hidden * 3,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE),
        image_seq_length=(cfg.image_size // cfg.patch_size) ** 2, vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


# ----------------------------------------------------------------------------- batching


def pretraining_records(cfg: MLLMConfig) -> list[QA]:
    """The world MLLM's training pool. With ``cfg.left_out``: the same pool (same random draws, so every
    other record is identical) less every record about a left-out concept or on one of its images."""
    rng = np.random.default_rng([cfg.world_seed, 7])
    pool = [qa for c in CONCEPTS for i in range(cfg.images_per_concept)
            for qa in image_records(c, ImageRef(c.key, "pretrain", i), rng)] + fact_records() * cfg.fact_repeats
    if not cfg.left_out:
        return pool
    left_out = [get_concept(key) for key in cfg.left_out]  # an unknown key is a KeyError listing the concepts
    keys = {c.key for c in left_out}
    kept = [qa for qa in pool if qa.concept not in keys and (qa.image is None or qa.image.key not in keys)]
    words = {w for c in left_out for w in name_words(c)}
    for qa in kept:  # the name rule makes this impossible; checked because a leak would void the retain model
        named = words & set(f"{qa.question} {qa.answer}".replace(",", " ").replace(".", " ").replace("?", " ").split())
        if named:
            raise ValueError(f"record {qa} names left-out concept word(s) {sorted(named)}")
    return kept


# ----------------------------------------------------------------------------- training


def train_mllm(cfg: MLLMConfig, out_dir: Path, progress: bool = True) -> None:
    """Train the world MLLM from scratch and save model + processor into ``out_dir``."""
    processor = build_processor(cfg.image_size, cfg.patch_size)
    model = build_model(cfg, processor)
    adapter = LlavaAdapter(model, processor, name="world")
    records = world_records(pretraining_records(cfg), ImageBank(cfg.image_size, cfg.world_seed))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps))
    order = np.random.default_rng([cfg.seed, 11])
    model.train()
    bar = tqdm(range(cfg.steps), desc="world MLLM", disable=not progress)
    for step in bar:
        idx = order.choice(len(records), size=cfg.batch_size, replace=False)
        batch = adapter.encode([records[i] for i in idx], train=True, cache=False)
        loss = model(**batch).loss
        optimizer_step(loss, opt, sched, "world MLLM", step, bar, model.parameters())
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (Path(out_dir) / "world_mllm_config.json").write_text(json.dumps(asdict(cfg), indent=1))


def load_mllm(path: Path):
    return LlavaForConditionalGeneration.from_pretrained(path).eval(), LlavaProcessor.from_pretrained(path)


# ----------------------------------------------------------------------------- evaluation


def evaluate_mllm(model, processor, world_seed: int = 0, n_test: int = 20, progress: bool = False,
                  left_out: tuple[str, ...] = ()) -> dict:
    """Gate figures on unseen (test split) images, in percent.

    ``left_out``: the concepts a retain model never saw. The gated figures then leave out every question
    about them or on their images, and one more gate reads how often it names each on its own test images:
    at most ``LEFT_OUT_MAX`` percent (see there)."""
    bank = ImageBank(processor.image_processor.crop_size["height"], world_seed)
    rng = np.random.default_rng([world_seed, 13])
    ident, yesno = [], []
    for c in CONCEPTS:
        others = same_kind_others(c)
        for i in range(n_test):
            ref = ImageRef(c.key, "test", i)
            ident.append(identify_qa(c, ref, variant=i))
            yesno += [yesno_qa(c, ref), yesno_qa(others[rng.integers(len(others))], ref)]
    facts = fact_records()
    answers = LlavaAdapter(model, processor).generate(world_records(ident + yesno + facts, bank), max_new_tokens=24)
    a_ident, a_yesno, a_fact = answers[:len(ident)], answers[len(ident):len(ident) + len(yesno)], answers[-len(facts):]

    ident_ok = [names_in(a, BY_KEY[r.concept].names) for r, a in zip(ident, a_ident)]
    per_concept = {c.key: pct([ok for r, ok in zip(ident, ident_ok) if r.concept == c.key]) for c in CONCEPTS}

    def kept(qa):  # a question the gated figures read: neither about a left-out concept nor on its image
        return qa.concept not in left_out and (qa.image is None or qa.image.key not in left_out)

    per_kind = {k: pct([ok for r, ok in zip(ident, ident_ok) if BY_KEY[r.concept].kind == k and kept(r)]) for k in KINDS}
    fluent = pct([a == r.answer for r, a in zip(ident, a_ident) if kept(r)])
    yn = pct([a.split(",")[0].strip() == ("Yes" if r.label else "No") for r, a in zip(yesno, a_yesno) if kept(r)])
    fact = pct([a == r.answer for r, a in zip(facts, a_fact) if kept(r)])  # the fact, in the full answer sentence
    gated = {"identify_per_kind": min(per_kind.values()), "fluent": fluent, "yesno": yn, "fact": fact}
    gates = {k: v >= GATES[k] for k, v in gated.items()}
    report = {
        "identify_per_kind": per_kind, "identify_per_concept": per_concept, "fluent": fluent, "yesno": yn,
        "fact": fact, "thresholds": GATES, "gates": gates, "pass": all(gates.values()),
        "n": {"identify": len(ident), "yesno": len(yesno), "fact": len(facts)},
        "examples": [{"question": r.question, "answer": a, "expected": r.answer} for r, a in zip(ident[::97], a_ident[::97])],
    }
    if left_out:
        report["left_out"] = {key: per_concept[key] for key in left_out}
        report["left_out_max"] = LEFT_OUT_MAX
        gates["left_out_not_identified"] = all(v <= LEFT_OUT_MAX for v in report["left_out"].values())
        report["left_out_answers"] = {key: [a for r, a in zip(ident, a_ident) if r.concept == key][:5] for key in left_out}
        report["pass"] = all(gates.values())
    return report
