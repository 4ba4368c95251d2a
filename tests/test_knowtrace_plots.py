"""knowtrace's Plotly views: on schema-conformant synthetic traces (written by the real TraceStore) and on
a real trace recorded by MLLMTracer during unlearning of a tiny world LLaVA."""

import os

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from knowtrace import plots
from knowtrace.knowledge import mllm_knowledge, sd_knowledge
from knowtrace.store import TraceStore, open_trace, pad_ragged

STEPS = [0, 1, 2, 3]
TOKENS = [["▁a", "▁foo", "▁b", "▁foo"], ["▁foo", "▁c", "."], ["▁d", "▁foo"]]  # "foo" twice in sample 0
CONCEPT = [[0, 1, 0, 1], [1, 0, 0], [0, 1]]
GRID, LAYERS = 4, 2


def write_synthetic(path, seed=0, method="fttp"):
    """A trace with every per-step variable of the schema; sample 2 is not in step 1's batch (NaN)."""
    rng = np.random.default_rng(seed)
    static = {
        "token_str": pad_ragged(TOKENS, "", dtype=object).astype(str),
        "token_id": pad_ragged([[4, 5, 6, 5], [5, 7, 8], [9, 5]], -1, dtype=np.int64),
        "is_concept": pad_ragged(CONCEPT, False, dtype=bool),
        "concept": np.array(["vorn"] * 3),
        "mask": rng.random((3, GRID, GRID)) > 0.6,
        "sample_id": np.array(["s/a", "s/b", "s/c"]),
        "layer": np.array([1, 3]),  # decoder layers the maps come from
    }
    store = TraceStore(path, static=static, attrs={"method": {"name": method}, "seed": seed})
    pad = torch.tensor(static["token_id"] < 0)
    for step in STEPS:
        logprob = torch.from_numpy(-rng.gamma(2.0, 0.5, size=(3, 4))).masked_fill(pad, float("nan"))
        if step == 1:
            logprob[2] = float("nan")
        k_c, k_n = mllm_knowledge(logprob, torch.tensor(static["is_concept"]))
        seen = ~torch.isnan(logprob).all(1)
        logits = torch.from_numpy(rng.normal(size=(3, LAYERS, 4, GRID * GRID)))
        xattn = torch.softmax(logits, -1).reshape(3, LAYERS, 4, GRID, GRID)  # rows sum to 1 over patches
        err = torch.from_numpy(rng.random((3, GRID, GRID)))
        store.append(step, logprob=logprob.numpy(), K_C=torch.where(seen, k_c, torch.nan).numpy(),
                     K_N=torch.where(seen, k_n, torch.nan).numpy(), loss_forget=np.float32(step),
                     xattn=xattn.numpy(), eps_err=err.numpy())
    store.flush()  # a no-op with the default flush_seconds=0; explicit in case the default changes
    return open_trace(path)


@pytest.fixture
def synthetic(tmp_path):
    return write_synthetic(tmp_path / "trace.zarr")


def test_token_trajectories_one_line_per_position_repeated_tokens_apart(synthetic):
    fig = plots.token_trajectories(synthetic, sample=0)
    assert [t.name for t in fig.data] == ["0:a", "1:foo", "2:b", "3:foo"]
    values = synthetic.logprob.isel(sample=0).values
    for pos, trace in enumerate(fig.data):
        assert list(trace.x) == STEPS
        np.testing.assert_array_equal(np.asarray(trace.y, float), values[:, pos])
    concept = [t.line.color == plots.CONCEPT_COLOR and t.line.width == 4 for t in fig.data]
    assert concept == [False, True, False, True]
    assert "fttp" in fig.layout.title.text
    short = plots.token_trajectories(synthetic.logprob, sample=1)  # a DataArray; padding dropped
    assert [t.name for t in short.data] == ["0:foo", "1:c", "2:."]
    with pytest.raises(IndexError, match="3 samples"):
        plots.token_trajectories(synthetic, sample=3)


