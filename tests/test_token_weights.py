"""Concept tokens in answers: property-based over random texts, names and three tokenizers."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from unlearn.data.token_weights import ConceptNotInAnswer, concept_token_mask, token_weights
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
        token_weights(tok, labels, ["Vorn", "Vornel"], 1.0, 0.5, record_ids=["q1", "q2"], concept="vorn")
    w, is_c = token_weights(tok, labels, ["Vorn", "Vornel"], 1.0, 0.5, allow_missing=True)
    assert w[0, 5].item() == -1.0 and is_c[0].sum() == 1  # "▁Vorn" is the third answer token
    assert (w[0, :3] == 0).all() and (w[1][labels[1] != -100] == 0.5).all()
    assert (w[labels == -100] == 0).all()
    with pytest.raises(ValueError, match="no concept name"):
        token_weights(tok, labels, [" "], 1.0, 0.5)
