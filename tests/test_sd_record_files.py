"""SD record directories (`unlearn sd --data DIR`): a world concept exported with `unlearn world
export-sd` gives the same metrics as the world run; a plain (non-world) StableDiffusionPipeline runs
end to end through the CLI with a local tiny CLIP classifier (FD named in CLIP's feature space) and
is re-evaluated by `unlearn eval`; bad directories fail with file and line before anything is written."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.test_sd_run import tiny_world_sd  # noqa: F401  (fixture)
from tests.test_world_sd import TINY_SD
from tests.tiny_models import tiny_clip
from unlearn.cli import main
from unlearn.data.sd_record_files import load_sd_record_data
from unlearn.run_sd import run_sd
from unlearn.world.sd import load_sd

FAST = ["--eval-seeds", "2", "--fd-seeds", "2", "--retained", "blip", "korvex", "--quiet"]


@pytest.fixture(scope="module")
def exported(tiny_world_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "vorn"
    assert main(["world", "export-sd", "--concept", "vorn", "--out", str(out), "--images", "2", "--references", "2",
                 "--model", str(tiny_world_sd)]) == 0
    return out


@pytest.fixture(scope="module")
def plain_sd(tiny_world_sd, tmp_path_factory):
    """The tiny SD saved as a plain diffusers pipeline (no world marker): the real-checkpoint code path."""
    out = tmp_path_factory.mktemp("plain_sd")
    load_sd(tiny_world_sd).save_pretrained(out)
    assert not (out / "world_sd_config.json").exists()
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random-weight CLIP with a tokenizer, saved to a local directory."""
    model, tok = tiny_clip()
    out = tmp_path_factory.mktemp("clip")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_export_layout_round_trips(exported):
    rd = load_sd_record_data(exported, need_masks=True)
    assert rd.name == "Vorn" and len(rd.forget) == 2 and rd.retain
    assert rd.eval.label == "vorn" and "vorn" not in rd.eval.retained and len(rd.eval.references["blip"]) == 2
    from unlearn.data.sd_masks import load_mask
    from unlearn.world.records import world_sd_data

    world, _ = world_sd_data("vorn", 2, TINY_SD.image_size)
    for a, b in zip(rd.forget, world):  # the same pixels and exact masks after the PNG round trip
        assert a.id == b.id and a.prompt == b.prompt
        np.testing.assert_array_equal(np.asarray(Image.open(a.image).convert("RGB")), b.image)
        np.testing.assert_array_equal(load_mask(a.mask), b.mask)


def test_data_run_equals_world_run(tmp_path, tiny_world_sd, exported):
    kw = dict(steps=2, model=str(tiny_world_sd), eval_seeds=2, fd_seeds=2, retained=["blip", "korvex"], progress=False)
    from_world = run_sd("vorn", "fttp", tmp_path / "w", images=2, **kw)
    from_files = run_sd(None, "fttp", tmp_path / "f", data=exported, **kw)
    for key in ("ua", "fd", "K_C", "K_N", "retained_mean"):
        assert from_files[key] == pytest.approx(from_world[key], rel=1e-6), key
        assert from_files["original"][key] == pytest.approx(from_world["original"][key], rel=1e-6), key
    assert from_files["fd_space"] == from_world["fd_space"] == "world-classifier-features"
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["data"] == str(exported.resolve()) and manifest["eval"]["classifier"] == "world"


