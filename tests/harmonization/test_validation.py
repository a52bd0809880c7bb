"""The report's checks beyond the in-sample F-test (harmonization/validation.py), on ABIDE I and on
tables made wrong from it: held-out site effect, scale, multivariate site signal, the EB priors,
covariate overlap, and the report's own drawing of every estimate and of a site with a missing age."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_contracts.harmonization_settings import HarmonizationSettings
from harmonization import combat, diagnostics, report
from harmonization.abide import constant_columns, load_abide
from harmonization.inputs import HarmonizationData, from_wide_table

COVS = ["AGE", "SEX", "DX"]


@pytest.fixture(scope="module")
def fitted_report(abide_data):
    abide = load_abide(abide_data)
    data = from_wide_table(abide, "SITE", COVS, exclude=["FILE_ID", *constant_columns(abide)])
    result = combat.fit(data, HarmonizationSettings(covariates=COVS))
    return result, report.fit_report(data, result, "hm-test")


def test_held_out_scale_and_multivariate_site_signal(fitted_report):
    _, r = fitted_report
    v = r["validation"]
    assert v["held_out"]["folds"] == 5 and len(v["held_out"]["share_F"]) == 5
    assert v["held_out"]["median_share_F"] <= 0.05 and v["held_out"]["median_share_F_permuted"] <= 0.05
    # the estimation-noise floor on the same folds, where ComBat's model holds exactly
    assert len(v["held_out"]["share_F_floor"]) == 5 and v["held_out"]["median_share_F_floor"] <= 0.02
    assert v["scale"]["before"]["share"] >= 0.5 and v["scale"]["after"]["share"] <= 0.05
    before, after = v["site_prediction"]["before"], v["site_prediction"]["after"]
    assert before["chance"] == 0.05 and before["balanced_accuracy"] > 0.4
    assert after["balanced_accuracy"] < before["balanced_accuracy"] / 3      # what is left, shown


def test_the_priors_that_do_not_fit_are_named_and_every_delta_is_shown(fitted_report):
    result, r = fitted_report
    priors = {p["batch"]: p for p in r["validation"]["priors"]}
    rejected = sorted(b for b, p in priors.items() if p["rejected"])
    assert rejected and all(priors[b]["delta_ks_p"] < 0.01 for b in rejected)
    worst = result.model.batches[int(np.argmax(result.model.delta_star.max(axis=1)))]
    assert worst in rejected
    assert priors[worst]["delta_star_max"] == pytest.approx(result.model.delta_star.max(), abs=1e-3)
    html = report.render_html(r)
    assert "prior rejected" in html and worst in html
    assert html.count("data:image/png;base64,") == 7
    # the worst-fitting priors drawn against their raw estimates: the rejected batches come first
    panels = r["validation"]["prior_panels"]
    assert {p["batch"] for p in panels[:len(rejected)]} == set(rejected[:len(panels)])
    b = result.model.batches.index(panels[0]["batch"])
    assert panels[0]["delta_hat"] == pytest.approx(result.model.delta_hat[b], abs=1e-5)
    assert panels[0]["delta_star"] == pytest.approx(result.model.delta_star[b], abs=1e-5)
    assert 'alt="priors"' in html


def test_sites_whose_ages_do_not_overlap_with_equal_means_are_warned(abide_data):
    rng = np.random.default_rng(3)
    n = 60
    ages = np.concatenate([np.r_[rng.uniform(20, 30, n // 2), rng.uniform(70, 80, n // 2)], rng.uniform(45, 55, n)])
    values = pd.DataFrame(rng.normal(size=(2 * n, 4)) + ages[:, None] * 0.02, columns=list("abcd"))
    data = HarmonizationData(values, pd.DataFrame({"AGE": ages}), pd.Series(["A"] * n + ["B"] * n),
                             pd.Series([f"row {i}" for i in range(2 * n)]))
    result = combat.fit(data, HarmonizationSettings(covariates=["AGE"]))
    (warning,) = [f for f in result.findings if f.code == "covariate_overlap"]
    assert "batch 'A': only 0 % of its rows have AGE inside the other batches' range" in warning.message
    assert result.model.metadata["association_with_batch"]["AGE"] < 0.1       # eta alone sees nothing


def test_a_site_with_one_missing_age_keeps_its_box():
    stats = diagnostics.box_stats(pd.Series([30.0, 40.0, np.nan, 50.0]), pd.Series(["A"] * 4))
    assert stats == [{"label": "A", "med": 40.0, "q1": 35.0, "q3": 45.0, "whislo": 30.0, "whishi": 50.0, "n": 3}]