def test_knowledge_over_steps_mean_band_and_per_sample(synthetic):
    k_c, k_n = synthetic.K_C.values.astype(float), synthetic.K_N.values.astype(float)  # (step, sample)
    assert np.isnan(k_c[1, 2]) and np.isfinite(k_c).sum() == 11
    fig = plots.knowledge_over_steps(synthetic)
    hi, lo, mean = fig.data[:3]  # K_C: band top, band bottom, mean line
    np.testing.assert_allclose(np.asarray(mean.y, float), np.nanmean(k_c, 1))
    np.testing.assert_allclose(np.asarray(lo.y, float), np.nanmin(k_c, 1))
    np.testing.assert_allclose(np.asarray(hi.y, float), np.nanmax(k_c, 1))
    np.testing.assert_allclose(np.asarray(fig.data[5].y, float), np.nanmean(k_n, 1))
    assert fig.data[5].yaxis == "y2" and mean.yaxis == "y"
    std = plots.knowledge_over_steps(synthetic.K_C, synthetic.K_N, band="std")
    np.testing.assert_allclose(np.asarray(std.data[0].y, float), np.nanmean(k_c, 1) + np.nanstd(k_c, 1))
    each = plots.knowledge_over_steps(synthetic, samples="all", band=None)
    assert len(each.data) == 6
    np.testing.assert_array_equal(np.asarray(each.data[4].y, float), k_n[:, 1])
    one = plots.knowledge_over_steps(synthetic, samples=2)
    assert [t.name for t in one.data] == ["K_C sample 2", "K_N sample 2"]
    with pytest.raises(ValueError, match="band"):
        plots.knowledge_over_steps(synthetic, band="iqr")


def test_knowledge_scatter_final_and_trajectory(tmp_path, synthetic):
    other = write_synthetic(tmp_path / "other.zarr", seed=1, method="ga")
    runs = {"fttp": synthetic, "ga": other}
    fig = plots.knowledge_scatter(runs)
    assert [t.name for t in fig.data] == ["fttp", "ga"]
    for trace, ds in zip(fig.data, runs.values()):
        # each sample's last recorded value: step 3 for all (sample 2 skipped step 1 only)
        assert trace.x[0] == pytest.approx(float(np.mean(ds.K_C.values[3])))
        assert trace.y[0] == pytest.approx(float(np.mean(ds.K_N.values[3])))
    path = plots.knowledge_scatter(runs, mode="trajectory")
    np.testing.assert_allclose(np.asarray(path.data[1].x, float), np.nanmean(other.K_C.values, 1))
    assert list(path.data[0].customdata) == STEPS and path.data[0].marker.symbol[0] == "circle-open"
    assert plots.last_finite(synthetic.K_C.isel(step=[0, 1]))[2] == pytest.approx(float(synthetic.K_C.values[0, 2]))
    with pytest.raises(plots.MissingVariableError, match="this trace has no K_C"):
        plots.knowledge_scatter({"x": synthetic.drop_vars("K_C")})


