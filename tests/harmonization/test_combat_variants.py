"""Every ComBat variant neuroCombat 0.2.12 offers, fitted here and there on ABIDE I (20 sites, 1035
subjects, 121 features): empirical Bayes on or off, parametric or non-parametric priors, mean only
or mean and scale, a reference batch or none, with covariates (AGE, SEX, DX) and without any.

neuroCombat is the Python port of Fortin's reference ComBat; its ``ref_batch`` path calls
``np.int``, removed in numpy 1.24, so the reference is run with ``np.int`` restored (its bug, not
ours, and for the reference call only).
"""

from __future__ import annotations

import contextlib
import io
import itertools

import numpy as np
import pandas as pd
import pytest
from neuroCombat import neuroCombat

from data_contracts.harmonization_settings import HarmonizationSettings
from harmonization import combat, model_store
from harmonization.abide import constant_columns
from harmonization.errors import HarmonizationRefused
from harmonization.inputs import from_wide_table
from tasks.lake.storage import Lake

COVARIATES = ("AGE", "SEX", "DX")
REF = "NYU"
# (eb, parametric, mean_only, ref_batch): parametric only means something with eb
VARIANTS = [(eb, par, mean, ref) for eb, par, mean, ref in itertools.product(
    (True, False), (True, False), (False, True), (None, REF)) if eb or par]
# neuroCombat's own non-parametric priors give NaN here (UM_1, two features): refused, below
UNDERFLOW = (True, False, True, REF)



def _data(abide: pd.DataFrame, covariates: tuple[str, ...]):
    return from_wide_table(abide, "SITE", list(covariates),
                           exclude=["FILE_ID", *COVARIATES, *constant_columns(abide)])


def _reference(abide, x: np.ndarray, covariates, eb, parametric, mean_only, ref) -> np.ndarray:
    covars = pd.DataFrame({"SITE": abide["SITE"].to_numpy(), **{c: abide[c].to_numpy() for c in covariates}})
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(np, "int", int, raising=False)
        out = neuroCombat(x.T, covars, "SITE", categorical_cols=[c for c in covariates if c != "AGE"],
                          continuous_cols=[c for c in covariates if c == "AGE"], eb=eb, parametric=parametric,
                          mean_only=mean_only, ref_batch=ref)
    return out["data"].T


@pytest.mark.filterwarnings("ignore::RuntimeWarning")     # neuroCombat's int_eprior divides 0 by 0
@pytest.mark.parametrize("covariates", [COVARIATES, ()], ids=["AGE+SEX+DX", "none"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(
    ["eb" if v[0] else "noeb", "par" if v[1] else "nonpar", "mean" if v[2] else "meanvar", v[3] or "noref"]))
def test_each_variant_equals_neurocombat(abide, covariates, variant):
    eb, parametric, mean_only, ref = variant
    data = _data(abide, covariates)
    settings = HarmonizationSettings(covariates=list(covariates), eb=eb, parametric=parametric,
                                     mean_only=mean_only, ref_batch=ref)
    reference = _reference(abide, data.features.to_numpy(), covariates, *variant)
    if variant == UNDERFLOW:
        assert np.isnan(reference).any()
        with pytest.raises(HarmonizationRefused, match="UM_1.*not numbers.*parametric"):
            combat.fit(data, settings)
        return
    fitted = combat.fit(data, settings)
    ours = fitted.harmonized.to_numpy()
    assert np.abs(ours - reference).max() <= 1e-6
    assert not np.allclose(ours, data.features.to_numpy())
    if ref is not None:   # the reference site's values are its own, to the bit
        rows = (abide["SITE"] == ref).to_numpy()
        assert np.array_equal(ours[rows], data.features.to_numpy()[rows])
    if mean_only:
        assert np.all(fitted.model.delta_star == 1.0)
    # the frozen model gives its training rows the fit's values, to the bit
    applied = combat.apply(fitted.model, data)
    assert applied.ok.all() and np.array_equal(applied.harmonized.to_numpy(), ours)


def test_the_options_are_stored_with_the_model_and_used_after_loading(abide, tmp_path):
    data = _data(abide, COVARIATES)
    settings = HarmonizationSettings(covariates=list(COVARIATES), eb=False, mean_only=True, ref_batch=REF)
    fitted = combat.fit(data, settings)
    lake = Lake(str(tmp_path / "lake")).init()
    model_id = model_store.save_model(lake, fitted.model)
    loaded = model_store.load_model(lake, model_id)
    assert loaded.options == fitted.model.options and loaded.metadata["reference_batch"] == REF
    again = combat.apply(loaded, data).harmonized.to_numpy()
    assert np.array_equal(again[(abide["SITE"] == REF).to_numpy()],
                          data.features.to_numpy()[(abide["SITE"] == REF).to_numpy()])
    assert np.abs(again - fitted.harmonized.to_numpy()).max() <= 1e-9


@pytest.mark.parametrize("ref, code", [("NOWHERE", "unknown_reference_batch"), ("CMU", "pooled_reference_batch")])
def test_a_reference_batch_that_is_not_a_batch_of_its_own_is_refused(abide, ref, code):
    data = _data(abide, COVARIATES)
    settings = HarmonizationSettings(covariates=list(COVARIATES), ref_batch=ref, min_site_n=30, small_site="pool")
    with pytest.raises(HarmonizationRefused) as err:
        combat.fit(data, settings)
    assert code in {f.code for f in err.value.findings} and ref in str(err.value)


def test_non_parametric_without_empirical_bayes_is_a_settings_error():
    with pytest.raises(ValueError, match="needs eb=True"):
        HarmonizationSettings(eb=False, parametric=False)
