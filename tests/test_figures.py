"""The figure scripts run end to end on the default world with tiny budgets (HTML + JSON, no PNG),
and a second call reuses the saved runs instead of training again.

Each script runs in this process as ``python figures/<script>.py`` would run it (``runpy`` with its own
argv and ``figures/`` first on the path): a subprocess per script paid the imports of torch, transformers
and diffusers again each time (about 10 s each on 2 cores)."""

import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "fig2_token_logprobs": ["--steps", "2"],
    "fig3_knowledge": ["--steps", "2"],
    "fig5_kc_kn": ["--steps", "2", "--methods", "ga", "fttp"],
    "fig8_attention": ["--steps", "2"],
    "fig_audit": ["--steps", "1", "--relearn-steps", "1", "--methods", "fttp", "--retain-model", "none"],
    "fig_audit_sd": ["--steps", "1", "--images", "1", "--methods", "fttp", "--retain-model", "none", "--eval-seeds", "1",
                     "--fd-seeds", "1", *[a for kv in ("sampling.seeds=1", "sampling.guidances=7.5", "sampling.scenes=1",
                                                       "sampling.scene_seeds=1", "relearn.steps=1", "relearn.images=1",
                                                       "relearn.seeds=1", "inversion.steps=1", "inversion.images=1",
                                                       "inversion.seeds=1", "adversarial.steps=1",
                                                       "adversarial.per_timestep=1", "adversarial.seeds=1",
                                                       "knowledge.images=1") for a in ("--set", kv)]],
    "fig9_token_count": ["--concepts", "vorn", "quilla", "oskel", "--max-steps", "2", "--every", "1"],
    "table1_mllm": ["--steps", "2", "--seeds", "0", "--concepts", "korvex", "--methods", "ga", "fttp"],
    "fig3_sd_knowledge": ["--steps", "2", "--images", "2", "--eval-seeds", "2", "--fd-seeds", "1"],
    "fig10_sd_budget": ["--images", "1", "2", "--steps", "1", "2", "--fixed-steps", "1", "--fixed-images", "1",
                        "--eval-seeds", "2", "--fd-seeds", "1"],
}
# checked by test_second_call_reuses_saved_runs (fig3_knowledge reads the runs fig2 trained)
REUSING = ("fig2_token_logprobs", "fig3_knowledge")


def _run(script, args, runs, out, monkeypatch, capsys):
    """stdout of ``python figures/<script>.py --runs RUNS --out OUT --no-png --quiet ARGS``, run in this process."""
    path = ROOT / "figures" / f"{script}.py"
    monkeypatch.syspath_prepend(str(ROOT / "figures"))
    monkeypatch.setattr(sys, "argv", [str(path), "--runs", str(runs), "--out", str(out), "--no-png", "--quiet", *args])
    capsys.readouterr()
    runpy.run_path(str(path), run_name="__main__")  # an error is the test's error, with its traceback
    return capsys.readouterr().out


def _check_outputs(out):
    html = sorted(out.glob("*.html"))
    numbers = sorted(out.glob("*.json"))
    assert html and numbers and not list(out.glob("*.png"))
    assert all("plotly" in h.read_text()[:200000] for h in html)
    assert all(json.loads(n.read_text()) for n in numbers)


@pytest.mark.parametrize("script", sorted(set(CASES) - set(REUSING)))
def test_figure_script_writes_html_and_numbers(default_world, tmp_path, script, monkeypatch, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    _run(script, CASES[script], runs, out, monkeypatch, capsys)
    _check_outputs(out)
    if script == "fig9_token_count":
        data = json.loads((out / "fig9_token_count.json").read_text())
        assert [c["concept"] for c in data["concepts"]] == ["vorn", "quilla", "oskel"]
        assert [c["tokens"] for c in data["concepts"]] == [1, 2, 3]
        assert data["stats"]["n"] == 3


def test_second_call_reuses_saved_runs(default_world, tmp_path, monkeypatch, capsys):
    """fig3_knowledge after fig2_token_logprobs: the same two runs (GA, FTTP) are read back, not trained again."""
    runs = tmp_path / "runs"
    _run("fig2_token_logprobs", CASES["fig2_token_logprobs"], runs, tmp_path / "out2", monkeypatch, capsys)
    manifests = {p: p.stat().st_mtime_ns for p in runs.rglob("manifest.json")}
    assert len(manifests) == 2  # GA and FTTP
    _run("fig3_knowledge", CASES["fig3_knowledge"], runs, tmp_path / "out3", monkeypatch, capsys)
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("manifest.json")} == manifests
    _check_outputs(tmp_path / "out2")
    _check_outputs(tmp_path / "out3")
