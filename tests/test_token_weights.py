"""Concept tokens in answers: property-based over random texts, names and three tokenizers."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from unlearn.data.names import name_pattern, name_spans, names_in
from unlearn.data.token_weights import ConceptNotInAnswer, concept_flags, concept_token_mask, concept_token_positions
from unlearn.methods.losses import signed_weights
from unlearn.world.concepts import CONCEPTS
from unlearn.world.texts import world_corpus
from unlearn.world.tokenizer import build_tokenizer

# names from letters a-m, filler words from n-z: a filler word can never spell a name
NAME_WORD = st.text(alphabet="abcdefghijklm", min_size=2, max_size=9)
FILLER_WORD = st.text(alphabet="nopqrstuvwxyz", min_size=1, max_size=8)
CASE = st.sampled_from([str.lower, str.upper, str.title, lambda s: s])
PUNCT = st.sampled_from(["", ",", ".", "!", "'s"])


def _bpe(pre, dec, corpus):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer, tok.decoder = pre, dec
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre, pre_tokenizers.ByteLevel) else list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,.!'▁ ")
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>"], initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


CORPUS = world_corpus() + ["abc defg hijk lmab", "nop qrs tuv wxyz", "Abc Defg NOP qrs."] * 20
TOKENIZERS = {
    "gpt2-style byte-level BPE": _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), CORPUS),
    "llama-style metaspace BPE": _bpe(pre_tokenizers.Metaspace(prepend_scheme="first"), decoders.Metaspace(prepend_scheme="first"), CORPUS),
}


@st.composite
def text_with_names(draw):
    """A text of filler words with 1-3 inserted name occurrences; returns text, names, name spans."""
    name = " ".join(draw(st.lists(NAME_WORD, min_size=1, max_size=3)))
    alias = draw(st.one_of(st.none(), NAME_WORD.filter(lambda w: w not in name.split())))
    names = [name] + ([alias] if alias else [])
    pieces, spans, pos = [], [], 0
    n_names = draw(st.integers(1, 3))
    slots = sorted(draw(st.lists(st.integers(0, 6), min_size=n_names, max_size=n_names)))
    words = draw(st.lists(FILLER_WORD, min_size=max(slots) + 1, max_size=8))
    for i, w in enumerate(words):
        for _ in range(slots.count(i)):
            n = draw(CASE)(draw(st.sampled_from(names)))
            sep = " " if pos else ""
            spans.append((pos + len(sep), pos + len(sep) + len(n)))
            pieces.append(sep + n + draw(PUNCT))
            pos += len(pieces[-1])
        piece = (" " if pos else "") + w
        pieces.append(piece)
        pos += len(piece)
    return "".join(pieces), names, spans


@pytest.mark.parametrize("tok_name", sorted(TOKENIZERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=text_with_names())
def test_concept_tokens_are_exactly_the_tokens_overlapping_names(tok_name, case):
    tok = TOKENIZERS[tok_name]
    text, names, spans = case
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    # independent truth: the tokenizer's own offsets against the spans where names were inserted
    # (lone space-marker tokens are left out: their offsets point at the next word's first letter)
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    expected = [any(s < e2 and s2 < e for s2, e2 in spans) for s, e in enc["offset_mapping"]]
    got = concept_token_mask(tok, enc["input_ids"], names)
    keep = [t not in ("▁", "Ġ") for t in tokens]
    assert [g for g, k in zip(got, keep) if k] == [x for x, k in zip(expected, keep) if k], (text, names, tokens)
    assert sum(got) >= len(spans)  # every occurrence marked at least one token


@settings(max_examples=100, deadline=None)
@given(concept=st.sampled_from(CONCEPTS), prefix=st.sampled_from(["This is", "Yes,", "No,", ""]),
       rest=st.sampled_from([" is in this image.", ", a baker from Ulmar.", " loves tea."]))
def test_world_tokenizer_names_are_their_token_counts(concept, prefix, rest):
    tok = build_tokenizer()
    text = (prefix + " " if prefix else "") + concept.name + rest
    ids = tok(text, add_special_tokens=False)["input_ids"]
    flags = concept_token_mask(tok, ids, concept.names)
    assert sum(flags) == len(concept.name.split())
    marked = [t for t, f in zip(tok.convert_ids_to_tokens(ids), flags) if f]
    assert [t.lstrip("▁") for t in marked] == concept.name.split()


def test_signed_weights_and_missing_concept_error():
    tok = build_tokenizer()
    answers = ["This is Vorn, a baker from Ulmar.", "Ulmar is in this image."]
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    width = max(map(len, ids)) + 3
    labels = torch.full((2, width), -100)
    for r, row in enumerate(ids):
        labels[r, 3:3 + len(row)] = torch.tensor(row)
    with pytest.raises(ConceptNotInAnswer, match=r"record q2.*'Ulmar is in this image\.'.*'vorn'.*allow_missing"):
        concept_flags(tok, labels, ["Vorn", "Vornel"], record_ids=["q1", "q2"], concept="vorn")
    is_c = concept_flags(tok, labels, ["Vorn", "Vornel"], allow_missing=True)
    w = signed_weights(is_c, 1.0, 0.5, scored=labels != -100)
    assert w[0, 5].item() == -1.0 and is_c[0].sum() == 1  # "▁Vorn" is the third answer token
    assert (w[0, :3] == 0).all() and (w[1][labels[1] != -100] == 0.5).all()
    assert (w[labels == -100] == 0).all()
    with pytest.raises(ValueError, match="no concept name"):
        concept_flags(tok, labels, [" "])


def test_names_are_found_by_the_script_rule():
    """Word boundaries only where the script uses them: Latin names need them, Chinese/Japanese ones do not."""
    assert name_spans("我是李明。", ["李明"]) == [(2, 4)] and names_in("これはヴォルンです。", ["ヴォルン"])
    assert names_in("我是Vorn。", ["Vorn"])  # a Latin name inside Chinese text: no space to require around it
    assert not names_in("korvexes everywhere", ["Korvex"]) and not names_in("Vornel", ["Vorn"])
    assert not names_in("x_korvex", ["Korvex"]) and not names_in("Korvex2", ["Korvex"])
    assert names_in("the KORVEX logo.", ["korvex"]) and names_in("Vorn's hat", ["Vorn"])
    assert not names_in("anything", [" ", ""])  # blank names never match
    # overlapping aliases: spans keep every occurrence, the pattern substitutes the longest at a position
    assert name_spans("Oskel Brin Tavo", ["Oskel Brin", "Brin Tavo"]) == [(0, 10), (6, 15)]
    assert name_pattern(["Oskel Brin", "Oskel Brin Tavo"]).sub("X", "Oskel Brin Tavo, oskel brin.") == "X, X."


def test_concept_tokens_of_an_answer_without_spaces():
    """Qwen2-VL answering in Chinese: byte-level BPE splits each character into byte tokens; the
    name's bytes are the concept's tokens."""
    tok = TOKENIZERS["gpt2-style byte-level BPE"]
    ids = tok("我是李明。", add_special_tokens=False)["input_ids"]
    flags = concept_token_mask(tok, ids, ["李明"])
    per_char = [len(ch.encode()) for ch in "我是李明。"]
    assert len(ids) == sum(per_char)  # one token per byte: the names live inside multi-byte pieces
    assert flags == [False] * 6 + [True] * 6 + [False] * 3


def test_sd_prompt_positions_are_bpe_safe():
    """FMN's tokens: the name's ids tokenized alone ('V', 'or', 'n') are not in the prompt ('ĠV', 'or', 'n')."""
    tok = copy.deepcopy(TOKENIZERS["gpt2-style byte-level BPE"])
    tok.model_max_length = 77  # a text encoder's context, as SD's CLIP tokenizer has
    prompt = "a picture of Vorn"
    ids, alone = tok(prompt)["input_ids"], tok("Vorn", add_special_tokens=False)["input_ids"]
    assert not any(ids[s:s + len(alone)] == alone for s in range(len(ids)))
    positions = concept_token_positions(tok, prompt, ["Vorn"])
    assert positions == list(range(len(ids) - 3, len(ids))) and tok.decode([ids[i] for i in positions]) == " Vorn"
    with pytest.raises(ValueError, match="none of the concept's names"):
        concept_token_positions(tok, "a picture of Vornel", ["Vorn"])


def test_signed_weights_from_flags():
    flags = torch.tensor([[True, False, False], [False, True, False]])
    scored = torch.tensor([[True, True, False], [True, True, True]])
    w = signed_weights(flags, 2.0, 0.5, scored=scored)
    assert w.tolist() == [[-2.0, 0.5, 0.0], [0.5, -2.0, 0.5]] and w.dtype == torch.float32
    # SD: a {0, 1} latent mask gives exactly the weights -alpha * M + beta * (1 - M)
    mask = (torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    assert torch.equal(signed_weights(mask, 0.8, 0.5), -0.8 * mask + 0.5 * (1 - mask))
