"""QC metrics on phantoms with known truth, each checked against a value computed by hand, and the gate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data_contracts.qc_settings import DEFAULT_RULES, QCSettings, RobustZ, Rule
from tasks.qc.gate import Unmeasured, judge, robust_z
from tasks.qc.measure import image_metrics
from tasks.qc.metrics import TissueStats, cjv, cnr, efc, fber, head_mask, snr, tissue_stats, wm2max


def phantom(noise: float, seed: int = 0):
    """A 'head' (sphere) with a WM core (100) and a GM shell (60) in air, Gaussian noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[-32:32, -32:32, -32:32]
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    wm, gm, head = r < 12, (r >= 12) & (r < 20), r < 26
    img = np.where(wm, 100.0, np.where(gm, 60.0, np.where(head, 20.0, 0.0)))
    return img + rng.normal(0, noise, img.shape), wm, gm, head


def test_snr_cnr_cjv_match_hand_computation():
    img, wm, gm, head = phantom(noise=5.0)
    tw, tg = tissue_stats(img, wm), tissue_stats(img, gm)
    assert snr(tw) == pytest.approx(img[wm].mean() / (img[wm].std(ddof=1) * math.sqrt(tw.n / (tw.n - 1))))
    assert snr(tw) == pytest.approx(100 / 5, rel=0.05)          # known truth: mean 100, sigma 5
    assert cjv(tg, tw) == pytest.approx((5 + 5) / 40, rel=0.05)
    assert cnr(tg, tw, 5.0) == pytest.approx(40 / math.sqrt(75), rel=0.05)
    assert snr(TissueStats(1.0, 0.0, 10)) != snr(TissueStats(1.0, 0.0, 10))  # NaN, not a sentinel


def _all_metrics(img, brain, gm, wm):
    """Every group of the catalogue, the image standing in for its own bias-corrected copy."""
    images = {"preproc": img, "brain_mask": brain.astype(np.float32), "probseg_GM": gm.astype(float),
              "probseg_WM": wm.astype(float), "probseg_CSF": np.zeros_like(img)}
    return image_metrics(("head", "tissue", "volumes"), img, (1.0, 1.0, 1.0), images)


def test_noise_moves_every_metric_the_right_way():
    clean, wm, gm, head = phantom(noise=2.0)
    noisy, *_ = phantom(noise=25.0)
    brain = wm | gm
    a = _all_metrics(clean, brain, gm, wm)
    b = _all_metrics(noisy, brain, gm, wm)
    assert b["snr_wm"] < a["snr_wm"] and b["cnr"] < a["cnr"] and b["cjv"] > a["cjv"]
    assert b["efc"] > a["efc"] and b["fber"] < a["fber"]
    assert a["gm_fraction"] == pytest.approx(gm.sum() / brain.sum())


def test_efc_fber_wm2max_by_hand():
    x = np.array([[[1.0, 2.0], [3.0, 4.0]]])
    n, bmax = 4, math.sqrt(30)
    expected = (1 / (n / math.sqrt(n) * math.log(1 / math.sqrt(n)))) * sum(
        v / bmax * math.log(v / bmax) for v in (1, 2, 3, 4))
    assert efc(x) == pytest.approx(expected)
    img = np.array([10.0, 10.0, 1.0, 2.0])
    assert fber(img, np.array([True, True, False, False])) == pytest.approx(100 / np.median([1, 4]))
    assert wm2max(np.arange(101.0), np.arange(101) < 11) == pytest.approx(5 / np.percentile(np.arange(101.0), 99.95))


def test_head_mask_finds_the_sphere():
    img, wm, gm, head = phantom(noise=2.0)
    found = head_mask(img)
    assert (found & head).sum() / head.sum() > 0.97 and (found & ~head).sum() < 0.05 * head.sum()


RULES = {"snr_wm": Rule(warn_below=8, fail_below=4, better="higher"),
         "cjv": Rule(warn_above=0.8, fail_above=1.2, better="lower")}


def test_gate_levels_and_reasons():
    v = judge({"snr_wm": 12.0, "cjv": 0.5}, RULES, {}, RobustZ())
    assert v.status == "PASS" and v.reasons == []
    assert v.reason_code is None
    v = judge({"snr_wm": 6.0, "cjv": 1.5}, RULES, {}, RobustZ())
    assert v.status == "FAIL"
    assert v.reasons == ["cjv 1.5 is above the fail limit 1.2", "snr_wm 6 is below the warn limit 8"]
    assert [m.code for m in v.metrics] == ["qc_limit", "qc_limit"] and v.reason_code == "qc_limit"


def test_nan_and_missing_metrics_fail_with_their_name():
    v = judge({"snr_wm": float("nan"), "cjv": 0.5}, RULES, {}, RobustZ(),
              missing={"coverage": Unmeasured("no registration", "engine_missing")})
    assert v.status == "FAIL"
    assert "snr_wm could not be computed: is NaN" in v.reasons
    assert "coverage could not be computed: no registration" in v.reasons
    codes = {m.metric: m.code for m in v.metrics}
    assert codes == {"coverage": "engine_missing", "snr_wm": "metric_missing", "cjv": None}
    assert v.reason_code == "engine_missing"   # the first FAIL, in metric order


def test_site_distribution_flags_only_the_worse_side():
    history = {"snr_wm": [20.0 + d for d in (-1, -0.5, 0, 0.5, 1, -1, 0, 1, 0.5, -0.5)]}
    low = judge({"snr_wm": 12.0}, RULES, history, RobustZ(min_n=10))
    assert low.status == "FAIL" and "robust SD from this site's median of 10 scans" in low.reasons[0]
    assert low.reason_code == "qc_site_outlier"
    high = judge({"snr_wm": 30.0}, RULES, history, RobustZ(min_n=10))
    assert high.status == "PASS"
    few = judge({"snr_wm": 12.0}, RULES, {"snr_wm": history["snr_wm"][:5]}, RobustZ(min_n=10))
    assert few.status == "PASS"
    assert robust_z(3.0, [1, 2, 3, 4, 5]) == pytest.approx(0.0)


def test_site_overrides_win():
    qc = QCSettings(site_rules={"site-a": {"snr_wm": Rule(warn_below=3, better="higher")}})
    assert qc.rules_for("site-a")["snr_wm"].warn_below == 3
    assert qc.rules_for("site-b")["snr_wm"] == DEFAULT_RULES["snr_wm"]
    with pytest.raises(ValueError, match="fail_below must not be above warn_below"):
        Rule(warn_below=1, fail_below=2)
