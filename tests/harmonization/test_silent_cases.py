"""The cases issue 14 found passing silently, each built from ABIDE I by transformation, each now a
warning or a refusal a statistician can act on (naming subjects, not only file lines)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_contracts.harmonization_settings import HarmonizationSettings
from harmonization import combat
from harmonization.abide import constant_columns, load_abide
from harmonization.errors import HarmonizationRefused
from harmonization.inputs import from_wide_table

COVS = ["AGE", "SEX", "DX"]


@pytest.fixture(scope="module")
def abide(abide_data) -> pd.DataFrame:
    df = load_abide(abide_data)
    df.insert(1, "SUB_ID", np.arange(50001, 50001 + len(df)))
    return df


def _data(df: pd.DataFrame, **kw):
    return from_wide_table(df, "SITE", kw.pop("covariates", COVS), exclude=["FILE_ID", *constant_columns(df)], **kw)


def _refusal(data, settings) -> HarmonizationRefused:
    with pytest.raises(HarmonizationRefused) as err:
        combat.fit(data, settings)
    return err.value


def test_a_numeric_identifier_is_never_a_feature_by_default(abide):
    df = abide.assign(SCAN_NO=np.arange(len(abide))[::-1] + 7)
    data = _data(df)
    assert "SCAN_NO" not in data.features.columns and "SUB_ID" not in data.features.columns
    fitted = combat.fit(data, HarmonizationSettings(covariates=COVS))
    (note,) = [f for f in fitted.findings if f.code == "identifier_column"]
    assert "SCAN_NO" in note.message and "--features" in note.message
    # named, it is the user's choice
    assert "SCAN_NO" in _data(df, features=["SCAN_NO", "Left-Lateral-Ventricle"]).features.columns


def test_messages_name_the_subject(abide):
    df = abide.copy()
    df.loc[df.index[4], "AGE"] = np.nan
    err = _refusal(_data(df), HarmonizationSettings(covariates=COVS))
    assert f"SUB_ID={abide['SUB_ID'].iloc[4]} (row 6)" in str(err)


def test_a_smooth_term_on_a_categorical_covariate_is_refused(abide_data):
    text = load_abide(abide_data, text_labels=True)
    err = _refusal(_data(text), HarmonizationSettings(covariates=COVS, smooth_terms=["SEX"]))
    assert [f.code for f in err.findings if f.level == "refusal"] == ["smooth_categorical"] and "SEX" in str(err)


def test_impossible_covariates_are_refused_and_extrapolation_is_said(abide):
    bad = abide.copy()
    bad.loc[bad.index[[3, 9]], "AGE"] = [150.0, -3.0]
    err = _refusal(_data(bad), HarmonizationSettings(covariates=COVS))
    assert [f.code for f in err.findings if f.level == "refusal"] == ["impossible_covariate"]
    assert "AGE is outside 0..120 in 2 row(s)" in str(err) and f"SUB_ID={abide['SUB_ID'].iloc[3]}" in str(err)
    model = combat.fit(_data(abide), HarmonizationSettings(covariates=COVS)).model
    assert model.metadata["covariate_ranges"]["AGE"]["min"] == pytest.approx(abide["AGE"].min())
    late = abide.iloc[:4].copy()
    late["AGE"] = [70.0, 90.0, 150.0, float(late["AGE"].iloc[3])]
    applied = combat.apply(model, _data(late), refuse_empty=False)
    assert list(applied.ok) == [True, True, False, True]
    assert "outside what it can be" in applied.status.iloc[2]
    (extra,) = [f for f in applied.findings if f.code == "extrapolated_covariate"]
    assert "2 row(s) have AGE outside the fitted" in extra.message


def test_smooth_term_bounds_at_fit_time_keep_later_visits_inside(abide):
    old = abide.iloc[:6].copy()
    old["AGE"] = [66.0, 70.0, 74.0, 20.0, 30.0, 40.0]
    plain = combat.fit(_data(abide), HarmonizationSettings(covariates=COVS, smooth_terms=["AGE"])).model
    assert not combat.apply(plain, _data(old), refuse_empty=False).ok[:3].any()    # beyond the oldest: refused
    bounded = combat.fit(_data(abide), HarmonizationSettings(covariates=COVS, smooth_terms=["AGE"],
                                                             smooth_term_bounds={"AGE": (5.0, 80.0)})).model
    assert bounded.spline.bounds == [(5.0, 80.0)]
    assert combat.apply(bounded, _data(old)).ok.all()
    with pytest.raises(ValueError, match="smooth_term_bounds"):
        HarmonizationSettings(covariates=COVS, smooth_term_bounds={"AGE": (5.0, 80.0)})   # AGE is not smooth


def test_repeated_subjects_are_refused_unless_asked_for(abide):
    follow = abide.sample(200, random_state=0).assign(AGE=lambda d: d["AGE"] + 2.0)
    both = pd.concat([abide, follow], ignore_index=True)
    err = _refusal(_data(both), HarmonizationSettings(covariates=COVS))
    assert [f.code for f in err.findings if f.level == "refusal"] == ["repeated_subjects"]
    assert "200 subject(s) have more than one scan (400 scans" in str(err) and "Beer et al. 2020" in str(err)
    fitted = combat.fit(_data(both), HarmonizationSettings(covariates=COVS, repeated="independent"))
    assert any(f.code == "repeated_subjects" and f.level == "warning" for f in fitted.findings)


def test_outliers_are_named_and_the_fit_without_them_is_compared(abide):
    data = _data(abide)
    fitted = combat.fit(data, HarmonizationSettings(covariates=COVS))
    (finding,) = [f for f in fitted.findings if f.code == "outliers"]
    change = combat.outlier_effect(fitted, data, HarmonizationSettings(covariates=COVS))
    # ABIDE as it is: OLIN's CSF scale estimate rests on a few rows (delta* 9.1 with them, about 1 without)
    assert change["batch"] == "OLIN" and change["feature"] == "CSF" and change["material"]
    assert change["delta_with"] > 5 and change["delta_without"] < 2 and "SUB_ID=" in finding.message
    # three planted values in one site's feature are among the rows named
    planted = abide.copy()
    rows = planted.index[planted["SITE"] == "USM"][:3]
    spread = planted["Left-Hippocampus"].std()
    planted.loc[rows, "Left-Hippocampus"] += 12 * spread
    again = combat.fit(_data(planted), HarmonizationSettings(covariates=COVS))
    assert again.model.metadata["outliers"]["by_batch"]["USM"] >= fitted.model.metadata["outliers"]["by_batch"].get(
        "USM", 0) + 3


def test_harmonized_values_below_zero_for_a_positive_feature_are_said(abide):
    fitted = combat.fit(_data(abide), HarmonizationSettings(covariates=COVS))
    negative = [f for f in fitted.findings if f.code == "impossible_harmonized"]
    assert negative and all("positive in every input row but harmonized below 0" in f.message for f in negative)
    for f in negative:
        assert (fitted.harmonized[f.where["feature"]] < 0).any() and (abide[f.where["feature"]] > 0).all()