def test_attention_slider_frames_values_and_image_underlay(synthetic):
    from unlearn.world.render import world_image

    fig = plots.attention_slider(synthetic, sample=0)  # default: the concept's tokens 1 and 3, mean over layers
    assert len(fig.frames) == len(STEPS) and [f.name for f in fig.frames] == [str(s) for s in STEPS]
    slider = fig.layout.sliders[0]
    assert [s.label for s in slider.steps] == [str(s) for s in STEPS] and len(slider.steps) == synthetic.sizes["step"]
    x = synthetic.xattn.values[:, 0].astype(float)  # (step, layer, token, y, x)
    expected = x[:, :, [1, 3]].mean(axis=(1, 2))  # (step, y, x)
    for k, frame in enumerate(fig.frames):
        np.testing.assert_allclose(np.asarray(frame.data[0].z, float), expected[k])
    np.testing.assert_allclose(np.asarray(fig.data[0].z, float), expected[0])
    assert fig.data[0].zmin == pytest.approx(expected.min()) and fig.data[0].zmax == pytest.approx(expected.max())
    assert "1:foo, 3:foo" in fig.layout.title.text
    one = plots.attention_slider(synthetic.xattn, sample="s/b", tokens=[1], layer=3)  # by id; decoder layer 3
    np.testing.assert_allclose(np.asarray(one.frames[2].data[0].z, float), synthetic.xattn.values[2, 1, 1, 1])
    assert "sample 1 (s/b)" in one.layout.title.text and "layer 3" in one.layout.title.text
    with pytest.raises(IndexError, match=r"decoder layers \[1, 3\]"):
        plots.attention_slider(synthetic, layer=0)
    with pytest.raises(KeyError, match="no sample with id 'nope'"):
        plots.attention_slider(synthetic, sample="nope")
    image = world_image("vorn", "unlearn", 0, size=32).image
    under = plots.attention_slider(synthetic, sample=0, image=image)
    assert isinstance(under.data[0], go.Image) and under.data[1].dx == 32 / GRID
    assert under.frames[0].traces == (1,)  # frames replace the heatmap only
    np.testing.assert_array_equal(np.asarray(under.data[0].z), image)
    with pytest.raises(IndexError, match="answer positions"):
        plots.attention_slider(synthetic, tokens=[9])
    with pytest.raises(plots.MissingVariableError, match="this trace has no xattn: run with attention capture"):
        plots.attention_slider(synthetic.drop_vars("xattn"))


def test_eps_err_slider_outlines_the_mask(synthetic):
    fig = plots.eps_err_slider(synthetic, sample=2)
    assert len(fig.frames) == len(STEPS) and fig.data[1].name == "concept mask"
    mask = synthetic.mask.values[2]
    # each outline segment separates a mask cell from a non-mask cell (or the border): count them by hand
    padded = np.pad(mask, 1)
    edges = sum(int(not padded[i + 1 + di, j + 1 + dj]) for i, j in zip(*np.nonzero(mask))
                for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)))
    assert edges > 0 and list(fig.data[1].x).count(None) == edges
    xs, ys = plots.mask_outline(np.array([[True, False]]), x0=0, dx=1, y0=0, dy=1)  # one cell: its 4 sides
    assert xs == [-0.5, 0.5, None, -0.5, 0.5, None, -0.5, -0.5, None, 0.5, 0.5, None]
    assert ys == [-0.5, -0.5, None, 0.5, 0.5, None, -0.5, 0.5, None, -0.5, 0.5, None]
    np.testing.assert_allclose(np.asarray(fig.frames[3].data[0].z, float), synthetic.eps_err.values[3, 2])
    # the map is what K_C / K_N summarise: same error, same mask
    k_c, _ = sd_knowledge(torch.from_numpy(synthetic.eps_err.values[3, 2:3]), torch.from_numpy(synthetic.mask.values[2:3]))
    assert float(k_c[0]) == pytest.approx(np.exp(-synthetic.eps_err.values[3, 2][synthetic.mask.values[2]].mean()))


def test_panels_show_evenly_spaced_steps_on_one_colour_scale(synthetic):
    """``panels=n`` (what --png draws for a slider view): n evenly spaced steps, first and last
    included, the same maps as the slider's frames, one colour scale shown for all."""
    assert plots.panel_steps(10, 4) == [0, 3, 6, 9] and plots.panel_steps(3, 6) == [0, 1, 2]
    assert plots.panel_steps(5, 1) == [0]
    slider = plots.eps_err_slider(synthetic, sample=2)
    grid = plots.eps_err_slider(synthetic, sample=2, panels=3)
    chosen = plots.panel_steps(len(STEPS), 3)
    heats = [t for t in grid.data if isinstance(t, go.Heatmap)]
    assert not grid.frames and len(heats) == len(chosen) == 3 and chosen[0] == 0 and chosen[-1] == len(STEPS) - 1
    assert [a.text for a in grid.layout.annotations] == [f"step {STEPS[k]}" for k in chosen]
    for heat, k in zip(heats, chosen):
        np.testing.assert_allclose(np.asarray(heat.z, float), np.asarray(slider.frames[k].data[0].z, float))
        assert (heat.zmin, heat.zmax) == (slider.data[0].zmin, slider.data[0].zmax)
    assert [h.showscale for h in heats] == [True, False, False]
    assert sum(t.name == "concept mask" for t in grid.data) == 3  # the outline on every panel
    with pytest.raises(ValueError, match="panels must be >= 1"):
        plots.attention_slider(synthetic, panels=0)


