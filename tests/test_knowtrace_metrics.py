"""knowtrace's token log-probs (against an independent forward + log_softmax) and K_C / K_N."""

import math

import pytest
import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration)

from knowtrace.knowledge import LOGP_EPS, mllm_knowledge, sd_knowledge
from knowtrace.logprobs import answer_logprobs, token_logprobs

VOCAB, IMAGE_ID, PAD = 64, 63, 0


def _independent(model, inputs, labels):
    """Reference: a separate forward pass, full log_softmax, explicit loops."""
    with torch.no_grad():
        logp = torch.log_softmax(model(**inputs).logits.double(), -1)
    ref = torch.full(labels.shape, float("nan"), dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != -100:
                ref[b, t] = logp[b, t - 1, labels[b, t]]
    return ref


def _batch(n_image_tokens, image_id, padding_side):
    """3 samples of different lengths, padded; labels on the last tokens (the "answer") only."""
    g = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for answer_len, prompt_len in ((5, 3), (2, 6), (7, 1)):
        prompt = torch.randint(1, 60, (prompt_len,), generator=g)
        answer = torch.randint(1, 60, (answer_len,), generator=g)
        ids = torch.cat([prompt[:1], torch.full((n_image_tokens,), image_id), prompt[1:], answer])
        lab = torch.cat([torch.full((len(ids) - answer_len,), -100), answer])
        rows.append(ids)
        labels.append(lab)
    width = max(len(r) for r in rows)
    ids = torch.full((3, width), PAD)
    lab = torch.full((3, width), -100)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[i, sl], lab[i, sl], mask[i, sl] = r, l, 1
    return ids, mask, lab


def _tiny_llava():
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=16, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, pad_token_id=PAD),
        image_token_index=IMAGE_ID, image_seq_length=4, vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(cfg).eval()


def _tiny_qwen2vl():
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                           temporal_patch_size=2),
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1,
                         eos_token_id=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        image_token_id=IMAGE_ID, video_token_id=62, vision_start_token_id=61, vision_end_token_id=60,
    )
    return Qwen2VLForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_llava_logprobs_match_an_independent_computation(padding_side):
    model = _tiny_llava()
    ids, mask, labels = _batch(4, IMAGE_ID, padding_side)  # 16x16 image, patch 8 -> 4 positions
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(3, 3, 16, 16)}
    with torch.no_grad():
        logits = model(**inputs).logits
    got = token_logprobs(logits, labels, chunk_rows=3)  # small chunks: the chunking is exercised
    ref = _independent(model, inputs, labels)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.allclose(got[~torch.isnan(got)].double(), ref[~torch.isnan(ref)], atol=1e-5)
    per_sample = answer_logprobs(got, labels)
    assert [len(x) for x in per_sample] == [5, 2, 7]


def test_qwen2vl_logprobs_match_an_independent_computation():
    model = _tiny_qwen2vl()
    # a 4x4 patch grid merged 2x2 -> 4 image positions per image; pixel rows are flattened patches
    ids, mask, labels = _batch(4, IMAGE_ID, "left")
    grid = torch.tensor([[1, 4, 4]] * 3)
    pixels = torch.randn(3 * 16, 3 * 2 * 2 * 2)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grid,
              "mm_token_type_ids": (ids == IMAGE_ID).long()}  # what Qwen2-VL's processor returns: 1 = image
    with torch.no_grad():
        logits = model(**inputs).logits
    got = token_logprobs(logits, labels)
    ref = _independent(model, inputs, labels)
    assert torch.allclose(got[~torch.isnan(got)].double(), ref[~torch.isnan(ref)], atol=1e-5)


def test_logprobs_chunks_hold_at_most_chunk_elements_logits():
    """A fully labelled sequence with a large vocabulary is gathered in chunks of at most
    ``chunk_elements`` logits (never a (seq x vocab) log-softmax), with the same values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestResult(TorchDispatchMode):  # the largest tensor any operation inside returns
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if torch.is_tensor(t):
                    self.largest = max(self.largest, t.numel())
            return out

    torch.manual_seed(0)
    logits, labels = torch.randn(2, 40, 1000), torch.randint(0, 1000, (2, 40))
    with LargestResult() as seen:
        got = token_logprobs(logits, labels, chunk_elements=5000)  # 5 rows of 1000 logits per chunk
    assert seen.largest <= 5000
    ref = torch.log_softmax(logits.double(), -1)[:, :-1].gather(2, labels[:, 1:, None]).squeeze(2)
    assert torch.isnan(got[:, 0]).all() and torch.allclose(got[:, 1:].double(), ref, atol=1e-5)


def test_logprobs_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))


def test_mllm_knowledge_by_hand():
    nan = float("nan")
    logp = torch.tensor([[nan, math.log(0.5), math.log(0.9), 0.0, nan]])
    concept = torch.tensor([[False, True, False, False, False]])
    k_c, k_n = mllm_knowledge(logp, concept)
    assert torch.allclose(k_c, torch.tensor([-1 / math.log(0.5)]))
    # log p == 0 is clamped: contributes 1 / LOGP_EPS, not infinity
    assert torch.allclose(k_n, torch.tensor([-1 / math.log(0.9) + 1 / LOGP_EPS]))
    k_c, k_n = mllm_knowledge(logp, torch.zeros_like(concept))
    assert k_c.item() == 0.0  # no concept token: empty sum


def test_sd_knowledge_mean_sum_and_empty_group():
    err = torch.tensor([[[0.2, 0.4], [1.0, 1.0]]])
    mask = torch.tensor([[[True, True], [False, False]]])
    k_c, k_n = sd_knowledge(err, mask, lam=2.0)
    assert torch.allclose(k_c, torch.exp(torch.tensor([-2.0 * 0.3]))) and torch.allclose(k_n, torch.exp(torch.tensor([-2.0])))
    k_c, _ = sd_knowledge(err, mask, lam=1.0, reduce="sum")
    assert torch.allclose(k_c, torch.exp(torch.tensor([-0.6])))
    k_c, k_n = sd_knowledge(err, torch.zeros_like(mask))
    assert torch.isnan(k_c).all() and torch.allclose(k_n, torch.exp(-err.mean().reshape(1)))
    with pytest.raises(ValueError, match="reduce"):
        sd_knowledge(err, mask, reduce="max")
