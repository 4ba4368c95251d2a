"""The audit attacks mia, probes and lens on tiny random-weight LLaVA models with the world's tokenizer and
records: their datasets (dims, coordinates, value ranges), determinism, bad input, and their verdicts on
constructed datasets (each of removed, hidden and inconclusive reached by its rule)."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tests.tiny_models import tiny_llava
from unlearn.audit.base import ATTACKS, AuditContext, AuditData
from unlearn.audit.lens import LogitLens
from unlearn.audit.mia import MembershipInference
from unlearn.audit.probes import LinearProbes
from unlearn.models.llava import LlavaAdapter
from unlearn.world.concepts import BY_KEY
from unlearn.world.records import ImageBank, world_records
from unlearn.world.texts import ImageRef, identify_qa, image_records

SEEDS = {"original": 0, "unlearned": 1, "retain": 2}  # three different random models
PROBE_CONCEPTS = ("grom", "blip", "zuzu")


def audit_data() -> AuditData:
    bank, rng = ImageBank(32, 0), np.random.default_rng(0)
    grom = BY_KEY["grom"]

    def records(split, indices):
        return world_records([qa for i in indices for qa in image_records(grom, ImageRef("grom", split, i), rng)
                              if qa.concept == "grom"], bank)

    # disjoint images: "test" 0-1 (test), 10-11 (non-members), 20-23 (probe training), 30-32 (probe test)
    probe_train = world_records([identify_qa(BY_KEY[k], ImageRef(k, "test", 20 + i)) for k in PROBE_CONCEPTS
                                 for i in range(4)], bank)
    probe_test = world_records([identify_qa(grom, ImageRef("grom", "test", 30 + i)) for i in range(3)], bank)
    return AuditData(concept="grom", names=grom.names, forget=records("unlearn", [0]), test=records("test", [0, 1]),
                     unseen=records("unlearn", [5]), unrelated=[], rephrased=[], members=records("pretrain", [0, 1]),
                     nonmembers=records("test", [10, 11]), probe_train=probe_train,
                     probe_labels=[PROBE_CONCEPTS.index(r.concept) for r in probe_train], probe_test=probe_test,
                     concept_label=0)


def context(models=tuple(SEEDS), data=None, options=None) -> AuditContext:
    loaders = {m: (lambda s=SEEDS[m], m=m: LlavaAdapter(*tiny_llava(seed=s), name=m)) for m in models}
    return AuditContext(run=Path("unused"), manifest={}, data=data or audit_data(), loaders=loaders, train=None,
                        options=options or {}, seed=0)


@pytest.fixture(scope="module")
def measured():
    ctx = context()
    return ctx, {name: ATTACKS["mllm"][name]().run(ctx) for name in ("mia", "probes", "lens")}


def test_datasets_dims_coords_and_ranges(measured, tmp_path):
    ctx, ds = measured
    mia, probes, lens = ds["mia"], ds["probes"], ds["lens"]
    models = ["original", "unlearned", "retain"]
    assert mia.mia_value.dims == ("model", "mia_score", "mia_record") and list(mia.model.values) == models
    assert list(mia.mia_score.values) == ["loss", "zlib", "min_k", "min_k++"]
    assert mia.sizes["mia_record"] == len(ctx.data.members) + len(ctx.data.nonmembers) == 12
    assert mia.mia_member.values.tolist() == [1] * 6 + [0] * 6
    assert ((mia.mia_auc >= 0) & (mia.mia_auc <= 1)).all()
    assert (mia.mia_value.sel(mia_score="loss") > 0).all()  # a mean negative log-prob
    np.testing.assert_allclose(mia.mia_privleak.sel(model="retain"), 0, atol=1e-6)
    for d in (probes, lens):
        assert list(d.model.values) == models and list(d.layer.values) == [0, 1, 2]  # embeddings + 2 layers
    for var in ("probes_accuracy", "probes_fresh_accuracy", "lens_prob", "lens_top"):
        d = probes if var.startswith("probe") else lens
        assert d[var].dims == ("model", "layer") and ((d[var] >= 0) & (d[var] <= 1)).all(), var
    # the original's probe on the original's own states is its fresh probe: the same numbers
    np.testing.assert_array_equal(probes.probes_accuracy.sel(model="original"),
                                  probes.probes_fresh_accuracy.sel(model="original"))
    assert ((lens.lens_rank >= 0) & (lens.lens_rank < 258)).all()  # the world tokenizer's vocabulary
    assert lens.attrs["lens_records"] == 9  # identify, yes and linked on 3 images: every answer names it
    merged = xr.merge(list(ds.values()), combine_attrs="no_conflicts")  # as the audit writes them, one file
    merged.to_netcdf(tmp_path / "audit.nc", engine="h5netcdf")
    back = xr.open_dataset(tmp_path / "audit.nc", engine="h5netcdf")
    np.testing.assert_array_equal(back.mia_auc.values, mia.mia_auc.values)


def test_same_seed_same_numbers(measured):
    ctx, ds = measured
    again = context()
    for name in ("mia", "probes", "lens"):
        xr.testing.assert_identical(ATTACKS["mllm"][name]().run(again), ds[name])


def test_without_retain_every_verdict_is_inconclusive():
    ctx = context(models=("original", "unlearned"))
    mia = MembershipInference().run(ctx)
    assert list(mia.model.values) == ["original", "unlearned"] and np.isnan(mia.mia_privleak.values).all()
    assert MembershipInference().verdict(mia, ctx).verdict == "inconclusive"
    lens = LogitLens().run(ctx)
    assert LogitLens().verdict(lens, ctx).verdict == "inconclusive"


def test_bad_input_is_a_clear_error():
    data = audit_data()
    ctx = context(data=replace(data, concept_label=7))
    with pytest.raises(ValueError, match="concept_label 7 is not among probe_labels"):
        LinearProbes().run(ctx)
    with pytest.raises(ValueError, match="members and non-members"):
        MembershipInference().run(context(data=replace(data, nonmembers=[])))
    with pytest.raises(ValueError, match="names it"):
        LogitLens().run(context(data=replace(data, names=("Nobody",))))
    with pytest.raises(ValueError, match="mia.score"):
        MembershipInference().verdict(xr.Dataset(), context(options={"mia.score": "entropy"}))


# ----------------------------------------------------------------------------- verdicts on constructed datasets

MODELS = ["original", "unlearned", "retain"]


def mia_dataset(aucs):
    """A mia dataset whose every score has AUC aucs[model] (privleak as the attack computes it)."""
    from knowtrace.mia import SCORES, privleak

    auc = np.array([[aucs[m]] * len(SCORES) for m in MODELS])
    leak = np.array([[privleak(aucs[m], aucs["retain"])] * len(SCORES) for m in MODELS])
    return xr.Dataset({"mia_auc": (("model", "mia_score"), auc), "mia_privleak": (("model", "mia_score"), leak)},
                      coords={"model": MODELS, "mia_score": list(SCORES)})


@pytest.mark.parametrize("aucs, verdict", [
    ({"original": 0.95, "unlearned": 0.52, "retain": 0.5}, "removed"),  # privleak -4 %
    ({"original": 0.95, "unlearned": 0.8, "retain": 0.5}, "hidden"),  # -60 %
    ({"original": 0.95, "unlearned": 0.1, "retain": 0.5}, "inconclusive"),  # +80 %: over-unlearned
    ({"original": 0.52, "unlearned": 0.8, "retain": 0.5}, "inconclusive"),  # the original does not leak: no power
])
def test_mia_verdict_follows_its_rule(aucs, verdict):
    v = MembershipInference().verdict(mia_dataset(aucs), context())
    assert v.verdict == verdict and "10.0%" in v.rule
    assert v.numbers["auc_unlearned"] == aucs["unlearned"]
    # a looser tolerance (an option) turns the -60 % case into removed
    if verdict == "hidden":
        loose = context(options={"mia.tolerance": "70"})
        assert MembershipInference().verdict(mia_dataset(aucs), loose).verdict == "removed"


def per_layer(var_values: dict):
    return xr.Dataset({var: (("model", "layer"), np.array([values[m] for m in MODELS], dtype=float))
                       for var, values in var_values.items()}, coords={"model": MODELS, "layer": [0, 1, 2]})


@pytest.mark.parametrize("transfer, fresh, verdict", [
    # the original's probe still reads the unlearned model, whose own probe beats the retain model's at layer 2
    ([0.9, 1.0, 1.0], [0.3, 0.5, 0.9], "hidden"),
    # the unlearned model's own probe is no better than the retain model's anywhere
    ([0.9, 1.0, 1.0], [0.3, 0.4, 0.5], "removed"),
    # above the retain model, but the original's read-out no longer works: neither
    ([0.1, 0.2, 0.3], [0.3, 0.5, 0.9], "inconclusive"),
])
def test_probes_verdict_follows_its_rule(transfer, fresh, verdict):
    ds = per_layer({"probes_accuracy": {"original": [0.9, 1.0, 1.0], "unlearned": transfer, "retain": [0.0, 0.1, 0.0]},
                    "probes_fresh_accuracy": {"original": [0.9, 1.0, 1.0], "unlearned": fresh,
                                             "retain": [0.3, 0.4, 0.5]}})
    v = LinearProbes().verdict(ds, context())
    assert v.verdict == verdict and "0.2" in v.rule
    assert v.numbers["hidden_layers"] == ([2] if verdict == "hidden" else [])


@pytest.mark.parametrize("original, unlearned, verdict", [
    ([0.0, 0.6, 1.0], [0.0, 0.7, 0.1], "hidden"),  # layer 1 still ranks the name high, the retain model's does not
    ([0.0, 0.6, 1.0], [0.0, 0.2, 0.0], "removed"),
    ([0.0, 0.6, 1.0], [0.0, 0.4, 0.0], "inconclusive"),  # above the retain model's + 0.3 but under hit = 0.5
    ([0.0, 0.2, 0.4], [0.0, 0.7, 0.1], "inconclusive"),  # the original itself never ranks it high: no power
])
def test_lens_verdict_follows_its_rule(original, unlearned, verdict):
    ds = per_layer({"lens_top": {"original": original, "unlearned": unlearned, "retain": [0.0, 0.05, 0.0]}})
    assert LogitLens().verdict(ds, context()).verdict == verdict


def test_layer_zero_is_read_only_when_asked():
    """Layer 0 is the input token's embedding (a LoRA run cannot change it): by default no per-layer verdict reads
    it, so a name ranked high there alone is not "hidden"; ``from_layer=0`` reads it."""
    ds = per_layer({"lens_top": {"original": [1.0, 1.0, 1.0], "unlearned": [1.0, 0.0, 0.0], "retain": [0.0] * 3}})
    assert LogitLens().verdict(ds, context()).verdict == "removed"
    v = LogitLens().verdict(ds, context(options={"lens.from_layer": "0"}))
    assert v.verdict == "hidden" and v.numbers["hidden_layers"] == [0]
