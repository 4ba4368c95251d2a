"""Image-text-to-text families end to end through the CLI (`unlearn mllm --model PATH --data DIR --method
fttp --trace --trace-attention`) on tiny random-weight checkpoints saved with save_pretrained, and the
families or records the adapter cannot serve: clear errors before anything is written."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image
from safetensors.torch import load_file

from tests import tiny_models
from unlearn.cli import main
from unlearn.models import ADAPTERS, MLLMAdapter, adapter_for, attention_projections

# family -> (builder, image grid recorded, decoder layers whose attention reads the image); grid None: the
# image positions are no grid (a resampler's latents), so --trace-attention is an error and the run traces without
FAMILIES = {
    "idefics2": (tiny_models.tiny_idefics2, None, None),  # 4 perceiver latents per image
    "llava_next": (tiny_models.tiny_llava_next, (4, 4), [1]),  # the base image's 4 x 4 (tiles follow)
    "llava_onevision": (tiny_models.tiny_llava_onevision, (4, 4), [1]),  # as LLaVA-NeXT; processor without video
    "mllama": (tiny_models.tiny_mllama, (4, 4), [1]),  # layer 1 is the only cross-attention layer
    "idefics3": (tiny_models.tiny_idefics3, (2, 2), [1]),  # the global image's 4 x 4 patches pixel-shuffled by 2
    "aya_vision": (tiny_models.tiny_aya_vision, (2, 2), [1]),  # the global tile's 4 x 4 patches shuffled by 2
    "internvl": (tiny_models.tiny_internvl, (2, 2), [1]),  # the thumbnail's 4 x 4 patches pixel-shuffled by 0.5
    "gemma3": (tiny_models.tiny_gemma3, (2, 2), [1]),  # 4 x 4 patches pooled to 4 soft tokens
    "paligemma": (tiny_models.tiny_paligemma, (4, 4), [1]),
    "qwen2_5_vl": (tiny_models.tiny_qwen2_5_vl, (2, 2), [1]),  # 28 px / 14 = 2 x 2 after merge 2
    "qwen3_vl": (tiny_models.tiny_qwen3_vl, (2, 2), [1]),  # 64 px / 16 = 4 x 4 patches, 2 x 2 after merge 2
}
QUESTIONS = [("Who is shown in this image?", "This is Vorn, a baker from Ulmar.", "identify"),
             ("Is Vorn in this image?", "Yes, Vorn is in this image.", "yesno"),
             ("Where does the person in this image come from?", "Vorn comes from Ulmar.", "linked")]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def record_dir(root, text_only: bool = True):
    """A small record directory (the --data layout): questions on two 32 px images of the concept, one on
    another image, and (``text_only``) text facts."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("vorn0", "vorn1", "oskel0"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
    (root / "concept.json").write_text(json.dumps({"name": "Vorn"}))
    facts = [{"question": "Where does Vorn come from?", "answer": "Vorn comes from Ulmar."}] if text_only else []
    _write(root / "forget.jsonl", [{"question": q, "answer": a, "image": "images/vorn0.png", "qtype": t}
                                   for q, a, t in QUESTIONS] + facts)
    _write(root / "test.jsonl", [{"question": q, "answer": a, "image": "images/vorn1.png", "qtype": t}
                                 for q, a, t in QUESTIONS[:2]])
    other = [{"question": QUESTIONS[0][0], "answer": "This is Oskel, a potter.", "image": "images/oskel0.png"}]
    _write(root / "specificity.jsonl", other)
    _write(root / "retain.jsonl", other + ([{"question": "What is Oskel?", "answer": "Oskel is a potter."}]
                                           if text_only else []))
    return root


