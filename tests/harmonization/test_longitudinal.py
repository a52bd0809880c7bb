"""Longitudinal ComBat (a random intercept per subject, Beer et al. 2020) on a simulation whose
truth is known: 300 subjects x 3 yearly visits at 3 sites, a subject effect (tau 1.0), an age
effect, additive and multiplicative scanner effects, and a scanner change at one site that most
of its subjects meet at their second or third visit (confounded partly with time)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from data_contracts.harmonization_settings import HarmonizationSettings
from harmonization import combat, model_store
from harmonization.inputs import HarmonizationData
from harmonization.longitudinal import fit_random_intercept
from tasks.lake.storage import Lake

S, V, F = 300, 3, 20
TAU, SIGMA = 1.0, 0.5


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(7)
    subj, visit = np.repeat(np.arange(S), V), np.tile(np.arange(V), S)
    site = np.repeat(rng.integers(0, 3, S), V)
    age = np.repeat(rng.uniform(50, 80, S), V) + visit
    sex = np.repeat(rng.integers(0, 2, S), V)
    epoch = ((site == 2) & (visit >= np.repeat(rng.integers(1, 3, S), V))).astype(int)
    batch = np.array([f"site{s}" + (":upgraded" if e else "") for s, e in zip(site, epoch)])
    labels = sorted(set(batch))
    codes = pd.Index(labels).get_indexer(batch)
    beta_age, beta_sex = rng.normal(-0.05, 0.01, F), rng.normal(0.3, 0.1, F)
    u = rng.normal(0, TAU, (S, F))
    gamma, delta = rng.normal(0, 0.5, (len(labels), F)), rng.uniform(0.3, 3.0, (len(labels), F))
    e = rng.normal(size=(S * V, F))
    biology = 10 + age[:, None] * beta_age + sex[:, None] * beta_sex + u[subj]
    x = biology + gamma[codes] + np.sqrt(delta[codes]) * SIGMA * e
    data = HarmonizationData(pd.DataFrame(x, columns=[f"f{i}" for i in range(F)]),
                             pd.DataFrame({"AGE": age, "SEX": sex}), pd.Series(batch),
                             pd.Series([f"sub{s} visit{v}" for s, v in zip(subj, visit)]),
                             subjects=pd.Series([f"sub{s}" for s in subj]))
    fits = {mode: combat.fit(data, HarmonizationSettings(covariates=["AGE", "SEX"], repeated=mode))
            for mode in ("longitudinal", "independent")}
    return {"data": data, "x": x, "subj": subj, "site": site, "age": age, "sex": sex, "codes": codes,
            "labels": labels, "beta_age": beta_age, "fits": fits}


def test_the_closed_form_equals_statsmodels_mixedlm(world):
    import statsmodels.api as sm

    w = world
    design = np.column_stack([np.eye(len(w["labels"]))[w["codes"]], w["age"], w["sex"]])
    ours = fit_random_intercept(w["x"], design, w["subj"])
    for f in (0, 7):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = sm.MixedLM(w["x"][:, f], design, groups=w["subj"]).fit(reml=True)
        assert np.abs(ref.fe_params - ours.b_hat[:, f]).max() < 1e-3
        assert ours.sigma2[f] == pytest.approx(ref.scale, rel=0.01)
        assert ours.tau2[f] == pytest.approx(float(np.asarray(ref.cov_re).ravel()[0]), rel=0.02)


def _mixed(values, w):
    design = np.column_stack([np.eye(len(w["labels"]))[w["codes"]], w["age"], w["sex"]])
    return fit_random_intercept(values, design, w["subj"])


def test_site_effect_removed_subject_and_age_effects_kept(world):
    w = world
    before, after = _mixed(w["x"], w), _mixed(w["fits"]["longitudinal"].harmonized.to_numpy(), w)
    spread = lambda r: np.ptp(r.b_hat[: len(w["labels"])], axis=0)     # noqa: E731 (batch coefficients)
    assert np.median(spread(before)) > 0.5 and np.median(spread(after)) < 0.1
    n = len(w["labels"])
    assert np.abs(after.b_hat[n] - w["beta_age"]).mean() < 0.01            # age: 2-3 % of its size per year
    assert after.tau2.mean() == pytest.approx(TAU ** 2, rel=0.15)


def _within_between(values, w, site):
    rows = w["site"] == site
    subj = pd.factorize(w["subj"][rows])[0]
    counts = np.bincount(subj)
    means = np.zeros((len(counts), values.shape[1]))
    np.add.at(means, subj, values[rows])
    means /= counts[:, None]
    within = ((values[rows] - means[subj]) ** 2).sum(axis=0) / (rows.sum() - len(counts))
    return within, means.var(axis=0, ddof=1)


def test_the_cross_sectional_model_leaves_the_scanners_noise_the_longitudinal_one_removes(world):
    """Sites 0 and 1 differ in scanner noise only; ComBat taking scans as independent scales the
    subject's lasting difference with the noise, so the noise ratio stays (Beer et al. 2020, fig. 3)."""
    w = world

    def noise_ratio(values):   # median |log| of site 0's within-subject variance over site 1's
        (w0, _), (w1, _) = _within_between(values, w, 0), _within_between(values, w, 1)
        return float(np.median(np.abs(np.log(w0 / w1))))

    raw = noise_ratio(w["x"])
    longitudinal = noise_ratio(w["fits"]["longitudinal"].harmonized.to_numpy())
    independent = noise_ratio(w["fits"]["independent"].harmonized.to_numpy())
    assert raw > 0.3 and longitudinal < 0.1 and independent > 2.5 * longitudinal


def test_a_longitudinal_model_applies_to_its_subjects_and_refuses_others(world, tmp_path):
    w = world
    fitted = w["fits"]["longitudinal"]
    assert fitted.model.metadata["longitudinal"]["subjects"][:2] == ["sub0", "sub1"]
    lake = Lake(str(tmp_path / "lake")).init()
    stored = model_store.load_model(lake, model_store.save_model(lake, fitted.model))
    assert np.array_equal(stored.intercepts, fitted.model.intercepts) and stored.subjects == fitted.model.subjects
    applied = combat.apply(stored, w["data"])
    assert applied.ok.all() and np.array_equal(applied.harmonized.to_numpy(), fitted.harmonized.to_numpy())
    stranger = w["data"].subset(np.arange(len(w["x"])) < 3)
    stranger.subjects = pd.Series(["nobody"] * 3, index=stranger.subjects.index)
    out = combat.apply(fitted.model, stranger, refuse_empty=False)
    assert not out.ok.any() and "not in the longitudinal model" in out.status.iloc[0]
