"""Available-case ComBat (issue 14: one missing value cost a scan every feature; one site lost 23 %
of its rows). Each feature is harmonized on the rows that have it; a missing value stays missing.

The referee is sva's ``ComBat`` (Bioconductor; Leek, Johnson et al.), which takes missing values this
way, run in R on the same table (``make services`` installs it). The cases are built from ABIDE by
removing values: at random, from one site (the issue's 23 %), a feature almost absent at one site,
a feature absent in every row, an infinite value, and the options that need complete rows.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from neuroCombat.neuroCombat import find_non_eb_adjustments, find_parametric_adjustments, fit_LS_model_and_find_priors

from data_contracts.harmonization_settings import HarmonizationSettings
from harmonization import available, combat, extend
from harmonization.errors import HarmonizationRefused
from harmonization.inputs import HarmonizationData

COVS = ["AGE", "SEX", "DX"]
SETTINGS = HarmonizationSettings(covariates=COVS)




def _without(data: HarmonizationData, mask: np.ndarray) -> HarmonizationData:
    x = data.features.to_numpy(dtype=float).copy()
    x[mask] = np.nan
    return HarmonizationData(pd.DataFrame(x, index=data.features.index, columns=data.features.columns),
                             data.covariates, data.batch, data.row_labels, data.source)


def _random_holes(data: HarmonizationData, share: float, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random(data.features.shape) < share


def _sva(data: HarmonizationData, tmp: Path, mean_only: bool = False, ref: str | None = None) -> np.ndarray:
    """sva::ComBat in R on the same table (features as rows, NA where missing)."""
    if shutil.which("Rscript") is None:
        pytest.fail("R is not installed: make services installs sva's ComBat (r-bioc-sva), the referee")
    pd.DataFrame(data.features.to_numpy(dtype=float).T).to_csv(tmp / "dat.csv", index=False)
    data.covariates.assign(SITE=data.batch.to_numpy()).to_csv(tmp / "cov.csv", index=False)
    ref_arg = f", ref.batch='{ref}'" if ref else ""
    script = (f"suppressMessages(library(sva)); d <- as.matrix(read.csv('{tmp}/dat.csv')); "
              f"cv <- read.csv('{tmp}/cov.csv'); mod <- model.matrix(~AGE + factor(SEX) + factor(DX), data=cv); "
              f"out <- ComBat(d, batch=cv$SITE, mod=mod, par.prior=TRUE, mean.only={str(mean_only).upper()}, "
              f"prior.plots=FALSE{ref_arg}); write.csv(out, '{tmp}/out.csv', row.names=FALSE)")
    subprocess.run(["Rscript", "-e", script], check=True, capture_output=True, timeout=300)
    return pd.read_csv(tmp / "out.csv").to_numpy().T


@pytest.mark.parametrize("mean_only, ref", [(False, None), (True, None), (False, "NYU")])
def test_equals_sva_combat_with_five_percent_missing(data, tmp_path, mean_only, ref):
    holes = _random_holes(data, 0.05)
    if ref:   # the reference's own rows complete: sva's pooled variance still counts the table's holes
        holes[(data.batch == ref).to_numpy()] = False
    holed = _without(data, holes)
    ours = combat.fit(holed, HarmonizationSettings(covariates=COVS, mean_only=mean_only, ref_batch=ref))
    sva = _sva(holed, tmp_path, mean_only, ref)
    out = ours.harmonized.to_numpy()
    assert np.array_equal(np.isnan(out), holed.features.isna().to_numpy())     # missing stays missing
    assert np.array_equal(np.isnan(sva), np.isnan(out))
    sd = np.nanstd(holed.features.to_numpy(dtype=float), axis=0)
    # 5e-8 of an SD on this table: neuroCombat's design holds the covariates as float32, sva's as double
    assert np.nanmax(np.abs(out - sva) / sd) < 1e-6
    assert "available_case" in {f.code for f in ours.findings}


def test_complete_data_takes_neurocombats_own_estimates_in_the_available_case_code(data):
    """The available-case location/scale on a table without holes is neuroCombat's, term for term."""
    fit = combat.fit(data, SETTINGS)
    x = data.features.to_numpy(dtype=float)
    codes = pd.Index(fit.model.batches).get_indexer(fit.batch)
    info = combat.info_dict(codes, len(fit.model.batches))
    design = np.eye(len(fit.model.batches))[codes]
    m = fit.model
    s_data = ((x - m.grand_mean - combat.covariate_design(m, fit.encoded) @ m.B_hat[len(m.batches):])
              / np.sqrt(m.var_pooled)).T
    for eb, mean_only in ((True, False), (True, True), (False, False)):
        ls = fit_LS_model_and_find_priors(s_data, design, info, mean_only)
        ref = (find_parametric_adjustments(s_data, ls, info, mean_only) if eb
               else find_non_eb_adjustments(s_data, ls, info))
        _, gamma, delta = available.location_scale(s_data, design, info, eb, True, mean_only)
        assert np.abs(gamma - np.asarray(ref[0])).max() < 1e-10
        assert np.abs(delta - np.asarray(ref[1], dtype=float)).max() < 1e-10
    assert np.abs(available.ols(design, s_data.T) - ls["gamma_hat"]).max() < 1e-10