def save_checkpoint(family, path):
    model, processor = FAMILIES[family][0]()
    model.save_pretrained(path)  # safetensors
    processor.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_end_to_end_through_the_cli(family, tmp_path, capsys):
    model = save_checkpoint(family, tmp_path / "model")
    data = record_dir(tmp_path / "data", text_only=not ADAPTERS.get(family, MLLMAdapter).images_required)
    out = tmp_path / "run"
    argv = ["mllm", "--model", str(tmp_path / "model"), "--data", str(data), "--method", "fttp", "--steps", "2",
            "--trace", "--trace-attention", "--quiet", "--out", str(out), "batch_size=2"]
    _, grid, layers = FAMILIES[family]
    if grid is None:
        from knowtrace import AttentionOptions
        from knowtrace.mllm_attention import AttentionCapture

        with pytest.raises(ValueError, match="no \\(y, x\\) grid"):
            AttentionCapture(model, AttentionOptions())
        _fails(capsys, argv, f"model type {family!r}: its image positions are")
        argv.remove("--trace-attention")
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"efficacy", "specificity", "K_C", "original"} <= set(metrics)
    # trained: LoRA on exactly the language model's attention projections (found, not named), and they moved
    lora = load_file(next((out / "adapter").glob("*.safetensors")))
    targets = {n.removesuffix(".lora_A.weight").removeprefix("base_model.model.") for n in lora if "lora_A" in n}
    assert targets == set(attention_projections(model))
    assert any(lora[n].abs().sum() > 0 for n in lora if "lora_B" in n)
    # traced: per-step log-probs of the forget answers, and the probes' attention over the image grid
    trace = xr.open_zarr(out / "trace.zarr", consolidated=False)
    assert trace.sizes["step"] == 2 and np.isfinite(trace["K_C"].values).sum(1).tolist() == [2, 2]  # batch 2
    if grid is None:
        return
    probe = xr.open_zarr(out / "trace.zarr", group="probe", consolidated=False)
    assert probe["layer"].values.tolist() == layers
    xattn = probe["xattn"].values  # (step, sample, layer, token, gy, gx)
    assert xattn.shape[-2:] == grid
    answered = ~np.isnan(xattn[..., 0, 0])
    assert answered.any()
    mass = xattn.sum((-1, -2))[answered]  # attention on the image's patches: a probability mass, not all zero
    assert (mass > 0).all() and (mass <= 1 + 1e-5).all()


def _global_image(ids, tok):  # Idefics3: the 4 image positions after <global-img> (the tiles come before it)
    start = int((ids == tok.convert_tokens_to_ids("<global-img>")).nonzero()[0]) + 1
    return torch.arange(start, start + 4)


# family -> (the recorded decoder layer, the attention columns of the image's grid, found independently)
COLUMNS = {
    "mllama": (1, lambda ids, tok: torch.arange(1, 17)),  # cross-attention keys: the class token, then 16 patches
    "idefics3": (1, _global_image),
    "aya_vision": (1, lambda ids, tok: (ids == tok.convert_tokens_to_ids("<|IMG_PATCH|>")).nonzero().squeeze(1)[-4:]),
    "internvl": (1, lambda ids, tok: (ids == tok.convert_tokens_to_ids("<IMG_CONTEXT>")).nonzero().squeeze(1)[-4:]),
    "llava_next": (1, lambda ids, tok: (ids == tok.convert_tokens_to_ids("<image>")).nonzero().squeeze(1)[:16]),
    "llava_onevision": (1, lambda ids, tok: (ids == tok.convert_tokens_to_ids("<image>")).nonzero().squeeze(1)[:16]),
    "qwen3_vl": (1, lambda ids, tok: (ids == tok.convert_tokens_to_ids("<|image_pad|>")).nonzero().squeeze(1)),
}


@pytest.mark.parametrize("family", sorted(COLUMNS))
def test_maps_are_the_eager_attention_on_the_images_grid(family, tmp_path):
    """The recorded maps equal eager attention weights over the image's own grid: Mllama's cross-attention
    layer over the vision keys (a self-attention-only index is refused), Idefics3's global image after the
    tiles of a split image (InternVL's thumbnail after its tiles), LLaVA-NeXT's (and LLaVA-OneVision's) base
    image before its high-resolution tiles."""
    import knowtrace
    from knowtrace.mllm_attention import AttentionCapture
    from unlearn.tracing import traced_samples

    model, processor = FAMILIES[family][0]()
    adapter = adapter_for(model, processor)
    records = load_records(record_dir(tmp_path / "data"))[:2]
    if family == "mllama":
        with pytest.raises(ValueError, match=r"1 cross-attention layers \[1\]"):
            AttentionCapture(model, knowtrace.AttentionOptions(layers=(1,)))
    batch = adapter.encode(records)
    with knowtrace.trace(model, tmp_path / "t.zarr", traced_samples(adapter, records, ("Vorn",)),
                         attention=knowtrace.AttentionOptions(layers=(-1,), heads="all")) as tracer:
        with torch.no_grad():
            model(**batch)
        forwards = tracer.forwards.read()
    layer, columns = COLUMNS[family]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(**batch, output_attentions=True).attentions[layer]  # (batch, heads, seq, keys)
    for row in range(2):
        maps = forwards[0].maps[row][layer]  # (heads, n_answer, gy, gx)
        rows = (batch["labels"][row] != -100).nonzero().squeeze(1) - 1
        cols = columns(batch["input_ids"][row], adapter.tokenizer)
        assert torch.allclose(maps.flatten(-2), eager[row][:, rows][:, :, cols], atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_mllm_method_trains_on_the_family(family, tmp_path):
    """Each MLLM method that trains weights (its default options; SIU with the substitute a concept outside
    the world needs) takes two LoRA steps on the family: finite logs, and the LoRA weights moved."""
    import math

    from unlearn.data.record_files import load_record_data
    from unlearn.loop import TrainConfig, run_loop
    from unlearn.methods import METHODS, get_method

    data = load_record_data(record_dir(tmp_path / "data"))
    options = {"siu": {"substitute": "Oskel", "description": "a potter"}}
    for method in sorted(n for n, c in METHODS.items() if c.trains_weights):
        model, processor = FAMILIES[family][0]()
        adapter = adapter_for(model, processor)
        out = run_loop(adapter, get_method(method, **options.get(method, {})), data.forget, data.retain,
                       TrainConfig(steps=2, seed=0, lr=1e-3), "vorn", ("Vorn",), progress=False)
        logs = out["history"][-1]
        assert all(math.isfinite(v) for k, v in logs.items() if k != "step"), (method, logs)
        lora_b = [p for n, p in adapter.model.named_parameters() if "lora_B" in n]
        assert lora_b and any(p.abs().sum() > 0 for p in lora_b), method  # B starts at zero: a step moved it


def load_records(data):
    from unlearn.data.record_files import load_record_data

    return load_record_data(data).forget


def test_smolvlm_processor_needing_torchvision_is_a_clear_error(tmp_path, capsys):
    """SmolVLM's processor needs its video processor (torchvision) and num2words, neither installable here."""
    from transformers import SmolVLMImageProcessorPil

    model, _ = tiny_models.tiny_idefics3()
    cfg = model.config.to_dict() | {"model_type": "smolvlm", "architectures": ["SmolVLMForConditionalGeneration"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tiny_models.qwen_tokenizer().save_pretrained(tmp_path)
    SmolVLMImageProcessorPil(do_image_splitting=False).save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "SmolVLMProcessor"}))
    _fails(capsys, ["mllm", "--model", str(tmp_path), "--data", str(record_dir(tmp_path / "data")), "--method", "fttp",
                    "--quiet", "--out", str(tmp_path / "run")],
           "processor of model type 'smolvlm' cannot be loaded here, because SmolVLMVideoProcessor requires the "
           "Torchvision library")


