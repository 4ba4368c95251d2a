"""The main job on a tiny world: GA and FTTP runs traced with attention probes, and the report."""

import json

import knowtrace
from tests.test_unlearn_mllm import WORLD, world_dir  # noqa: F401  (fixture)
from unlearn.demo import run_demo


def test_demo_writes_runs_traces_and_a_report(tmp_path, world_dir, capsys):  # noqa: F811
    report = run_demo(tmp_path / "demo", concept="vorn", steps=3, world_dir=world_dir, world_config=WORLD,
                      progress=False)
    text = report.read_text()
    summary = (tmp_path / "demo" / "summary.txt").read_text()
    assert capsys.readouterr().out == summary  # the summary is also printed
    for method in ("ga", "fttp"):
        run = tmp_path / "demo" / method
        metrics = json.loads((run / "metrics.json").read_text())
        assert f"{method} " in summary and f"em {metrics['em']:.1f}" in summary
        probe = knowtrace.open_probe_trace(run / "trace.zarr")
        # probes before training (step -1) and after each of the 3 steps, with attention maps
        assert probe.step.values.tolist() == [-1, 0, 1, 2] and "xattn" in probe
        assert (run / "samples" / "probe-0.png").exists()
    # 2 knowledge, 1 scatter, 2 token, 2 attention figures; plotly.js inlined once (offline)
    assert text.count("class='figure'") == 7
    assert text.count("plotly.js v") == 1
    assert "original" in summary and "<table>" in text


def test_demo_again_in_the_same_directory_starts_fresh_traces(tmp_path, world_dir):  # noqa: F811
    """A second demo (runs with --overwrite) must not append to the first one's traces."""
    for steps in (3, 2):
        run_demo(tmp_path / "demo", concept="vorn", steps=steps, methods=("fttp",), world_dir=world_dir,
                 world_config=WORLD, progress=False)
        (tmp_path / "demo" / "fttp" / "notes.txt").write_text("the user's, not the run's")
    assert (tmp_path / "demo" / "fttp" / "notes.txt").exists()  # overwriting removes only the run's files
    trace = tmp_path / "demo" / "fttp" / "trace.zarr"
    assert knowtrace.open_probe_trace(trace).step.values.tolist() == [-1, 0, 1]
    assert knowtrace.open_trace(trace).step.values.tolist() == [0, 1]
    assert json.loads((tmp_path / "demo" / "fttp" / "manifest.json").read_text())["train"]["steps"] == 2
