"""Bad input gets a decision and a message naming it, never a crash or an all-NaN output.

Each case starts from the real ABIDE table and breaks one thing, the way real
tables break: a missing value, a column FreeSurfer leaves at 0, a site with a
handful of scans, a covariate nobody exported, a site the model never saw.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_contracts.harmonization_settings import HarmonizationSettings
from harmonization import combat, model_store, service
from harmonization.errors import (
    HarmonizationRefused,
    InputTableError,
    ModelMismatchError,
    NoRowsToHarmonize,
)
from harmonization.inputs import from_wide_table
from tasks.lake.storage import Lake

COVS = ["AGE", "SEX", "DX"]
FEATURES = ["Left-Hippocampus", "Right-Hippocampus", "CSF", "lh_MeanThickness_thickness",
            "rh_MeanThickness_thickness", "Left-Amygdala"]
SETTINGS = HarmonizationSettings(covariates=COVS)
COMPLETE = HarmonizationSettings(covariates=COVS, missing="complete_scans")



def _data(df: pd.DataFrame, features=FEATURES, covs=COVS):
    return from_wide_table(df, "SITE", covs, features=features)


def _refusal(df: pd.DataFrame, settings=SETTINGS, features=FEATURES) -> HarmonizationRefused:
    with pytest.raises(HarmonizationRefused) as info:
        combat.fit(_data(df, features), settings)
    return info.value


def test_nan_in_a_feature_is_refused_naming_feature_and_row_when_complete_scans_are_asked(abide):
    """By default a missing value is harmonized around (available-case, test_available_case.py)."""
    df = abide.copy()
    df.loc[17, "CSF"] = np.nan
    err = _refusal(df, COMPLETE)
    assert "feature 'CSF' has 1 missing" in str(err) and "row 19" in str(err)  # file line of row 17
    assert [f.code for f in err.findings if f.level == "refusal"] == ["nan_feature"]


def test_constant_features_are_refused_by_name(abide):
    err = _refusal(abide, features=FEATURES + ["Left-WM-hypointensities", "Right-WM-hypointensities"])
    msg = str(err)
    assert "'Left-WM-hypointensities' is constant" in msg and "'Right-WM-hypointensities'" in msg
    assert "--exclude" in msg


def test_site_with_three_subjects_is_refused_or_pooled(abide):
    df = abide[(abide["SITE"] != "CMU") | (abide.groupby("SITE").cumcount() < 3)]
    err = _refusal(df)
    assert "CMU (N=3)" in str(err) and "below the minimum of 20" in str(err)
    pool = SETTINGS.model_copy(update={"small_site": "pool"})
    assert "the pooled batch has only 3 scans (< 20): CMU (N=3)" in str(_refusal(df, pool))
    two = df[(df["SITE"] != "OHSU") | (df.groupby("SITE").cumcount() < 4)]
    fit = combat.fit(_data(two), pool.model_copy(update={"min_site_n": 5}))
    assert fit.model.batch_map["CMU"] == fit.model.batch_map["OHSU"] == "pooled"
    assert "CMU" not in fit.model.batches and "pooled" in fit.model.batches
    assert any(f.code == "pooled_sites" and "CMU (N=3), OHSU (N=4)" in f.message
               for f in fit.findings)
    assert not np.isnan(fit.harmonized.to_numpy()).any()


def test_missing_covariate_column_and_value_are_named(abide):
    with pytest.raises(InputTableError, match=r"covariate column\(s\) \['BMI'\] not found"):
        _data(abide, covs=["AGE", "BMI"])
    df = abide.copy()
    df.loc[[3, 4], "AGE"] = np.nan
    err = _refusal(df)
    # rows named by the table's identifier (ABIDE's FILE_ID) and their line in the file
    assert (f"covariate 'AGE' is empty in 2 row(s) (FILE_ID={abide['FILE_ID'][3]} (row 5), "
            f"FILE_ID={abide['FILE_ID'][4]} (row 6))") in str(err)
    data = _data(abide)
    data.covariates = data.covariates.drop(columns="DX")
    err = _refusal_of(data)
    assert "covariate 'DX' is not in the data" in str(err)


def _refusal_of(data, settings=SETTINGS) -> HarmonizationRefused:
    with pytest.raises(HarmonizationRefused) as info:
        combat.fit(data, settings)
    return info.value


def test_unknown_site_at_apply_needs_a_refit_and_the_rest_is_harmonized(abide):
    model = combat.fit(_data(abide[abide["SITE"] != "YALE"]), SETTINGS).model
    new = _data(abide[abide["SITE"].isin(["YALE", "NYU"])])
    out = combat.apply(model, new)
    yale = (new.batch == "YALE").to_numpy()
    assert not out.ok[yale].any() and out.ok[~yale].all()
    assert out.status[yale].str.contains(f"site 'YALE' is not in model {model.model_id}").all()
    assert out.status[yale].str.contains("needs a refit").all()
    assert out.harmonized[~yale].notna().all().all()
    assert [f.where["sites"] for f in out.findings] == [["YALE"]]
    with pytest.raises(HarmonizationRefused, match="YALE"):  # nothing to harmonize: no all-NaN table
        combat.apply(model, _data(abide[abide["SITE"] == "YALE"]))
    with pytest.raises(ModelMismatchError, match="CSF"):
        combat.apply(model, _data(abide[abide["SITE"] == "NYU"], features=FEATURES[:2]))


def test_confounded_covariate_is_refused_and_single_level_sites_reported(abide):
    df = abide.copy()
    df["SCANNER_FIELD"] = df["SITE"].map(lambda s: "3T" if s < "NYU" else "1.5T")
    df["SCANNER_FIELD"] = np.where(np.arange(len(df)) % 50 == 0, "1.5T", df["SCANNER_FIELD"])
    err = _refusal_of(from_wide_table(df, "SITE", COVS + ["SCANNER_FIELD"], features=FEATURES),
                      HarmonizationSettings(covariates=COVS + ["SCANNER_FIELD"]))
    assert "covariate 'SCANNER_FIELD' is confounded with site" in str(err)
    fit = combat.fit(_data(abide), SETTINGS)
    single = [f for f in fit.findings if f.code == "site_single_level"]
    assert {f.where["batch"] for f in single} >= {"LEUVEN_1", "USM"}  # all-male sites of ABIDE
    assert all("SEX" in f.message for f in single)
    assert fit.association["AGE"] > 0.5 and any(f.code == "associated_covariate" for f in fit.findings)


def test_feature_constant_within_one_site_is_refused(abide):
    df = abide.copy()
    df.loc[df["SITE"] == "KKI", "CSF"] = 900.0
    err = _refusal(df)
    assert "site 'KKI': feature(s) ['CSF'] do not vary within the site" in str(err)


def test_a_single_site_is_refused(abide):
    err = _refusal(abide[abide["SITE"] == "NYU"])
    assert "all rows are in one batch ('NYU')" in str(err)


def test_every_reason_is_reported_at_once(abide):
    df = abide[(abide["SITE"] != "CMU") | (abide.groupby("SITE").cumcount() < 3)].copy()
    df.loc[df.index[0], "CSF"] = np.nan
    df.loc[df.index[1], "AGE"] = np.nan
    err = _refusal(df, COMPLETE)
    assert {f.code for f in err.findings if f.level == "refusal"} == \
        {"nan_feature", "missing_covariate_value", "small_site"}
    assert len(str(err).splitlines()) == 4  # the heading and one line per reason


def test_empty_input_is_a_named_refusal_not_an_index_error(abide, tmp_path):
    # every row filtered out before the fit: ComBat's checks used to index a first row
    for empty in (abide.iloc[:0], abide[abide["SITE"] == "NO_SUCH_SITE"]):
        err = _refusal(empty)
        assert isinstance(err, NoRowsToHarmonize)
        assert [f.code for f in err.findings] == ["no_rows"]
        assert "table: no rows to fit" in str(err)
    # one site, or small sites pooled into one: named, with the batch
    pooled = abide[abide["SITE"].isin(["CMU", "OHSU"])]
    err = _refusal(pooled, SETTINGS.model_copy(update={"small_site": "pool", "min_site_n": 28}))
    assert "all rows are in one batch ('pooled')" in str(err)
    assert [f.where for f in err.findings if f.code == "single_batch"] == [{"batch": "pooled"}]
    # applying a model to a table without rows
    lake = Lake(str(tmp_path / "lake")).init()
    model = combat.fit(_data(abide), SETTINGS).model
    model_id = model_store.save_model(lake, model)
    abide.iloc[:0].to_parquet(tmp_path / "empty.parquet", index=False)  # keeps the column types
    with pytest.raises(NoRowsToHarmonize, match=r"empty\.parquet: no rows to harmonize"):
        service.apply_table(lake, model_id, str(tmp_path / "empty.parquet"), str(tmp_path / "out.csv"),
                            "SITE")
    assert not (tmp_path / "out.csv").exists()
