"""The `knowtrace` command on real run directories (`unlearn` MLLM runs with --trace on a tiny world
LLaVA) and on a synthetic trace with attention maps and a sample image."""

import json
import shutil

import numpy as np
import pytest
import xarray as xr
from PIL import Image

from knowtrace.cli import main
from knowtrace.store import open_trace
from tests.test_knowtrace_plots import png_or_skip, write_synthetic


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two traced 3-step runs (fttp, ga) of the tiny world MLLM, as `unlearn mllm --trace` writes them."""
    from tests.test_unlearn_mllm import WORLD
    from unlearn.run_mllm import run_mllm

    root = tmp_path_factory.mktemp("runs")
    for method in ("fttp", "ga"):
        run_mllm("vorn", method, root / method, steps=3, world_dir=root / "world", world_config=WORLD, progress=False,
                 trace=True)
    return root


@pytest.fixture
def attention_run(tmp_path):
    """A run directory holding a synthetic trace with xattn and the image of sample 0 in samples/."""
    run = tmp_path / "att"
    run.mkdir()
    write_synthetic(run / "trace.zarr")
    (run / "samples").mkdir()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(run / "samples" / "sample-0.png")
    (run / "manifest.json").write_text(json.dumps({"method": "fttp", "concept": "vorn", "seed": 0}))
    return run


def _first_last(values):
    """Mean over samples of each sample's first / last finite value, by hand. values: (step, sample)."""
    cols = [values[np.isfinite(values[:, s]), s] for s in range(values.shape[1])]
    cols = [c for c in cols if len(c)]
    return np.mean([c[0] for c in cols]), np.mean([c[-1] for c in cols])


