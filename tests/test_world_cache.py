"""The verified world cache: complete components are reused, partial or corrupted ones rebuilt."""

import json
import os

import pytest

from unlearn.world import cache


def _builder(calls):
    def build(tmp):
        calls.append(tmp)
        (tmp / "weights.bin").write_bytes(b"\x01" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text('{"a": 1}')

    return build


def test_built_once_then_reused(tmp_path):
    calls = []
    p1 = cache.ensure_component(tmp_path, "mllm", {"steps": 3}, _builder(calls))
    p2 = cache.ensure_component(tmp_path, "mllm", {"steps": 3}, _builder(calls))
    assert p1 == p2 == tmp_path / "mllm" and len(calls) == 1
    assert cache.check_component(tmp_path, "mllm", {"steps": 3}) is None
    assert set(json.loads((p1 / cache.RECORD).read_text())["files"]) == {"weights.bin", "sub/config.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / "weights.bin").write_bytes(b"\x02" * 1000), "corrupted"),
    (lambda p: (p / "sub" / "config.json").unlink(), "missing"),
    (lambda p: (p / cache.RECORD).unlink(), "interrupted"),
    (lambda p: (p / cache.RECORD).write_text("{not json"), "unreadable"),
])
def test_damaged_component_is_reported_and_rebuilt(tmp_path, capsys, damage, reason):
    calls = []
    path = cache.ensure_component(tmp_path, "sd", {"steps": 3}, _builder(calls))
    damage(path)
    assert reason in cache.check_component(tmp_path, "sd", {"steps": 3})
    cache.ensure_component(tmp_path, "sd", {"steps": 3}, _builder(calls))
    assert len(calls) == 2
    err = capsys.readouterr().err
    assert "cannot be used" in err and reason in err and "rebuilding" in err
    assert cache.check_component(tmp_path, "sd", {"steps": 3}) is None


def test_other_config_is_rebuilt(tmp_path):
    calls = []
    cache.ensure_component(tmp_path, "mllm", {"steps": 3}, _builder(calls))
    assert "configuration" in cache.check_component(tmp_path, "mllm", {"steps": 4})
    cache.ensure_component(tmp_path, "mllm", {"steps": 4}, _builder(calls))
    assert len(calls) == 2 and json.loads((tmp_path / "mllm" / cache.RECORD).read_text())["config"] == {"steps": 4}


def test_failed_build_leaves_previous_copy_and_no_partial_files(tmp_path):
    calls = []
    cache.ensure_component(tmp_path, "mllm", {"steps": 3}, _builder(calls))

    def crash(tmp):
        (tmp / "weights.bin").write_bytes(b"half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="mid-build"):
        cache.ensure_component(tmp_path, "mllm", {"steps": 4}, crash)
    assert sorted(os.listdir(tmp_path)) == ["mllm"]  # the temporary directory is gone
    assert cache.check_component(tmp_path, "mllm", {"steps": 3}) is None  # the old copy is intact
    assert json.loads((tmp_path / "mllm" / "sub" / "config.json").read_text()) == {"a": 1}


def test_cache_location_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "w"))
    assert cache.default_cache_dir() == tmp_path / "w"
    monkeypatch.delenv(cache.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path / "unlearn" / "world"


def test_changing_the_world_changes_every_cache_key(monkeypatch):
    from unlearn.world import build, render

    cfg = build.WorldConfig()
    before = {name: build.component_key(name, cfg) for name in build.COMPONENTS}
    monkeypatch.setattr(render, "RENDER_VERSION", render.RENDER_VERSION + 1)
    after = {name: build.component_key(name, cfg) for name in build.COMPONENTS}
    assert all(before[n]["config"] == after[n]["config"] and before[n] != after[n] for n in build.COMPONENTS)
