"""The default world, end to end: the real builders with their default settings, and the gates.

Uses the world cache ($UNLEARN_WORLD_DIR, else ~/.cache/unlearn/world): CI points it at a fresh
temporary directory so this builds everything from scratch there (minutes); elsewhere a cached
world is verified and reused.
"""

import json

import pytest

from unlearn.cli import main
from unlearn.world.build import COMPONENTS, WorldConfig, build_world, component_key
from unlearn.world.cache import check_component, default_cache_dir

pytestmark = pytest.mark.slow


def test_default_world_builds_and_passes_every_gate(capsys):
    root = default_cache_dir()
    paths = build_world(root, progress=False)
    assert set(paths) == set(COMPONENTS)
    capsys.readouterr()
    code = main(["world", "check", "--out", str(root), "--quiet"])
    report = json.loads(capsys.readouterr().out)
    print(json.dumps(report, indent=1))  # the figures, in the CI log
    assert set(report) >= {"mllm", "sd"}
    mllm, sd = report["mllm"], report["sd"]
    assert min(mllm["identify_per_kind"].values()) >= 95.0
    assert mllm["yesno"] >= 90.0 and mllm["fact"] >= 90.0 and mllm["fluent"] >= 95.0
    assert report["classifier"]["pass"] and sd["pass"]
    assert code == 0 and report["pass"]
    for name in COMPONENTS:  # still verified after use
        assert check_component(root, name, component_key(name, WorldConfig())) is None