def test_summary_prints_the_trace_numbers(runs, capsys):
    ds = open_trace(runs / "fttp" / "trace.zarr")
    assert main(["summary", str(runs / "fttp"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["steps"] == 3 and info["step_range"] == [0, 2] and info["samples"] == ds.sizes["sample"] == 6
    assert info["concept_tokens"] == ds.is_concept.values.sum(1).tolist() and sum(info["concept_tokens"]) >= 3
    assert info["answer_tokens"] == (ds.token_id.values >= 0).sum(1).tolist()
    for name in ("K_C", "K_N", "loss_forget"):
        first, last = _first_last(ds[name].values.reshape(3, -1).astype(float))
        assert info[name]["first"] == pytest.approx(first) and info[name]["last"] == pytest.approx(last)
    assert info["loss_retain"] is None  # fttp uses no retain set: all NaN
    assert info["attrs"]["method"] == "fttp" and info["attrs"]["seed"] == 0
    metrics = json.loads((runs / "fttp" / "metrics.json").read_text())
    assert info["run"]["method"] == "fttp" and info["run"]["em"] == metrics["em"] and info["run"]["steps"] == 3
    assert info["sample_ids"] == [str(i) for i in ds.sample_id.values]
    assert main(["summary", str(runs / "fttp" / "trace.zarr")]) == 0  # the trace itself; text
    text = capsys.readouterr().out
    assert "steps: 3\n" in text and "samples: 6\n" in text and "loss_retain: not recorded" in text
    assert f"K_C: first {info['K_C']['first']:.6g}, last {info['K_C']['last']:.6g}" in text
    assert "  logprob(step, sample, token)" in text


def test_plot_writes_html_with_the_plot(runs, tmp_path, capsys):
    ds = open_trace(runs / "fttp" / "trace.zarr")
    concept_pos = int(np.flatnonzero(ds.is_concept.values[0])[0])
    out = tmp_path / "tokens.html"
    assert main(["plot", str(runs / "fttp"), "--kind", "tokens", "--html", str(out)]) == 0
    html = out.read_text()
    assert f'"name":"{concept_pos}:Vorn"' in html and "Plotly.newPlot" in html
    assert capsys.readouterr().out.strip() == str(out)
    # no --html/--png: RUN/plots/<kind>.html
    assert main(["plot", str(runs / "fttp"), "--kind", "knowledge"]) == 0
    assert "Natural knowledge K_N" in (runs / "fttp" / "plots" / "knowledge.html").read_text()
    sid = str(ds.sample_id.values[1])  # by id; its "/" and ":" become "_" in the default file name
    assert main(["plot", str(runs / "fttp"), "--kind", "tokens", "--sample", sid]) == 0
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in sid)
    html = (runs / "fttp" / "plots" / f"tokens-s{safe}.html").read_text()
    assert f"sample 1 ({sid})".replace("/", "\\u002f") in html  # plotly's JSON writes "/" as \u002f
    scatter = tmp_path / "scatter.html"
    assert main(["plot", str(runs / "fttp"), str(runs / "ga"), "--kind", "scatter", "--html", str(scatter)]) == 0
    html = scatter.read_text()
    assert '"name":"fttp"' in html and '"name":"ga"' in html


def test_attention_plot_uses_the_run_image(attention_run, tmp_path):
    out = tmp_path / "att.html"
    assert main(["plot", str(attention_run), "--kind", "attention", "--html", str(out)]) == 0
    html = out.read_text()
    assert '"type":"image"' in html  # the image underlay
    assert html.count('"traces":[1]') == 4 and '"label":"3"' in html  # 4 frames (steps 0..3) and their slider
    assert main(["plot", str(attention_run), "--kind", "attention", "--sample", "1", "--html", str(out)]) == 0
    assert '"type":"image"' not in out.read_text()  # no samples/sample-1.png: the map alone
    assert main(["plot", str(attention_run), "--kind", "eps_err", "--html", str(out)]) == 0
    assert '"name":"concept mask"' in out.read_text()


def test_probe_group(attention_run, capsys):
    write_synthetic(attention_run / "trace.zarr" / "probe", seed=2)  # where probe mode writes its group
    assert main(["summary", str(attention_run), "--probe", "--json"]) == 0
    probe = json.loads(capsys.readouterr().out)
    assert probe["trace"].endswith("probe") and probe["steps"] == 4
    assert main(["summary", str(attention_run), "--json"]) == 0
    main_trace = json.loads(capsys.readouterr().out)
    assert main_trace["probe_group"] and probe["K_C"] != main_trace["K_C"]  # another trace (seed 2)
    assert main(["plot", str(attention_run), "--probe", "--kind", "tokens"]) == 0
    assert (attention_run / "plots" / "tokens-s0.html").exists()
    # exported, the probe group is the NetCDF group "probe" of the same file, read back by --probe
    nc = attention_run / "t.nc"
    assert main(["export", str(attention_run), "--netcdf", str(nc)]) == 0
    capsys.readouterr()
    assert main(["summary", str(nc), "--probe", "--json"]) == 0
    from_nc = json.loads(capsys.readouterr().out)
    for key in ("steps", "samples", "K_C", "K_N"):
        assert from_nc[key] == probe[key], key
    assert from_nc["trace"] == f"{nc}/probe" and not from_nc["probe_group"]
    assert main(["summary", str(nc), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["K_C"] == main_trace["K_C"]  # the root is the training-step trace


def test_user_mistakes_are_clean_errors(runs, attention_run, tmp_path, capsys):
    cases = [
        (["summary", str(tmp_path / "nope")], "does not exist"),
        (["summary", str(tmp_path)], "neither a run directory"),
        (["plot", str(runs / "fttp"), "--kind", "attention", "--html", str(tmp_path / "a.html")],
         "this trace has no xattn: run with attention capture enabled"),
        (["plot", str(runs / "fttp"), "--kind", "tokens", "--sample", "99"], "out of range: this trace has 6 samples"),
        (["plot", str(runs / "fttp"), "--kind", "tokens", "--png", str(tmp_path / "a.jpg")], "must end in .png"),
        (["plot", str(runs / "fttp"), str(runs / "ga"), "--kind", "tokens"], "several runs go with --kind scatter"),
        (["plot", str(attention_run), "--kind", "attention", "--layer", "2"], "decoder layers [1, 3]"),
        (["plot", str(runs / "fttp"), "--kind", "tokens", "--probe"], "has no probe group"),
        (["export", str(runs / "fttp"), "--netcdf", str(tmp_path / "no" / "t.nc")], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("knowtrace: error: ") and message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "a.html").exists() and not (tmp_path / "a.jpg").exists()
    with pytest.raises(SystemExit) as e:  # argparse: unknown kind
        main(["plot", str(runs / "fttp"), "--kind", "pie"])
    assert e.value.code == 2


def test_export_round_trips_and_the_nc_file_reads_back(runs, tmp_path, capsys):
    nc = tmp_path / "trace.nc"
    assert main(["export", str(runs / "fttp"), "--netcdf", str(nc)]) == 0
    assert capsys.readouterr().out.startswith(str(nc))
    zarr_ds, back = open_trace(runs / "fttp" / "trace.zarr"), xr.open_dataset(nc, engine="h5netcdf")
    assert back.logprob.dtype == np.float32 and set(back.data_vars) == set(zarr_ds.data_vars)
    for name in zarr_ds.data_vars:
        np.testing.assert_array_equal(back[name].values, zarr_ds[name].values.astype(np.float32))
    for name in ("token_str", "is_concept", "token_id", "sample_id"):
        np.testing.assert_array_equal(back[name].values, zarr_ds[name].values)
    assert main(["summary", str(runs / "fttp"), "--json"]) == 0
    from_zarr = json.loads(capsys.readouterr().out)
    assert main(["summary", str(nc), "--json"]) == 0  # an exported file is a RUN too
    from_nc = json.loads(capsys.readouterr().out)
    for key in ("steps", "samples", "concept_tokens", "K_C", "K_N", "attrs"):
        assert from_nc[key] == from_zarr[key], key
    assert main(["export", str(nc), "--netcdf", str(tmp_path / "again.nc")]) == 2
    assert "already a NetCDF file" in capsys.readouterr().err
    assert main(["summary", str(nc), "--probe"]) == 2  # exported without a probe group: none in the file
    assert "has no probe group" in capsys.readouterr().err
    # an existing file is kept unless --force
    before = nc.read_bytes()
    assert main(["export", str(runs / "ga"), "--netcdf", str(nc)]) == 2
    assert "exists" in capsys.readouterr().err and nc.read_bytes() == before
    assert main(["export", str(runs / "ga"), "--netcdf", str(nc), "--force"]) == 0
    replaced = xr.open_dataset(nc, engine="h5netcdf").attrs["method"]
    assert replaced != xr.open_zarr(runs / "fttp" / "trace.zarr").attrs["method"]


def test_plot_png_and_html_in_one_call(runs, tmp_path):
    png_or_skip()
    run = tmp_path / "run"
    shutil.copytree(runs / "fttp", run)
    png, html = tmp_path / "k.png", tmp_path / "k.html"
    assert main(["plot", str(run), "--kind", "knowledge", "--png", str(png), "--html", str(html)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "K_C" in html.read_text()


def test_png_of_a_slider_view_is_a_grid_of_steps_and_html_keeps_the_slider(attention_run, tmp_path, monkeypatch):
    import plotly.graph_objects as go

    from knowtrace import plots

    saved = {}
    monkeypatch.setattr(plots, "save", lambda figures: saved.update(figures) or list(figures))
    png, html = tmp_path / "a.png", tmp_path / "a.html"
    assert main(["plot", str(attention_run), "--kind", "attention", "--png", str(png), "--html", str(html)]) == 0
    assert len(saved[html].frames) == 4 and saved[html].layout.sliders  # steps 0..3 on a slider
    grid = saved[png]
    assert not grid.frames and sum(isinstance(t, go.Heatmap) for t in grid.data) == 4  # 4 steps, fewer than 6
    assert sum(isinstance(t, go.Image) for t in grid.data) == 4  # the sample's image under every panel
    saved.clear()
    assert main(["plot", str(attention_run), "--kind", "knowledge", "--png", str(png)]) == 0
    assert saved[png].layout.annotations == () or "step" not in str(saved[png].layout.annotations)  # not a grid


def test_a_reader_that_stops_early_is_not_an_error(runs):
    """`knowtrace summary RUN | head -1`: a closed pipe ends the command quietly, exit code 0."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "knowtrace", "summary", str(runs / "fttp")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0 and "BrokenPipeError" not in err and "Traceback" not in err, err
