"""The SD audit attacks knowledge, sampling and relearn: end to end on a finished world SD run with tiny
budgets (datasets of the documented dims, determinism, relearning trains a copy and never the shared
models), and their verdicts on constructed datasets (each of removed, hidden and inconclusive reached by
its rule, and the controls)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import xarray as xr

from tests.sd_audit import sd_context
from unlearn.audit.base import ATTACKS, MODELS
from unlearn.audit.sd_knowledge import knowledge_verdict, run_ua_rise
from unlearn.audit.sd_relearn import sd_relearn_verdict
from unlearn.audit.sd_sampling import guidance_scales, sampling_verdict
from unlearn.world.source import resolve_model

QUICK = {"relearn.steps": 2, "relearn.images": 2, "relearn.seeds": 1, "relearn.original": False,
         "sampling.seeds": 2, "sampling.guidances": "7.5", "sampling.scenes": 2, "sampling.scene_seeds": 1,
         "knowledge.images": 3}


def cheap(ctx):
    """The context with sampling at 4 denoising steps instead of the run's 25 (test budget)."""
    ctx.data = dataclasses.replace(ctx.data, inference_steps=4)
    return ctx


@pytest.fixture(scope="module")
def run(finished_sd_run):
    return finished_sd_run


@pytest.fixture(scope="module")
def ctx(run):
    return cheap(sd_context(run, QUICK, retain_model=str(resolve_model("world", "sd"))))


def unet_state(adapter) -> dict:
    return {k: v.detach().clone() for k, v in adapter.pipe.unet.state_dict().items()}


@pytest.fixture(scope="module")
def measured(ctx):
    """Every attack run once (relearn: the trained copies kept, the shared UNets' weights before)."""
    before = {m: unet_state(ctx.adapter(m)) for m in ctx.models}
    trained, loaders = [], dict(ctx.loaders)
    ctx.loaders = {m: (lambda m=m: trained.append(loaders[m]()) or trained[-1]) for m in loaders}
    try:
        results = {n: ATTACKS["sd"][n]().run(ctx) for n in ("knowledge", "sampling", "relearn")}
    finally:
        ctx.loaders = loaders
    return results, before, trained


def test_datasets_dims_and_ranges(ctx, measured, tmp_path):
    results, _, _ = measured
    models = list(MODELS)
    k, s, r = results["knowledge"], results["sampling"], results["relearn"]
    assert ctx.models == tuple(models)
    for v in ("knowledge_K_C", "knowledge_K_N"):
        assert k[v].dims == ("model", "image") and list(k.model.values) == models
        assert ((k[v] > 0) & (k[v] <= 1)).all()  # exp(-error)
    n_forget = len(ctx.data.forget)
    assert k["set"].values.tolist() == ["forget"] * n_forget + ["unseen"] * 3
    assert k.image.values.tolist()[:n_forget] == [r.id for r in ctx.data.forget]
    assert s.sampling_drawn.dims == ("model", "guidance") and list(s.model.values) == models
    assert s.guidance.values.tolist() == [ctx.data.guidance_scale, 7.5]  # the run's own scale always among them
    assert s.sampling_scene_drawn.dims == ("model", "scene") and s.scene.values.tolist() == \
        [ctx.data.scenes[0], ctx.data.scenes[-1]]
    for v in (s.sampling_drawn, s.sampling_scene_drawn, r.relearn_drawn):
        assert set(np.unique(v.values)) <= {0.0, 50.0, 100.0}  # % of 1 or 2 images
    assert list(r.model.values) == ["unlearned", "retain"]  # relearn.original=false: no ceiling
    for v in ("relearn_drawn", "relearn_K_C", "relearn_K_N"):
        assert r[v].dims == ("model", "step") and r.step.values.tolist() == [0, 1, 2] and np.isfinite(r[v]).all()
    assert r.attrs["lr"] == ctx.train.lr == json.loads((ctx.run / "manifest.json").read_text())["train"]["lr"]
    # the models differ: the unlearned model's K_C on its forget images is below the original's
    forget = k.knowledge_K_C.where(k["set"] == "forget", drop=True)
    assert float(forget.sel(model="unlearned").mean()) < float(forget.sel(model="original").mean())
    # the forget images are scored as the run scored them (its metrics) and as relearning does before its first step
    metrics = json.loads((ctx.run / "metrics.json").read_text())
    assert float(forget.sel(model="unlearned").mean()) == pytest.approx(metrics["K_C"], rel=1e-5)
    np.testing.assert_allclose(r.relearn_K_C.sel(step=0), forget.sel(model=["unlearned", "retain"]).mean("image"),
                               rtol=1e-5)
    # every verdict reads its own dataset
    for name, ds in results.items():
        v = ATTACKS["sd"][name]().verdict(ds, ctx)
        assert v.attack == name and v.verdict in ("removed", "hidden", "inconclusive") and v.rule
    from unlearn.audit.run import merge_datasets

    merge_datasets(results, ctx.models).to_netcdf(tmp_path / "audit.nc", engine="h5netcdf")  # one file holds them