def test_plain_pipeline_through_the_cli_with_clip(tmp_path, plain_sd, exported, clip_dir, capsys):
    out = tmp_path / "run"
    rc = main(["sd", "--method", "fttp", "--steps", "2", "--model", str(plain_sd), "--data", str(exported),
               "--classifier", f"clip:{clip_dir}", "--out", str(out), *FAST, "lr=1e-3"])
    assert rc == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    for part in (metrics, metrics["original"]):
        assert {"ua", "fd", "fd_space", "K_C", "K_N", "retained"} <= set(part)
        assert part["fd_space"] == "clip-image-embeddings" and part["fd_n"] == [4, 4]
        assert 0 <= part["ua"] <= 100 and 0 < part["K_C"] <= 1 and set(part["retained"]) == {"blip", "korvex"}
        assert set(part["ua_detail"]["labels"]) <= {"vorn", "blip", "korvex"}  # CLIP chose among eval.json's labels
    assert printed["ua"] == metrics["ua"] and metrics["concept"] == "Vorn" and metrics["steps"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == str(plain_sd) and manifest["data"] == str(exported.resolve())
    assert manifest["eval"]["classifier"] == f"clip:{clip_dir}" and manifest["train"]["lr"] == 1e-3
    assert (out / "weights" / "unet.safetensors").exists() and len(list((out / "samples").glob("unlearned_vorn_*.png"))) == 4
    # `unlearn eval RUN` re-evaluates it from the manifest (data directory, classifier) and reproduces it
    assert main(["eval", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    for key in ("ua", "fd", "K_C", "K_N"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-5), key
    assert again["fd_space"] == "clip-image-embeddings"


def _broken(exported, tmp_path, what):
    data = tmp_path / "d"
    shutil.copytree(exported, data)
    rows = _rows(data / "forget.jsonl")
    if what == "missing image":
        rows[1]["image"] = "images/nowhere.png"
    elif what == "prompt without the concept":
        rows[1]["prompt"] = "a picture of Blip"
    elif what == "mask of the wrong size":
        Image.fromarray(np.full((8, 8), 255, np.uint8)).save(data / "masks" / "small.png")
        rows[1]["mask"] = "masks/small.png"
    _write(data / "forget.jsonl", rows)
    return data


@pytest.mark.parametrize("what, message", [
    ("missing image", r"forget.jsonl:2: image .*nowhere.png does not exist"),
    ("prompt without the concept", r"forget.jsonl:2: prompt 'a picture of Blip' does not name the concept"),
    ("mask of the wrong size", r"forget.jsonl:2: mask .*small.png is 8x8 but its image is 32x32"),
])
def test_bad_records_name_file_and_line_and_write_nothing(tmp_path, plain_sd, exported, clip_dir, capsys, what, message):
    import re

    data = _broken(exported, tmp_path, what)
    out = tmp_path / "run"
    assert main(["sd", "--method", "fttp", "--steps", "1", "--model", str(plain_sd), "--data", str(data),
                 "--classifier", f"clip:{clip_dir}", "--out", str(out), "--quiet"]) == 2
    assert re.search(message, capsys.readouterr().err), what
    assert not out.exists()


def test_cli_errors_for_model_data_and_classifier(tmp_path, plain_sd, exported, capsys):
    base = ["sd", "--method", "fttp", "--steps", "1", "--model", str(plain_sd), "--quiet"]
    cases = [
        ([*base, "--data", str(exported), "--classifier", "inception", "--out", str(tmp_path / "a")], "unknown classifier 'inception'"),
        ([*base, "--data", str(exported), "--classifier", f"clip:{tmp_path / 'nope'}", "--out", str(tmp_path / "b")],
         "not a directory"),
        ([*base, "--data", str(exported), "--out", str(tmp_path / "c")], "--classifier clip:PATH"),
        ([*base, "--concept", "vorn", "--out", str(tmp_path / "d")], "give --data DIR"),
        ([*base, "--concept", "Blip", "--data", str(exported), "--classifier", "world", "--out", str(tmp_path / "e")],
         "is not the concept of"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err, message
        assert not any((tmp_path / x).exists() for x in "abcde")
    assert main(["world", "export-sd", "--concept", "vorn", "--out", str(exported)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_mask_needed_only_by_methods_that_weight_pixels(tmp_path, exported):
    data = tmp_path / "d"
    shutil.copytree(exported, data)
    rows = _rows(data / "forget.jsonl")
    for r in rows:
        r.pop("mask")
    _write(data / "forget.jsonl", rows)
    assert len(load_sd_record_data(data).forget) == 2  # GA needs no mask
    with pytest.raises(ValueError, match=r"forget.jsonl:1: this method needs a concept mask"):
        load_sd_record_data(data, need_masks=True)
