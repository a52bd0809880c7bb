"""ComBat-GAM: our all-features-at-once fit against neuroHarmonize's per-feature GAMs.

neuroHarmonize stays the reference: the same ABIDE rows, the same seed, and
its own harmonizationLearn / harmonizationApply. A subset of features keeps
the reference fit to a few seconds (all 121 take minutes; bench/harmonize.py).
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
from neuroHarmonize import harmonizationApply, harmonizationLearn
from statsmodels.gam.api import GLMGam
from statsmodels.gam.generalized_additive_model import GLMGam as GLMGamImpl

from data_contracts.harmonization_settings import HarmonizationSettings
from harmonization import combat, gam
from harmonization.inputs import from_wide_table

pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")

COVS = ["AGE", "SEX", "DX"]
# Volumes from 10^2 to 10^6 mm3 and thicknesses of ~3 mm: every scale the tables hold.
FEATURES = ["Left-Hippocampus", "CSF", "IntraCranialVol", "lh_MeanThickness_thickness",
            "rh_insula_thickness", "Brain-Stem"]
SEED = 11



@pytest.fixture(scope="module")
def reference(abide):
    """neuroHarmonize's ComBat-GAM fit, with the penalty it selected for each feature."""
    chosen = []
    original = GLMGamImpl.select_penweight_kfold

    @functools.wraps(original)  # neuroHarmonize passes rng only if the signature has it
    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        chosen.append(out[0])
        return out

    covars = pd.DataFrame({c: abide[c].to_numpy() for c in ["SITE", *COVS]})
    GLMGamImpl.select_penweight_kfold = spy
    try:
        model, harmonized = harmonizationLearn(abide[FEATURES].to_numpy(), covars,
                                               smooth_terms=["AGE"], seed=SEED)
    finally:
        GLMGamImpl.select_penweight_kfold = original
    return model, harmonized, np.array(chosen, dtype=float), covars


@pytest.fixture(scope="module")
def ours(abide):
    data = from_wide_table(abide, "SITE", COVS, features=FEATURES)
    settings = HarmonizationSettings(covariates=COVS, smooth_terms=["AGE"], seed=SEED)
    return data, combat.fit(data, settings)


def test_same_penalties_as_neuroharmonize(reference, ours):
    _, _, chosen, _ = reference
    assert GLMGam is GLMGamImpl
    assert chosen.shape == (len(FEATURES), 1)
    np.testing.assert_array_equal(ours[1].model.alphas, chosen)
    assert len(np.unique(chosen)) > 1  # the search really chose, per feature


def test_same_harmonized_values_as_neuroharmonize(reference, ours):
    model, harmonized, _, _ = reference
    fit = ours[1]
    assert np.abs(fit.harmonized.to_numpy() - harmonized).max() <= 1e-6
    assert np.abs(fit.model.B_hat - model["B_hat"]).max() <= 1e-6 * np.abs(model["B_hat"]).max()
    np.testing.assert_allclose(fit.model.gamma_star, model["gamma_star"], atol=1e-9)
    np.testing.assert_allclose(fit.model.delta_star, model["delta_star"], atol=1e-9)


def test_frozen_gam_apply_equals_neuroharmonize(reference, ours):
    model, _, _, covars = reference
    data, fit = ours
    mine = combat.apply(fit.model, data)
    theirs = harmonizationApply(data.features.to_numpy(), covars, model)
    assert mine.ok.all()
    assert np.abs(mine.harmonized.to_numpy() - theirs).max() <= 1e-6


def test_cv_errors_equal_statsmodels_search(abide):
    """The batched k-fold errors are statsmodels' MultivariateGAMCVPath errors."""
    data = from_wide_table(abide, "SITE", COVS, features=FEATURES[:2])
    x_age = abide[["AGE"]].to_numpy(float)
    bs = gam.make_bsplines(x_age)
    sites = pd.get_dummies(abide["SITE"]).to_numpy(float)
    linear = np.column_stack([sites, abide[["SEX", "DX"]].to_numpy(float)])
    y = data.features.to_numpy()
    fit = gam.fit_smooth(linear, bs, y, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    for j in range(y.shape[1]):
        g = GLMGam(y[:, j], exog=linear, smoother=bs, alpha=[1.0])
        _, path = g.select_penweight_kfold(rng=rng)
        np.testing.assert_allclose(fit.cv_error[j], path.cv_error, rtol=1e-7)


def test_spline_rebuilt_from_knots_and_out_of_range_rows_refused(abide, ours):
    data, fit = ours
    spec = fit.model.spline
    x = abide[["AGE"]].to_numpy(float)
    np.testing.assert_array_equal(gam.basis(spec, x), gam.make_bsplines(x).basis)
    lo, hi = spec.bounds[0]
    older = data.subset(np.arange(data.n) < 3)
    older.covariates = older.covariates.assign(AGE=[hi + 5, lo - 1, (lo + hi) / 2])
    out = combat.apply(fit.model, older)
    assert out.ok.tolist() == [False, False, True]
    assert "AGE is outside the fitted range" in out.status.iloc[0]
    assert out.harmonized.iloc[:2].isna().all().all() and out.harmonized.iloc[2].notna().all()