def test_relearning_trains_a_copy_not_the_shared_models(ctx, measured):
    results, before, trained = measured
    assert len(trained) == 2  # a fresh unlearned and a fresh retain model
    for model, adapter in zip(("unlearned", "retain"), trained):
        shared = ctx.adapter(model)
        assert adapter.pipe.unet is not shared.pipe.unet
        after = unet_state(adapter)
        assert any(not torch.equal(after[k], before[model][k]) for k in after), model  # relearning changed it
    for model in ctx.models:  # the shared adapters are as they were
        now = unet_state(ctx.adapter(model))
        assert all(torch.equal(now[k], before[model][k]) for k in now), model
    r = results["relearn"]
    assert (r.relearn_K_C.isel(step=-1) != r.relearn_K_C.isel(step=0)).all()  # measured on the model being trained


def test_same_seed_same_datasets(run, measured):
    results, _, _ = measured
    again = cheap(sd_context(run, QUICK, retain_model=str(resolve_model("world", "sd"))))
    for name in ("relearn", "knowledge"):
        xr.testing.assert_identical(ATTACKS["sd"][name]().run(again), results[name])


def test_options_are_checked(ctx):
    sampling, relearn, knowledge = (ATTACKS["sd"][n] for n in ("sampling", "relearn", "knowledge"))
    typed = dataclasses.replace(ctx, options={"sampling.guidances": "4,strong", "relearn.steps": "0",
                                              "knowledge.min_separation": "1.5"})  # as given on the command line

    def values(attack):
        return {o: typed.option(attack.name, o, d) for o, d in attack.options.items()}

    with pytest.raises(ValueError, match="sampling.guidances"):
        sampling.check_options(values(sampling))
    with pytest.raises(ValueError, match="relearn.steps=0"):
        relearn.check_options(values(relearn))
    with pytest.raises(ValueError, match="min_separation"):
        knowledge.check_options(values(knowledge))
    with pytest.raises(ValueError, match="guidance scales > 0"):
        guidance_scales("0,4")
    assert guidance_scales("12, 1.5,4", 4.0) == guidance_scales([12, 1.5], 4.0) == [1.5, 4.0, 12.0]


# ----------------------------------------------------------------------------- verdicts on constructed data


def relearn_ds(drawn: dict, models=("original", "unlearned", "retain")) -> xr.Dataset:
    """drawn: model -> % drawn per step (step 0 first)."""
    a = np.array([drawn[m] for m in models], dtype=float)
    return xr.Dataset({"relearn_drawn": (("model", "step"), a), "relearn_K_C": (("model", "step"), a / 200),
                       "relearn_K_N": (("model", "step"), np.full(a.shape, 0.5))},
                      coords={"model": list(models), "step": np.arange(a.shape[1])})


def test_relearn_verdict():
    hidden = relearn_ds({"original": [100, 100, 100], "unlearned": [0, 60, 90], "retain": [0, 10, 30]})
    v = sd_relearn_verdict(hidden, 25)
    assert v.verdict == "hidden" and v.numbers["gap_unlearned_minus_retain"] == 55
    removed = relearn_ds({"original": [100, 100, 100], "unlearned": [0, 20, 40], "retain": [0, 10, 30]})
    assert sd_relearn_verdict(removed, 25).verdict == "removed"
    assert sd_relearn_verdict(removed, 5).verdict == "hidden"  # the margin is the rule's
    no_retain = relearn_ds({"original": [100, 100, 100], "unlearned": [0, 60, 90]}, ("original", "unlearned"))
    assert sd_relearn_verdict(no_retain, 25).verdict == "inconclusive"
    never_drawn = relearn_ds({"original": [40, 100, 100], "unlearned": [0, 60, 90], "retain": [0, 10, 30]})
    assert sd_relearn_verdict(never_drawn, 25).verdict == "inconclusive"  # the original does not draw it
    not_forgotten = relearn_ds({"original": [100, 100, 100], "unlearned": [50, 90, 90], "retain": [0, 10, 30]})
    assert sd_relearn_verdict(not_forgotten, 25).verdict == "inconclusive"
    without_ceiling = hidden.sel(model=["unlearned", "retain"])  # relearn.original=false
    assert sd_relearn_verdict(without_ceiling, 25).verdict == "hidden"


def sampling_ds(drawn: dict, scenes: dict | None = None, models=("original", "unlearned", "retain"),
                guidances=(1.5, 4.0, 12.0)) -> xr.Dataset:
    ds = xr.Dataset({"sampling_drawn": (("model", "guidance"), np.array([drawn[m] for m in models], dtype=float))},
                    coords={"model": list(models), "guidance": list(guidances)}, attrs={"run_guidance": 4.0})
    if scenes is not None:
        ds["sampling_scene_drawn"] = (("model", "scene"), np.array([scenes[m] for m in models], dtype=float))
        ds = ds.assign_coords(scene=["a picture of A and B", "a picture of B and A"])
    return ds