def test_a_site_missing_one_measure_keeps_its_scans_and_its_other_measures(data):
    """The issue's case: a measure missing in 23 % of one site's scans cost those scans every feature."""
    site = (data.batch == "UM_1").to_numpy()
    hole = np.zeros(data.features.shape, bool)
    rows = np.nonzero(site)[0][: int(round(0.23 * site.sum()))]
    j = list(data.features.columns).index("CSF")
    hole[rows, j] = True
    fit = combat.fit(_without(data, hole), SETTINGS)
    out = fit.harmonized.to_numpy()
    assert len(out) == data.n and np.isnan(out[rows, j]).all()
    assert np.isfinite(np.delete(out, j, axis=1)).all()              # every other value harmonized
    (note,) = [f for f in fit.findings if f.code == "available_case"]
    assert note.where["by_batch"]["UM_1"] == [len(rows), int(site.sum())]
    assert note.where["by_feature"] == {"CSF": len(rows)}
    # the site's CSF estimate comes from the rows that have it, and is close to the complete fit's
    full = combat.fit(data, SETTINGS).model
    b, f = fit.model.batches.index("UM_1"), fit.model.features.index("CSF")
    assert abs(fit.model.gamma_star[b, f] - full.gamma_star[b, f]) < 0.25
    assert not np.isclose(fit.model.gamma_star[b, f], full.gamma_star[b, f], atol=1e-9)


def test_what_cannot_be_estimated_is_refused_by_name(data):
    x = np.zeros(data.features.shape, bool)
    kki = np.nonzero((data.batch == "KKI").to_numpy())[0]
    x[kki[1:], list(data.features.columns).index("CSF")] = True          # one value left at KKI
    x[kki, list(data.features.columns).index("Brain-Stem")] = True       # none at KKI
    with pytest.raises(HarmonizationRefused) as err:
        combat.fit(_without(data, x), SETTINGS)
    assert "feature 'CSF' has fewer than 2 values at KKI (1)" in str(err.value)
    assert "feature 'Brain-Stem' has fewer than 2 values at KKI (0)" in str(err.value)
    x[:, list(data.features.columns).index("Brain-Stem")] = True         # none anywhere: a value check
    with pytest.raises(HarmonizationRefused, match="feature 'Brain-Stem' has no value in any row"):
        combat.fit(_without(data, x), SETTINGS)
    inf = data.features.to_numpy(dtype=float).copy()
    inf[3, 0] = np.inf
    with pytest.raises(HarmonizationRefused, match="1 infinite value"):
        combat.fit(HarmonizationData(pd.DataFrame(inf, columns=data.features.columns), data.covariates,
                                     data.batch, data.row_labels), SETTINGS)


