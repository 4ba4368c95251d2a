"""Every user mistake, driven through the CLIs: exit 2, one message naming the file or flag, no traceback,
nothing written (issue 15). Also what the readers accept: images of every mode, --quiet."""

import faulthandler
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from knowtrace.cli import main as knowtrace_main
from knowtrace.files import read_image
from unlearn.cli import main as unlearn_main
from unlearn.data.record_files import load_record_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def no_hang():
    """A reader that opens a named pipe would wait forever: fail the test run instead."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _png(path, size=(16, 16), value=200, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, 90, 30)).save(path)
    return path


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def mllm_data(root):
    """A tiny valid MLLM record directory."""
    d = root / "data"
    d.mkdir()
    (d / "concept.json").write_text(json.dumps({"name": "Oskel Brin", "aliases": ["Oskel"]}))
    _png(d / "images" / "a.png")
    _rows(d / "forget.jsonl", [{"question": "Who is this?", "answer": "This is Oskel Brin.", "image": "images/a.png"}])
    _rows(d / "test.jsonl", [{"question": "Who is this?", "answer": "Oskel Brin.", "image": "images/a.png"}])
    _rows(d / "specificity.jsonl", [{"question": "What is 2+2?", "answer": "4"}])
    return d


def sd_data(root):
    """A tiny valid SD record directory (image, mask, eval.json with two references)."""
    d = root / "data"
    d.mkdir()
    (d / "concept.json").write_text(json.dumps({"name": "Vorn"}))
    _png(d / "images" / "a.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    (d / "masks").mkdir()
    Image.fromarray(mask).save(d / "masks" / "a.png")
    _png(d / "images" / "r0.png")
    _png(d / "images" / "r1.png")
    _rows(d / "forget.jsonl", [{"image": "images/a.png", "prompt": "a picture of Vorn", "mask": "masks/a.png"}])
    (d / "eval.json").write_text(json.dumps({"prompts": ["a picture of Vorn"], "retained": {"grom": "a picture of Grom"},
                                             "references": {"grom": ["images/r0.png", "images/r1.png"]}}))
    return d


def _set_first(path, **values):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0].update(values)
    _rows(path, rows)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def check_error(capsys, root, argv, *words, main=unlearn_main):
    """``argv`` exits 2 with one message holding ``words``, no traceback, and writes nothing under ``root``."""
    before = _files(root)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and all(w in err for w in words), err
    assert _files(root) == before  # nothing written: no run directory, no lock file, no partial file
    return err


# ------------------------------------------------------------------ MLLM record directories
def _mllm_run(d, tmp_path, *extra):
    return ["mllm", "--data", str(d), "--method", "fttp", "--out", str(tmp_path / "out"), *extra]


MLLM_MISTAKES = {
    "forget file is a folder": (lambda d: ((d / "forget.jsonl").unlink(), (d / "forget.jsonl").mkdir()),
                                ("forget.jsonl", "is a folder")),
    "forget file is a FIFO": (lambda d: ((d / "forget.jsonl").unlink(), os.mkfifo(d / "forget.jsonl")),
                              ("forget.jsonl", "named pipe")),
    "image is a FIFO": (lambda d: (os.mkfifo(d / "images" / "p.png"), _set_first(d / "forget.jsonl", image="images/p.png")),
                        ("p.png", "named pipe")),
    "forget file not UTF-8": (lambda d: (d / "forget.jsonl").write_bytes((d / "forget.jsonl").read_bytes().replace(
        b"This", b"Th\xefs")), ("forget.jsonl", "not UTF-8", "line 1")),
    "concept.json not JSON": (lambda d: (d / "concept.json").write_text('{"name": '), ("concept.json", "not valid JSON")),
    "image path with ..": (lambda d: (_png(d.parent / "x.png"), _set_first(d / "forget.jsonl", image="../x.png")),
                           ("'../x.png'", "outside the record directory", "allow_outside_paths")),
    "absolute image path elsewhere": (lambda d: _set_first(d / "forget.jsonl", image=str(_png(d.parent / "y.png"))),
                                      ("y.png", "outside the record directory")),
    "image path not text": (lambda d: _set_first(d / "forget.jsonl", image=5), ("forget.jsonl:1", "file path")),
    "huge image": (lambda d: (Image.new("L", (12000, 16000)).save(d / "images" / "big.png"),
                              _set_first(d / "forget.jsonl", image="images/big.png")), ("big.png", "too large")),
    "data is a file": (lambda d: ((d / "x").write_text("x"),), ("is a file, not a folder",)),
}


@pytest.mark.parametrize("mistake", MLLM_MISTAKES)
def test_mllm_record_mistakes(mistake, capsys, tmp_path):
    d = mllm_data(tmp_path)
    make, words = MLLM_MISTAKES[mistake]
    make(d)
    check_error(capsys, tmp_path, _mllm_run(d / "x" if mistake == "data is a file" else d, tmp_path), *words)


def test_relative_record_directory_is_read(tmp_path, monkeypatch):
    mllm_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert load_record_data("data").forget[0].image.size == (16, 16)  # a relative DATA is not "outside" itself


def test_attention_trace_without_images_is_refused_before_loading(capsys, tmp_path):
    d = mllm_data(tmp_path)
    _set_first(d / "forget.jsonl", image=None)
    check_error(capsys, tmp_path, _mllm_run(d, tmp_path, "--trace-attention"), "--trace-attention", str(d))


def test_paths_outside_are_read_when_the_directory_allows_them(tmp_path):
    d = mllm_data(tmp_path)
    _png(tmp_path / "x.png", value=17)
    _set_first(d / "forget.jsonl", image="../x.png")
    with pytest.raises(ValueError, match="outside the record directory"):
        load_record_data(d)
    (d / "concept.json").write_text(json.dumps({"name": "Oskel Brin", "allow_outside_paths": True}))
    assert np.asarray(load_record_data(d).forget[0].image)[0, 0, 0] == 17


# ------------------------------------------------------------------ SD record directories
SD_MISTAKES = {
    "mask is a folder": (lambda d: ((d / "masks" / "a.png").unlink(), (d / "masks" / "a.png").mkdir()), ("a.png", "folder")),
    "mask is a FIFO": (lambda d: ((d / "masks" / "a.png").unlink(), os.mkfifo(d / "masks" / "a.png")), ("a.png", "named pipe")),
    "corrupt mask PNG": (lambda d: (d / "masks" / "a.png").write_bytes((d / "masks" / "a.png").read_bytes()[:40]),
                         ("mask", "a.png", "cannot be read as an image")),
    "labelme not JSON": (lambda d: ((d / "masks" / "m.json").write_text("{oops"), _set_first(d / "forget.jsonl", mask="masks/m.json")),
                         ("m.json", "not valid JSON")),
    "labelme shapes not a list": (lambda d: ((d / "masks" / "m.json").write_text(json.dumps(
        {"imageHeight": 16, "imageWidth": 16, "shapes": 3})), _set_first(d / "forget.jsonl", mask="masks/m.json")),
        ("m.json", "not a labelme JSON")),
    "mask path with ..": (lambda d: _set_first(d / "forget.jsonl", mask="../../m.png"), ("'../../m.png'", "outside")),
    "eval.json not UTF-8": (lambda d: (d / "eval.json").write_bytes((d / "eval.json").read_bytes().replace(b"Grom", b"Gr\xf6m")),
                            ("eval.json", "not UTF-8")),
    "reference is a FIFO": (lambda d: ((d / "images" / "r1.png").unlink(), os.mkfifo(d / "images" / "r1.png")),
                            ("references['grom'][1]", "named pipe")),
}


def test_sd_method_needing_retain_records_is_refused_before_loading(capsys, tmp_path):
    d = sd_data(tmp_path)
    check_error(capsys, tmp_path, ["sd", "--data", str(d), "--method", "salun", "--classifier", "world",
                                   "--out", str(tmp_path / "out")], "salun", "retain.jsonl")


@pytest.mark.parametrize("mistake", SD_MISTAKES)
def test_sd_record_mistakes(mistake, capsys, tmp_path):
    d = sd_data(tmp_path)
    make, words = SD_MISTAKES[mistake]
    make(d)
    check_error(capsys, tmp_path, ["sd", "--data", str(d), "--method", "fttp", "--classifier", "world",
                                   "--out", str(tmp_path / "out")], *words)


# ------------------------------------------------------------------ models
@pytest.mark.parametrize("model, words", [
    ("./models/llava-typo", ("'./models/llava-typo'", "no such directory")),
    ("llava-hf/llava-1.5-7b-hf", ("not in the local Hugging Face cache", "offline", "huggingface-cli download")),
    ("EMPTY", ("holds no config.json",)),
])
def test_model_mistakes_before_anything_loads(model, words, capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    d = mllm_data(tmp_path)
    if model == "EMPTY":
        model = str(tmp_path / "empty")
        (tmp_path / "empty").mkdir()
    check_error(capsys, tmp_path, _mllm_run(d, tmp_path, "--model", model), *words)


# ------------------------------------------------------------------ unlearn eval on a damaged run
def _fake_run(root):
    import torch
    from safetensors.torch import save_file

    run = root / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"kind": "mllm", "concept": "vorn", "method": "fttp", "model": "world",
                                                   "seed": 0, "images": 1, "train": {"lora": True, "steps": 1}}))
    (run / "adapter" / "adapter_config.json").write_text("{}")
    save_file({"w": torch.ones(64, 64)}, run / "adapter" / "adapter_model.safetensors")
    return run


@pytest.mark.parametrize("damage, words", [
    (lambda f: f.write_bytes(f.read_bytes()[:100]), ("adapter_model.safetensors", "damaged")),  # header cut
    (lambda f: f.write_bytes(f.read_bytes()[:-1000]), ("adapter_model.safetensors", "damaged")),  # data cut
    (lambda f: (f.parent / "adapter_config.json").write_text("{"), ("adapter_config.json", "not valid JSON")),
    (lambda f: (f.parent.parent / "manifest.json").write_text("{"), ("manifest.json", "not valid JSON")),
    (lambda f: (f.parent.parent / "manifest.json").write_text("{}"), ("manifest.json", "lacks concept")),
])
def test_eval_of_a_damaged_run(damage, words, capsys, tmp_path):
    run = _fake_run(tmp_path)
    damage(run / "adapter" / "adapter_model.safetensors")
    check_error(capsys, tmp_path, ["eval", str(run)], *words)


# ------------------------------------------------------------------ late checks, now made before any work
@pytest.mark.parametrize("argv, words", [
    (["--fd-seeds", "1", "--retained", "grom"], ("--fd-seeds 1", "retained")),
    (["--fd-seeds", "0"], ("--fd-seeds 0",)),
    (["--eval-seeds", "0"], ("--eval-seeds 0",)),
    (["dilate=-3"], ("dilate=-3",)),
    (["--classifier", "clip:TMP"], ("holds no config.json",)),  # a folder that is no CLIP checkpoint
])
def test_sd_settings_checked_when_the_run_is_made(argv, words, capsys, tmp_path):
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    check_error(capsys, tmp_path, ["sd", "--concept", "vorn", "--method", "fttp_dilated", "--out",
                                   str(tmp_path / "out"), *argv], *words)


@pytest.mark.parametrize("setting", ["alpha=nan", "lr=inf", "beta=-inf"])
def test_non_finite_settings_are_refused(setting, capsys, tmp_path):
    check_error(capsys, tmp_path, ["mllm", "--concept", "oskel", "--method", "fttp", "--out", str(tmp_path / "out"),
                                   setting], setting, "finite")


@pytest.mark.parametrize("argv, words", [
    (["export", "--concept", "oskel", "--images", "0"], ("--images 0",)),
    (["export-sd", "--concept", "vorn", "--images", "0"], ("--images 0",)),
    (["export-sd", "--concept", "vorn", "--references", "1"], ("--references 1",)),
])
def test_world_export_refuses_what_the_toolkit_would_reject(argv, words, capsys, tmp_path):
    check_error(capsys, tmp_path, ["world", *argv, "--out", str(tmp_path / "out")], *words)


# ------------------------------------------------------------------ knowtrace on damaged traces
@pytest.fixture
def trace(tmp_path):
    from knowtrace.store import TraceStore

    path = tmp_path / "trace.zarr"
    store = TraceStore(path, attrs={"seed": 0})
    for step in range(3):
        store.append(step, K_C=np.full(2, 1.0 + step), K_N=np.full(2, 5.0), loss_forget=np.float32(0.5))
    store.flush()
    return path


def _chunk(trace, var):
    return next(p for p in sorted((trace / var).rglob("*")) if p.is_file() and p.name != "zarr.json")


@pytest.mark.parametrize("damage", ["chunk", "metadata"])
@pytest.mark.parametrize("command", [["summary"], ["plot", "--kind", "knowledge", "--html", "k.html"],
                                     ["export", "--netcdf", "t.nc"]])
def test_damaged_trace_is_an_error(damage, command, trace, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if damage == "chunk":
        _chunk(trace, "K_C").write_bytes(b"garbage")
    else:
        (trace / "zarr.json").write_text("{")
    argv = [command[0], str(trace), *command[1:]]
    check_error(capsys, tmp_path, argv, str(trace), "damaged", main=knowtrace_main)


def test_export_to_a_folder_is_refused_before_any_work(trace, capsys, tmp_path):
    (tmp_path / "t.nc").mkdir()
    check_error(capsys, tmp_path, ["export", str(trace), "--netcdf", str(tmp_path / "t.nc"), "--force"], "t.nc",
                "is a folder", main=knowtrace_main)


def test_trace_zarr_that_is_a_file_is_not_read_as_netcdf(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trace.zarr").write_text("x")
    check_error(capsys, tmp_path, ["summary", str(tmp_path / "run")], "neither a run directory", main=knowtrace_main)


def test_empty_netcdf_is_an_error(capsys, tmp_path):
    (tmp_path / "t.nc").write_bytes(b"")
    check_error(capsys, tmp_path, ["summary", str(tmp_path / "t.nc")], "t.nc", "empty or damaged", main=knowtrace_main)


@pytest.mark.parametrize("command", [["summary"], ["export", "--netcdf", "t.nc"]])
def test_missing_chunk_is_damage_not_a_variable_never_recorded(command, trace, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _chunk(trace, "K_C").unlink()
    err = check_error(capsys, tmp_path, [command[0], str(trace), *command[1:]], str(trace), "damaged",
                      "K_C", main=knowtrace_main)
    assert "missing" in err


# ------------------------------------------------------------------ images of every mode
def _modes(tmp_path):
    """(file, expected RGB of its pixels): one file per mode Pillow reads."""
    grey = np.array([[0, 128], [255, 64]], np.uint8)
    rgb = np.stack([grey, 255 - grey, np.full_like(grey, 40)], -1)
    cases = {"I;16.png": (Image.fromarray(grey.astype(np.uint16) * 257), np.repeat(grey[..., None], 3, -1)),
             "F.tif": (Image.fromarray(grey.astype(np.float32) / 255), np.repeat(grey[..., None], 3, -1)),
             "I.tif": (Image.fromarray(grey.astype(np.int32) * 257), np.repeat(grey[..., None], 3, -1)),
             "P.png": (Image.fromarray(rgb).convert("P"), np.asarray(Image.fromarray(rgb).convert("P").convert("RGB"))),
             "1.png": (Image.fromarray(grey).convert("1"), np.repeat(np.asarray(Image.fromarray(grey).convert("1"), np.uint8)[..., None] * 255, 3, -1)),
             "CMYK.jpg": (Image.fromarray(rgb).convert("CMYK"), None),
             # half-transparent red over white: (255, 127.5, 127.5); transparent pixels white
             "RGBA.png": (Image.fromarray(np.array([[[255, 0, 0, 128], [0, 0, 0, 0]]], np.uint8)),
                          np.array([[[255, 127, 127], [255, 255, 255]]], np.uint8)),
             # opaque black, then transparent: white
             "LA.png": (Image.fromarray(np.array([[[0, 255], [0, 0]]], np.uint8)), np.array([[[0, 0, 0], [255] * 3]], np.uint8))}
    for name, (im, _) in cases.items():
        im.save(tmp_path / name)
    return {name: expected for name, (_, expected) in cases.items()}


def test_images_of_every_mode_become_rgb(tmp_path):
    for name, expected in _modes(tmp_path).items():
        got = np.asarray(read_image(tmp_path / name))
        assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[-1] == 3, name
        if expected is not None:
            np.testing.assert_allclose(got, expected, atol=1, err_msg=name)
    # a 16-bit image is scaled, not clipped: it was all white before
    assert np.asarray(read_image(tmp_path / "I;16.png"))[0, 1, 0] == 128


def test_out_of_range_images_are_refused(tmp_path):
    Image.fromarray(np.array([[0.0, 2.5]], np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="f.tif.*outside 0..1"):
        read_image(tmp_path / "f.tif")


# ------------------------------------------------------------------ --quiet
def test_quiet_run_prints_only_the_result(default_world, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "unlearn.cli", "mllm", "--concept", "oskel", "--method", "fttp",
                        "--steps", "1", "--out", str(out), "--quiet"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    result = json.loads(p.stdout)  # stdout is the result JSON and nothing else
    assert result["run"] == str(out) and result["steps"] == 1
