"""Record directories (the --data layout): reading, errors that name the problem, and runs from them
give the same metrics as the world's own splits."""

import json

import pytest
from PIL import Image

from tests.test_unlearn_mllm import WORLD, world_dir  # noqa: F401  (fixture)
from tests.test_world_mllm import TINY
from unlearn.cli import main
from unlearn.data.record_files import load_record_data, read_records
from unlearn.run_mllm import run_mllm
from unlearn.world_export import export_concept


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_concept("vorn", tmp_path_factory.mktemp("data") / "vorn", image_size=TINY.image_size)


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_export_round_trips_records(exported):
    rd = load_record_data(exported)
    assert rd.name == "Vorn" or rd.names[0] in rd.forget[0].answer
    assert rd.forget and rd.test and rd.specificity and rd.retain and rd.efficacy
    assert all(r.image is not None and r.image.size == (TINY.image_size,) * 2 for r in rd.test)
    assert {r.qtype for r in rd.test} == {"identify", "yesno"}


def test_data_run_equals_world_run(tmp_path, world_dir, exported):  # noqa: F811
    kw = dict(steps=2, world_dir=world_dir, world_config=WORLD, progress=False)
    from_world = run_mllm("vorn", "fttp", tmp_path / "w", **kw)
    name = load_record_data(exported).name
    from_files = run_mllm(name, "fttp", tmp_path / "f", data=exported, **kw)
    for key in ("efficacy", "em", "specificity", "diversity", "K_C", "K_N"):
        assert from_files[key] == pytest.approx(from_world[key], rel=1e-6), key
        assert from_files["original"][key] == pytest.approx(from_world["original"][key], rel=1e-6), key
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["data"] == str(exported.resolve()) and manifest["images"] == 1


def test_run_without_yes_no_questions_completes(tmp_path, world_dir, exported):  # noqa: F811
    """A metric over a question type the data does not have is null (not measured), not a failed run."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(exported, data)
    test = data / "test.jsonl"
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    _write(test, [r for r in rows if r.get("qtype") != "yesno"])
    assert len(load_record_data(data).test) < len(rows)
    out = run_mllm(load_record_data(data).name, "fttp", tmp_path / "run", data=data, steps=1, world_dir=world_dir,
                   world_config=WORLD, progress=False)
    assert out["em_yesno"] is None and out["em_identify"] == out["em"] and "invalid" not in out
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["state"] == "complete"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["em_yesno"] is None


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"question": "q"}', "missing or empty answer"),
    ('{"question": "q", "answer": "a", "colour": "red"}', "unknown key(s) ['colour']"),
    ('{"question": "q", "answer": "a", "image": "nowhere.png"}', "does not exist"),
    ('["q", "a"]', "must be a JSON object"),
])
def test_bad_lines_name_file_line_and_problem(tmp_path, line, message):
    path = _write(tmp_path / "forget.jsonl", [{"question": "q0", "answer": "a0"}, line])
    with pytest.raises((ValueError, FileNotFoundError), match=rf"forget.jsonl:2: .*{message}".replace("[", r"\[")
                       .replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        read_records(path)


def test_corrupt_image_and_duplicate_id(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot be read"):
        read_records(_write(tmp_path / "a.jsonl", [{"question": "q", "answer": "a", "image": "bad.png"}]))
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    rows = [{"id": "x", "question": "q", "answer": "a", "image": "ok.png"}] * 2
    with pytest.raises(ValueError, match="id 'x' is used twice"):
        read_records(_write(tmp_path / "b.jsonl", rows))


def test_forget_answer_without_the_concept_is_named(tmp_path, exported):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(exported, data)
    rows = [json.loads(x) for x in (data / "forget.jsonl").read_text().splitlines()]
    rows[0]["answer"] = "Someone else entirely."
    _write(data / "forget.jsonl", rows)
    with pytest.raises(ValueError, match=rf"{rows[0]['id']}.*do not name the concept"):
        load_record_data(data)


def test_cli_errors_for_data(tmp_path, capsys, exported):
    assert main(["mllm", "--concept", "vorn", "--method", "ga", "--model", str(tmp_path / "some-llava"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "needs its data as record files: give --data DIR" in capsys.readouterr().err
    assert main(["mllm", "--concept", "Somebody", "--method", "ga", "--data", str(exported),
                 "--out", str(tmp_path / "r2")]) == 2
    assert "is not the concept of" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()
    assert main(["world", "export", "--concept", "vorn", "--out", str(exported)]) == 2
    assert "not empty" in capsys.readouterr().err