@pytest.mark.parametrize("settings, named", [
    (HarmonizationSettings(covariates=COVS, smooth_terms=["AGE"]), "ComBat-GAM"),
    (HarmonizationSettings(covariates=COVS, parametric=False), "non-parametric priors"),
    (HarmonizationSettings(covariates=COVS, missing="complete_scans"), "fill or drop them"),
])
def test_options_that_need_complete_rows_refuse_missing_values(data, settings, named):
    with pytest.raises(HarmonizationRefused, match=named):
        combat.fit(_without(data, _random_holes(data, 0.01)), settings)


def test_a_covariate_level_absent_among_a_features_rows_is_refused(data):
    """The rows that have a feature must determine the design: here none of them has DX=2."""
    hole = np.zeros(data.features.shape, bool)
    hole[(data.covariates["DX"] == 2).to_numpy(), 0] = True
    with pytest.raises(HarmonizationRefused, match="do not determine the"):
        combat.fit(_without(data, hole), SETTINGS)


def test_apply_and_extend_keep_missing_values_missing(data):
    holed = _without(data, _random_holes(data, 0.03, seed=4))
    fit = combat.fit(holed, SETTINGS)
    again = combat.apply(fit.model, holed)
    assert again.ok.all()
    assert np.array_equal(again.harmonized.to_numpy(), fit.harmonized.to_numpy(), equal_nan=True)  # to the bit
    new = data.batch.isin(["NYU", "UM_1", "USM"]).to_numpy()
    parent = combat.fit(holed.subset(~new), SETTINGS)
    grown = extend.extend(parent.model, holed, parent.model.model_id)
    assert set(grown.estimated) == {"NYU", "UM_1", "USM"}
    out = grown.applied.harmonized.to_numpy()
    assert np.array_equal(np.isnan(out), holed.features.isna().to_numpy())
    assert np.array_equal(out[~new], parent.harmonized.to_numpy(), equal_nan=True)
    # a model fitted on complete scans does not take a row with a hole
    strict = combat.fit(data, HarmonizationSettings(covariates=COVS, missing="complete_scans")).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        partial = combat.apply(strict, holed, refuse_empty=False)
    assert (~partial.ok == holed.features.isna().any(axis=1).to_numpy()).all()


def test_a_feature_constant_within_a_site_is_refused_with_missing_values_too(data):
    """A NaN elsewhere in the feature does not hide it (nor does a site with one value count as constant)."""
    x = data.features.to_numpy(dtype=float).copy()
    j = list(data.features.columns).index("CSF")
    um = np.nonzero((data.batch == "UM_1").to_numpy())[0]
    x[um, j] = 900.0
    x[um[0], j] = np.nan
    constant = HarmonizationData(pd.DataFrame(x, index=data.features.index, columns=data.features.columns),
                                 data.covariates, data.batch, data.row_labels)
    with pytest.raises(HarmonizationRefused, match="site 'UM_1': feature\\(s\\) \\['CSF'\\] do not vary"):
        combat.fit(constant, SETTINGS)


def test_the_outlier_screen_runs_with_missing_values(data):
    clean = combat.fit(data, SETTINGS).model.metadata["outliers"]["rows"]
    holed = combat.fit(_without(data, _random_holes(data, 0.02, seed=5)), SETTINGS).model.metadata["outliers"]
    assert abs(holed["rows"] - clean) <= 0.2 * clean


def test_a_non_parametric_parent_leaves_a_row_with_a_hole_out_of_an_extension(data):
    new = data.batch.isin(["NYU", "UM_1", "USM"]).to_numpy()
    settings = HarmonizationSettings(covariates=COVS, parametric=False)
    parent = combat.fit(data.subset(~new), settings)
    hole = np.zeros(data.features.shape, bool)
    hole[np.nonzero(new)[0][0], 0] = True
    grown = extend.extend(parent.model, _without(data, hole), parent.model.model_id)
    assert set(grown.estimated) == {"NYU", "UM_1", "USM"}
    first = np.nonzero(new)[0][0]
    assert not grown.applied.ok[first] and grown.applied.ok[new].sum() == new.sum() - 1
    assert "complete scans" in grown.applied.status.iloc[first]