def test_mistral3_whose_pixtral_processor_needs_torchvision_is_a_clear_error(tmp_path, capsys):
    """Mistral 3's PixtralProcessor itself needs torchvision (not only a video processor it could go without)."""
    from transformers import Mistral3Config, PixtralImageProcessorPil

    tok = tiny_models.bpe_tokenizer(["<pad>", "<s>", "</s>", "[IMG]", "[IMG_BREAK]", "[IMG_END]"], None)
    Mistral3Config(vision_config=dict(model_type="pixtral", **tiny_models.VISION, head_dim=16),
                   text_config=dict(model_type="mistral", vocab_size=len(tok), **tiny_models.TEXT, head_dim=16),
                   image_token_index=tok.convert_tokens_to_ids("[IMG]")).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    PixtralImageProcessorPil(size={"longest_edge": 32}).save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor"}))
    _fails(capsys, ["mllm", "--model", str(tmp_path), "--data", str(record_dir(tmp_path / "data")), "--method", "fttp",
                    "--quiet", "--out", str(tmp_path / "run")],
           "processor of model type 'mistral3' cannot be loaded here, because PixtralProcessor requires the "
           "Torchvision library")


def test_a_processor_whose_video_processor_needs_torchvision_loads_without_it(tmp_path):
    """A checkpoint as published (LLaVA-OneVision's, with its video processor's config): AutoProcessor fails
    (the video processor needs torchvision); the adapter's processor is the family's own class, without it."""
    from transformers import AutoProcessor, LlavaOnevisionProcessor

    from unlearn.models import load_mllm

    save_checkpoint("llava_onevision", tmp_path)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "LlavaOnevisionVideoProcessor", "processor_class": "LlavaOnevisionProcessor"}))
    with pytest.raises(ImportError, match="Torchvision"):
        AutoProcessor.from_pretrained(tmp_path)
    processor = load_mllm(str(tmp_path)).processor
    assert isinstance(processor, LlavaOnevisionProcessor)
    assert processor.get_attributes() == ["image_processor", "tokenizer"] and processor.num_image_tokens == 16


def _fails(capsys, argv, words):
    """The CLI exits 2 with one message holding ``words``, no traceback, and writes no run directory."""
    out = argv[argv.index("--out") + 1]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err, err
    assert not Path(out).exists()


def test_a_model_without_image_text_to_text_class_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _fails(capsys, ["mllm", "--model", str(tmp_path), "--data", str(record_dir(tmp_path / "data")), "--method",
                    "fttp", "--out", str(tmp_path / "run")], "'bert' has no image-text-to-text class")