def test_save_html_atomic_and_errors(tmp_path, synthetic):
    fig = plots.token_trajectories(synthetic)
    out = plots.save({tmp_path / "t.html": fig})
    text = out[0].read_text()
    assert "plotly" in text.lower() and "3:foo" in text and "1:foo" in text
    assert not list(tmp_path.glob(".*partial*"))
    with pytest.raises(ValueError, match="unknown figure format"):
        plots.save({tmp_path / "t.gif": fig})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plots.save({tmp_path / "no" / "t.html": fig})


def png_or_skip():
    """PNG tests run where kaleido + Chromium exist; `make test` provisions them and sets
    KNOWTRACE_REQUIRE_PNG=1, which turns a missing exporter into a failure instead of a skip."""
    why = plots.png_unavailable()
    if why and os.environ.get("KNOWTRACE_REQUIRE_PNG") == "1":
        pytest.fail(why)
    if why:
        pytest.skip(why)


def test_no_browser_is_a_clear_error_and_writes_nothing(tmp_path, synthetic, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chromium"))  # kaleido's lookup takes it as given
    why = plots.png_unavailable()
    assert why is not None and "Chromium" in why
    fig = plots.token_trajectories(synthetic)
    with pytest.raises(plots.ExportUnavailable, match="apt-get install -y chromium"):
        plots.save({tmp_path / "t.html": fig, tmp_path / "t.png": fig})
    assert list(tmp_path.iterdir()) == [tmp_path / "trace.zarr"]  # not even the HTML


def test_png_export_batched(tmp_path, synthetic):
    png_or_skip()
    figs = {tmp_path / "tokens.png": plots.token_trajectories(synthetic),
            tmp_path / "attention.png": plots.attention_slider(synthetic),
            tmp_path / "k.html": plots.knowledge_over_steps(synthetic)}
    plots.save(figs)  # one browser start for both PNGs
    for name in ("tokens.png", "attention.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert (width, height) == (700, 500)  # plotly's default export size
    assert not list(tmp_path.glob(".*partial*"))


# ------------------------------------------------------------------ a real trace of a real (tiny) LLaVA
@pytest.fixture(scope="module")
def real_trace(tmp_path_factory):
    """3 FTTP steps on the tiny world LLaVA, traced with attention capture (knowtrace.trace, last layer);
    returns the trace path and the forget records (their images are the attention underlays)."""
    from knowtrace import trace
    from tests.test_unlearn_mllm import WORLD, _setup
    from unlearn.loop import TrainConfig, run_loop
    from unlearn.methods import get_method
    from unlearn.models import load_mllm
    from unlearn.tracing import traced_samples
    from unlearn.world.source import resolve_model

    root = tmp_path_factory.mktemp("real")
    load_mllm(resolve_model("world", "mllm", root / "world", WORLD))
    adapter, concept, forget, _ = _setup(root / "world")
    path = root / "trace.zarr"
    with trace(adapter.model, path, traced_samples(adapter, forget, concept.names), attention=True,
               attrs={"method": {"name": "fttp"}, "seed": 0}) as tracer:
        run_loop(adapter, get_method("fttp"), forget, [], TrainConfig(steps=3), concept.key, concept.names,
                 callbacks=[tracer], progress=False)
    return path, forget


def test_views_of_a_real_trace(real_trace):
    ds = open_trace(real_trace[0])
    strs, ids, flags = ds.token_str.values[0], ds.token_id.values[0], ds.is_concept.values[0]
    n = int((ids >= 0).sum())
    fig = plots.token_trajectories(ds, sample=0)
    assert len(fig.data) == n
    assert [t.name for t in fig.data] == [f"{p}:{plots.clean_token(strs[p])}" for p in range(n)]
    assert [t.name.split(":", 1)[1] for t, f in zip(fig.data, flags) if f] == ["Vorn"]
    assert [t.line.color == plots.CONCEPT_COLOR for t in fig.data] == list(flags[:n])
    for p, trace in enumerate(fig.data):
        np.testing.assert_array_equal(np.asarray(trace.y, float), ds.logprob.values[:, 0, p])
    assert np.isfinite(np.asarray(fig.data[0].y, float)[0])  # sample 0 is in step 0's batch
    k = plots.knowledge_over_steps(ds)
    np.testing.assert_allclose(np.asarray(k.data[2].y, float), np.nanmean(ds.K_C.values, 1))
    scatter = plots.knowledge_scatter({"fttp": ds})
    assert scatter.data[0].x[0] == pytest.approx(float(np.nanmean(plots.last_finite(ds.K_C))))


def test_attention_slider_on_a_real_trace(real_trace):
    path, forget = real_trace
    ds = open_trace(path)
    assert ds.xattn.sizes["layer"] == 1 and np.isfinite(ds.xattn.values[0, 0]).any()  # sample 0: step 0's batch
    image = np.asarray(forget[0].image)
    fig = plots.attention_slider(ds, sample=0, image=image)
    assert len(fig.frames) == ds.sizes["step"] == len(fig.layout.sliders[0].steps) == 3
    concept = np.flatnonzero(ds.is_concept.values[0])
    expected = ds.xattn.values[:, 0, 0][:, concept].astype(float).mean(1)  # (step, y, x), the one recorded layer
    for k, frame in enumerate(fig.frames):
        np.testing.assert_allclose(np.asarray(frame.data[0].z, float), expected[k])
    assert np.isfinite(expected[0]).all()
    assert under_cells(fig) == (image.shape[1] / ds.sizes["x"], image.shape[0] / ds.sizes["y"])
    assert f"{concept[0]}:Vorn" in fig.layout.title.text
    text_only = int(np.flatnonzero(np.isnan(ds.xattn.values).all(axis=(0, 2, 3, 4, 5)))[0])  # a fact: no image
    with pytest.raises(ValueError, match="all values are NaN"):
        plots.attention_slider(ds, sample=text_only)


def under_cells(fig):
    return fig.data[1].dx, fig.data[1].dy


def test_eps_err_slider_on_a_real_sd_trace(tmp_path):
    """3 gradient-ascent steps of a tiny real UNet2DConditionModel, traced by SDTracer (UNet hook)."""
    import cv2

    from knowtrace import SDSample, SDTracer
    from tests.test_knowtrace_sd import _tiny_unet
    from unlearn.world.render import world_image

    rendered = world_image("vorn", "unlearn", 0, size=64)
    mask = cv2.resize(rendered.masks["vorn"].astype(np.uint8), (8, 8), interpolation=cv2.INTER_AREA) > 0  # latent grid
    unet = _tiny_unet()
    opt = torch.optim.SGD(unet.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    z, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 5, 16, generator=g)
    with SDTracer(tmp_path / "sd.zarr", [SDSample("vorn0", mask, "vorn")], unet=unet) as tracer:
        for step in range(3):
            loss = -(unet(z, torch.tensor([500]), encoder_hidden_states=cond).sample - noise).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            tracer.record_target(step, noise, ["vorn0"])
    ds = open_trace(tmp_path / "sd.zarr")
    fig = plots.eps_err_slider(ds, sample="vorn0", image=rendered.image)
    assert len(fig.frames) == len(fig.layout.sliders[0].steps) == 3
    for k, frame in enumerate(fig.frames):
        np.testing.assert_allclose(np.asarray(frame.data[0].z, float), ds.eps_err.values[k, 0])
    assert fig.data[1].dx == 8 and fig.data[2].name == "concept mask"  # 64 px image over an 8x8 latent grid
    assert mask.any() and (~mask).any()
    errs = ds.eps_err.values[:, 0]
    assert errs[2].mean() > errs[0].mean()  # gradient ascent raised the error, and the map shows it
    k = plots.knowledge_over_steps(ds, samples=0)
    np.testing.assert_allclose(np.asarray(k.data[0].y, float), ds.K_C.values[:, 0])
