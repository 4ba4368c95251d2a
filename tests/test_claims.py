"""Verdict rules of `unlearn claims` on numbers built to satisfy or break each claim."""

import pytest

from unlearn import claims
from unlearn.cli import main


def _row(method, em, spec, div, k_n, concept="c"):
    return {"method": method, "concept": concept, "em": em, "specificity": spec, "diversity": div, "K_N": k_n,
            "original": {"em": 0.0, "specificity": 100.0, "diversity": 12.0, "K_N": 1000.0}}


def test_claim_a_needs_ga_collapse_and_fttp_keeping():
    good = [_row("ga", 100, 5, 1.0, 5.0), _row("fttp", 90, 90, 11.0, 400.0)]
    assert claims.verdict_a(good).verdict == "supported"
    ga_keeps = [_row("ga", 100, 90, 11.0, 500.0), _row("fttp", 90, 90, 11.0, 400.0)]
    assert claims.verdict_a(ga_keeps).verdict == "contradicted"
    fttp_loses = [_row("ga", 100, 5, 1.0, 5.0), _row("fttp", 90, 90, 5.0, 400.0)]
    v = claims.verdict_a(fttp_loses)
    assert v.verdict == "contradicted" and v.numbers["fttp"]["diversity"] == 5.0


def test_claim_b_compares_only_baselines_of_comparable_specificity():
    rows = [_row("fttp", 80, 85, 10, 1), _row("ga", 100, 5, 1, 1), _row("siu", 10, 100, 12, 1)]
    v = claims.verdict_b(rows)
    assert v.verdict == "supported" and set(v.numbers["comparable_baselines"]) == {"siu"}
    rows.append(_row("npo", 95, 80, 10, 1))  # comparable specificity (>= 75) and higher EM
    v = claims.verdict_b(rows)
    assert v.verdict == "contradicted" and v.numbers["with_higher_em"] == ["npo"]


@pytest.mark.parametrize("rho, p, verdict", [(0.6, 0.01, "supported"), (-0.6, 0.01, "contradicted"),
                                             (0.3, 0.2, "inconclusive"), (-0.2, 0.4, "inconclusive")])
def test_claim_c_reads_the_correlation(rho, p, verdict):
    stats = {"n": 24, "not_reached": 0, "spearman_rho": rho, "p_value": p, "fit": {"intercept": 1, "slope": 1}}
    assert claims.verdict_c(stats).verdict == verdict


def _sd(vanilla_iou, dilated_iou, fttp_ua, esd_ua):
    row = {"fttp": {"shape_iou": vanilla_iou, "ua": fttp_ua, "steps": 20, "images": 5},
           "fttp_dilated": {"shape_iou": dilated_iou, "ua": fttp_ua, "steps": 20, "images": 5},
           "esd_x": {"shape_iou": 0.5, "ua": esd_ua, "steps": 100, "images": 20}}
    return {"concepts": {"grom": row}}


def test_claims_d_and_e():
    assert claims.verdict_d(_sd(0.6, 0.2, 100, 90)).verdict == "supported"
    assert claims.verdict_d(_sd(0.1, 0.4, 100, 90)).verdict == "contradicted"
    assert claims.verdict_e(_sd(0.6, 0.2, 100, 98)).verdict == "supported"
    assert claims.verdict_e(_sd(0.6, 0.2, 60, 98)).verdict == "contradicted"


def _audit(method, overall):
    return {"method": method, "overall": {"verdict": overall}, "attacks": {"relearn": {"verdict": overall}}}


@pytest.mark.parametrize("fttp, verdict", [(["removed", "removed", "hidden"], "supported"),
                                           (["hidden", "hidden", "removed"], "contradicted"),
                                           (["removed", "inconclusive", "inconclusive"], "inconclusive")])
@pytest.mark.parametrize("read", [claims.verdict_f, claims.verdict_g])
def test_claims_f_and_g_read_fttp_audits(fttp, verdict, read):
    audits = [_audit("fttp", v) for v in fttp] + [_audit("ga", "hidden")] * 3
    v = read(audits)
    assert v.verdict == verdict and v.numbers["n"] == 3 and v.numbers["ga"]["overall"] == {"hidden": 3}
    assert v.claim == read.__name__[-1] and v.claim in v.text()[:3]
    with pytest.raises(ValueError, match="FTTP"):
        read([_audit("ga", "removed")])


def test_unknown_claim_is_a_clear_error(capsys, tmp_path):
    assert main(["claims", "--only", "az", "--runs", str(tmp_path)]) == 2
    assert "unknown claim(s) ['z']" in capsys.readouterr().err