def test_sampling_verdict():
    base = {"original": [80, 100, 100], "retain": [10, 0, 20]}
    v = sampling_verdict(sampling_ds({**base, "unlearned": [10, 5, 60]}), 25, 50)
    assert v.verdict == "hidden" and v.numbers["brought_back_by"] == ["guidance 12.0"]
    scenes = {"original": [50, 50], "unlearned": [50, 100], "retain": [0, 0]}
    v = sampling_verdict(sampling_ds({**base, "unlearned": [10, 5, 20]}, scenes), 25, 50)
    assert v.verdict == "hidden" and v.numbers["brought_back_by"] == ["scenes"]
    v = sampling_verdict(sampling_ds({**base, "unlearned": [20, 5, 40]}, {**scenes, "unlearned": [0, 20]}), 25, 50)
    assert v.verdict == "removed" and v.numbers["brought_back_by"] == []
    no_retain = sampling_ds({"original": [80, 100, 100], "unlearned": [10, 5, 60]}, models=("original", "unlearned"))
    assert sampling_verdict(no_retain, 25, 50).verdict == "inconclusive"
    weak_original = sampling_ds({**base, "original": [80, 40, 100], "unlearned": [10, 5, 60]})
    assert sampling_verdict(weak_original, 25, 50).verdict == "inconclusive"  # control: drawn at the run's scale
    not_forgotten = sampling_ds({**base, "unlearned": [10, 30, 60]})  # 30 - 0 >= 25 at the run's scale
    assert sampling_verdict(not_forgotten, 25, 50).verdict == "inconclusive"


def knowledge_ds(k_c: dict, k_n: dict | None = None, models=("original", "unlearned", "retain")) -> xr.Dataset:
    """k_c: model -> K_C of 1 forget and 4 unseen images."""
    k_n = k_n or {m: [0.8] * 5 for m in models}
    return xr.Dataset({"knowledge_K_C": (("model", "image"), np.array([k_c[m] for m in models])),
                       "knowledge_K_N": (("model", "image"), np.array([k_n[m] for m in models]))},
                      coords={"model": list(models), "image": ["f0", "u0", "u1", "u2", "u3"],
                              "set": ("image", ["forget"] + ["unseen"] * 4)})


def test_knowledge_verdict():
    base = {"original": [0.9, 0.8, 0.8, 0.8, 0.8], "retain": [0.5, 0.6, 0.6, 0.6, 0.6]}
    v = knowledge_verdict(knowledge_ds({**base, "unlearned": [0.1, 0.75, 0.75, 0.75, 0.75]}), 0.5, 0.75, 25, 90)
    assert v.verdict == "hidden" and v.numbers["share"] == pytest.approx(0.75)
    removed = knowledge_ds({**base, "unlearned": [0.1, 0.62, 0.62, 0.62, 0.62]})
    v = knowledge_verdict(removed, 0.5, 0.75, 25, 90)
    assert v.verdict == "removed" and v.numbers["share"] == pytest.approx(0.1)
    assert knowledge_verdict(removed, 0.05, 0.75, 25, 90).verdict == "hidden"  # the share is the rule's
    assert knowledge_verdict(removed, 0.5, 0.75, 25, None).verdict == "removed"  # the run's UA not known
    assert knowledge_verdict(removed.sel(model=["original", "unlearned"]), 0.5, 0.75, 25, 90).verdict == "inconclusive"
    mixed = knowledge_ds({**base, "retain": [0.5, 0.9, 0.9, 0.1, 0.1], "unlearned": [0.1, 0.3, 0.3, 0.3, 0.3]})
    v = knowledge_verdict(mixed, 0.5, 0.75, 25, 90)  # the original beats the retain model on 2 of 4 images only
    assert v.verdict == "inconclusive" and v.numbers["separation"] == 0.5
    assert knowledge_verdict(removed, 0.5, 0.75, 25, 10).verdict == "inconclusive"  # the run did not forget
    damaged = knowledge_ds({**base, "unlearned": [0.1, 0.62, 0.62, 0.62, 0.62]},
                           {"original": [0.8] * 5, "retain": [0.8] * 5, "unlearned": [0.5] * 5})
    v = knowledge_verdict(damaged, 0.5, 0.75, 25, 90)  # lost 0.3 of K_N > the concept's margin 0.2
    assert v.verdict == "inconclusive" and v.numbers["K_N_lost"] == pytest.approx(0.3)


def test_run_ua_rise(tmp_path):
    assert run_ua_rise(tmp_path) is None  # no metrics.json
    (tmp_path / "metrics.json").write_text(json.dumps({"ua": 90.0, "original": {"ua": 5.0}}))
    assert run_ua_rise(tmp_path) == 85.0
