"""ComBat on real multi-site data (ABIDE I, FreeSurfer 6, 20 sites, 1035 subjects).

References: neuroCombat for the harmonized values, neuroHarmonize for the
frozen-model apply, and the issue's measurements of bare neuroHarmonize for
the site-effect and biology figures.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from neuroCombat import neuroCombat
from neuroHarmonize import harmonizationApply, harmonizationLearn
from neuroHarmonize.harmonizationApply import applyModelOne

from data_contracts.harmonization_settings import HarmonizationSettings
from harmonization import combat, diagnostics, model_store
from harmonization.abide import load_abide
from harmonization.inputs import from_wide_table
from tasks.lake.storage import Lake

pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")

COVS = ["AGE", "SEX", "DX"]
SETTINGS = HarmonizationSettings(covariates=COVS)




@pytest.fixture(scope="module")
def fitted(data):
    return combat.fit(data, SETTINGS)


def _nh_covars(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"SITE": df["SITE"].to_numpy(), "AGE": df["AGE"].to_numpy(),
                         "SEX": df["SEX"].to_numpy(), "DX": df["DX"].to_numpy()})


def test_abide_table_is_the_issue_table(abide, data):
    assert len(abide) == 1035 and abide["SITE"].nunique() == 20
    assert data.features.shape[1] == 121  # 55 aseg + 2 x 35 thickness, minus 4 constant columns


def test_linear_fit_equals_neurocombat(abide, data, fitted):
    ref = neuroCombat(data.features.to_numpy().T, _nh_covars(abide), "SITE",
                      categorical_cols=["SEX", "DX"], continuous_cols=["AGE"])["data"].T
    ours = fitted.harmonized.to_numpy()
    assert np.abs(ours - ref).max() <= 1e-6
    assert not np.allclose(ours, data.features.to_numpy())  # it did something


def test_text_covariates_are_encoded_for_the_user(abide_data, data, fitted):
    text = load_abide(abide_data, text_labels=True)
    assert text["SEX"].dtype == object
    d = from_wide_table(text, "SITE", COVS, features=list(data.features.columns))
    res = combat.fit(d, SETTINGS)
    assert [c.levels for c in res.model.encoding.covariates] == [(), ("F", "M"), ("ASD", "TD")]
    assert np.abs(res.harmonized.to_numpy() - fitted.harmonized.to_numpy()).max() <= 1e-6


def test_frozen_apply_equals_fit_and_neuroharmonize(abide, data, fitted):
    applied = combat.apply(fitted.model, data)
    assert applied.ok.all()
    assert np.abs(applied.harmonized.to_numpy() - fitted.harmonized.to_numpy()).max() <= 1e-6
    covars = _nh_covars(abide)
    x = data.features.to_numpy()
    full = harmonizationApply(x, covars, fitted.model.to_neuroharmonize())
    assert np.abs(full - applied.harmonized.to_numpy()).max() <= 1e-6
    # one site only: neuroHarmonize's batch apply fails here, its per-row apply does not
    rows = np.nonzero((abide["SITE"] == "NYU").to_numpy())[0][:10]
    one = np.vstack([applyModelOne(x[i:i + 1], covars.iloc[i:i + 1], fitted.model.to_neuroharmonize())
                     for i in rows])
    ours = combat.apply(fitted.model, data.subset(np.isin(np.arange(len(x)), rows)))
    assert np.abs(one - ours.harmonized.to_numpy()).max() <= 1e-6


def test_site_effect_removed_and_biology_kept_as_bare_neuroharmonize(abide, data, fitted):
    d = diagnostics.diagnose(data.features, fitted.harmonized, fitted.encoded, fitted.batch)
    before, after = d["site_effect"]["before"], d["site_effect"]["after"]
    assert before["share_F"] >= 0.9          # the issue measured 97.5 %
    assert after["share_F"] <= 0.05          # the issue's target
    _, bare = harmonizationLearn(data.features.to_numpy(), _nh_covars(abide))
    bare = pd.DataFrame(bare, index=data.features.index, columns=data.features.columns)
    ref = diagnostics.survival(diagnostics.coefficients(data.features, fitted.encoded, fitted.batch),
                               diagnostics.coefficients(bare, fitted.encoded, None))
    ours = pd.DataFrame(d["biology"]["survival"]).set_index("term")
    for term in ("AGE", "DX"):
        assert ours.loc[term, "significant_before"] > 0
        assert ours.loc[term, "share_same_sign"] == 1.0
        assert ours.loc[term, "within_ci"] == ref.loc[term, "within_ci"]
        assert ours.loc[term, "significant_before"] == ref.loc[term, "significant_before"]
    assert ours.loc["AGE", "share_within_ci"] >= 0.95


def _partial_eta2(values: pd.DataFrame, encoded: pd.DataFrame, batch: pd.Series) -> float:
    y = values.to_numpy()
    reduced = diagnostics.ols_many(diagnostics._design(encoded, None), y)["rss"]
    full = diagnostics.ols_many(diagnostics._design(encoded, batch), y)["rss"]
    return float(np.median((reduced - full) / reduced))


def test_frozen_model_removes_site_effect_on_held_out_30_percent(abide, data):
    """Fit on a random 70 % per site, apply to the other 30 %.

    Held-out rows carry the estimation error of per-site estimates made from
    18 to 122 training scans (median 27), so in some splits a few correlated
    features keep a small but detectable site effect; every split must lose
    most of it. Bare neuroHarmonize leaves exactly the same values on the same
    split, and data on which ComBat's model holds exactly leave as much
    (bench/harmonize.py, table 4): the residual is estimation noise, not ours.
    """
    settings = HarmonizationSettings(covariates=COVS, min_site_n=15)
    x, covars = data.features.to_numpy(), _nh_covars(abide)
    shares = []
    for seed in range(5):
        train = abide.groupby("SITE", group_keys=False).sample(frac=0.7, random_state=seed).index
        mask = abide.index.isin(train)
        model = combat.fit(data.subset(mask), settings).model
        test = data.subset(~mask)
        out = combat.apply(model, test)
        assert out.ok.all()
        nh, _ = harmonizationLearn(x[mask], covars[mask].reset_index(drop=True))
        bare = harmonizationApply(x[~mask], covars[~mask].reset_index(drop=True), nh)
        assert np.abs(bare - out.harmonized.to_numpy()).max() <= 1e-6
        enc, _ = model.encoding.encode(test.covariates)
        before = diagnostics.site_effect(test.features, enc, test.batch)["significant_F"].mean()
        after = diagnostics.site_effect(out.harmonized, enc, test.batch)["significant_F"].mean()
        assert after <= before / 2
        assert _partial_eta2(out.harmonized, enc, test.batch) <= \
            _partial_eta2(test.features, enc, test.batch) / 2
        shares.append(after)
    assert np.median(shares) <= 0.10


def test_model_store_roundtrip_and_integrity(tmp_path, data, fitted):
    lake = Lake(str(tmp_path / "lake")).init()
    model_id = model_store.save_model(lake, fitted.model)
    assert model_id == fitted.model.model_id and model_id.startswith("hm-")
    assert model_store.save_model(lake, fitted.model) == model_id  # idempotent, unlike neuroHarmonize
    elsewhere = data.subset(np.ones(data.n, dtype=bool))
    elsewhere.source = "a copy of the table under another name"
    assert combat.fit(elsewhere, SETTINGS).model.model_id == model_id  # the id is the content
    loaded = model_store.load_model(lake, model_id)
    assert loaded.model_id == model_id
    assert loaded.metadata["batches"] == dict(zip(fitted.model.batches, fitted.model.batch_sizes))
    assert loaded.metadata["input"]["fingerprint"] == data.fingerprint()
    assert "neuroHarmonize" in loaded.metadata["software"]
    again = combat.apply(loaded, data)
    assert np.abs(again.harmonized.to_numpy() - fitted.harmonized.to_numpy()).max() <= 1e-9
    meta = lake.read_text(f"models/harmonization/{model_id}/model.json")
    lake.write_text(f"models/harmonization/{model_id}/model.json", meta.replace('"ComBat"', '"Other"'))
    with pytest.raises(model_store.ModelIntegrityError, match=model_id):
        model_store.load_model(lake, model_id)
    with pytest.raises(model_store.ModelNotFoundError, match="hm-0000000000000000"):
        model_store.load_model(lake, "hm-0000000000000000")