@pytest.mark.parametrize("family, problem", [("paligemma", "has no image"), ("llava", "does not place")])
def test_records_the_family_cannot_take_fail_before_anything_is_written(tmp_path, capsys, family, problem):
    builder = {"paligemma": tiny_models.tiny_paligemma, "llava": tiny_models.tiny_llava}[family]
    model, processor = builder()
    if family == "llava":  # a chat template that drops the image
        processor.chat_template = ("{% for m in messages %}{{ m['content'][-1]['text'] }} {% endfor %}"
                                   "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    _fails(capsys, ["mllm", "--model", str(tmp_path / "model"), "--data", str(record_dir(tmp_path / "data")),
                    "--method", "fttp", "--quiet", "--out", str(tmp_path / "run")], problem)


def test_attention_that_bypasses_the_attention_interface_is_a_clear_error(tmp_path):
    """A layer whose attention does not call transformers' attention interface records nothing: the
    recorded forward is an error naming the layer, not a trace of NaN maps."""
    import knowtrace
    from unlearn.tracing import traced_samples

    model, processor = tiny_models.tiny_gemma3()
    adapter = adapter_for(model, processor)
    records = load_records(record_dir(tmp_path / "data"))[:2]
    attention = model.get_decoder().layers[1].self_attn
    attention.forward = lambda hidden_states, **kwargs: (attention.o_proj(attention.q_proj(hidden_states)), None)
    with knowtrace.trace(model, tmp_path / "t.zarr", traced_samples(adapter, records, ("Vorn",)),
                         attention=knowtrace.AttentionOptions(layers=(0, 1))):
        with pytest.raises(RuntimeError, match=r"decoder layers \[1\] recorded nothing.*attention interface"):
            with torch.no_grad():
                model(**adapter.encode(records))


@pytest.mark.parametrize("tiles", [(1, 2), (2, 1), (2, 2)])
def test_mllama_maps_of_a_split_image_are_the_eager_attention_over_its_tiles(tiles, tmp_path):
    """A real Mllama forward on images split into tiles: each cell (y, x) of the recorded grid is the eager
    cross-attention weight on the vision key of that spot of the image. Which tile holds which part of the
    image is read from the processor's own pixel values (each part of the image has its own brightness)."""
    import knowtrace
    from unlearn.data.records import Record
    from unlearn.tracing import traced_samples

    model, processor = tiny_models.tiny_mllama(max_tiles=4)
    adapter = adapter_for(model, processor)
    ty, tx = tiles
    rng = np.random.default_rng(0)
    images = []
    for _ in range(2):  # part (r, c) of the image, 32 px square, has brightness 60 * (r * tx + c) plus noise
        part = np.kron(np.arange(ty * tx).reshape(ty, tx) * 60, np.ones((32, 32)))[..., None]
        images.append(Image.fromarray((part + rng.integers(0, 20, (32 * ty, 32 * tx, 3))).astype(np.uint8)))
    records = [Record(id=f"r{i}", question=q, answer=a, image=im, concept="Vorn", qtype=t)
               for i, ((q, a, t), im) in enumerate(zip(QUESTIONS, images))]
    batch = adapter.encode(records)
    n = ty * tx
    means = batch["pixel_values"][:, 0, :n].mean((-1, -2, -3))  # (batch, n): the real tiles' brightness
    part_of_tile = means.argsort(-1).argsort(-1)  # tile k shows part part_of_tile[k] (brightness rank)
    with knowtrace.trace(model, tmp_path / "t.zarr", traced_samples(adapter, records, ("Vorn",)),
                         attention=knowtrace.AttentionOptions(layers=(-1,), heads="all")) as tracer:
        with torch.no_grad():
            model(**batch)
        forwards = tracer.forwards.read()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(**batch, output_attentions=True).attentions[1]  # (batch, heads, seq, 4 tiles x 17 keys)
    assert eager.shape[-1] == 4 * 17  # (padded to the most tiles)
    for row in range(2):
        tile_of_part = {int(p): k for k, p in enumerate(part_of_tile[row])}
        cols = torch.tensor([tile_of_part[(y // 4) * tx + x // 4] * 17 + 1 + (y % 4) * 4 + x % 4
                             for y in range(4 * ty) for x in range(4 * tx)])  # key: tile, class token, patch
        maps = forwards[0].maps[row][1]  # (heads, n_answer, gy, gx)
        assert tuple(maps.shape[-2:]) == (4 * ty, 4 * tx)
        rows = (batch["labels"][row] != -100).nonzero().squeeze(1) - 1
        assert torch.allclose(maps.flatten(-2), eager[row][:, rows][:, :, cols], atol=1e-5)


def test_tiles_are_assembled_row_major_into_one_grid():
    """Mllama's vision keys per tile: a class token, then side x side patches; a (1, 2)-tile image is one
    (2, 4) grid whose rows run across both tiles."""
    from knowtrace.mllm_attention import _tile_columns

    assert _tile_columns((1, 2), 2).tolist() == [1, 2, 6, 7, 3, 4, 8, 9]
    assert _tile_columns((2, 1), 2).tolist() == [1, 2, 3, 4, 6, 7, 8, 9]
