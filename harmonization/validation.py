"""What a statistician checks before trusting a fit, beyond the in-sample F-test.

- ``held_out``: k-fold, the model fitted without a fold and applied to it; the share of features
  with a site effect in the left-out rows (the in-sample share is close to 0 by construction:
  it tests the linear model ComBat removed, on the rows it removed it from), the same with the
  site labels of the left-out rows permuted (the F-test's own false-positive level), and on a copy
  of the data where ComBat's model holds exactly (``combat_world``: the estimation-noise floor).
- ``scale_effect``: Brown-Forsythe test of equal spread across batches per feature (a one-way
  ANOVA of the absolute deviations from the batch median of the covariate-model residuals),
  before and after; ComBat's location test says nothing about scale.
- ``site_prediction``: a random forest's cross-validated balanced accuracy at telling the batch
  from all features at once (the covariate-model residuals), against chance (1 / batches):
  multivariate and non-linear site signal the per-feature tests miss.
- ``prior_fit``: the empirical-Bayes priors against the estimates they shrink, per batch:
  gamma-hat against N(gamma-bar, tau2) and delta-hat against the inverse gamma (a, b), by
  Kolmogorov-Smirnov; a rejected prior is a batch whose shrinkage is not to be trusted.
  ``prior_panels`` keeps the raw and shrunken estimates of the worst-fitting batches to draw.
- ``covariance``: whether the features' correlation differs by batch after ComBat (a permutation
  test), and after CovBat when the model has it (Chen et al. 2022).
- ``covariate_balance``: per batch and numeric covariate, the standardized mean difference
  against the other batches and the share of its rows inside the others' range.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from neuroCombat.neuroCombat import aprior, bprior
from scipy import stats
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from data_contracts.harmonization_settings import HarmonizationSettings
from harmonization import combat, covbat, diagnostics
from harmonization.checks import covariate_balance  # noqa: F401  (re-exported: the report's balance table)
from harmonization.errors import HarmonizationRefused
from harmonization.inputs import HarmonizationData

K_FOLDS = 5
# 50 trees, 3 folds: ABIDE before/after 0.520/0.102, fit + report 10 s (100 trees, 5 folds:
# 0.547/0.114, 26 s)
PREDICTION_FOLDS = 3


def _residuals(values: np.ndarray, encoded: pd.DataFrame) -> np.ndarray:
    return diagnostics.ols_many(diagnostics._design(encoded, None), values)["resid"]


def scale_effect(values: pd.DataFrame, encoded: pd.DataFrame, batch: pd.Series,
                 alpha: float = diagnostics.ALPHA) -> dict[str, Any]:
    """Brown-Forsythe per feature, BH-adjusted: the share of features whose spread differs by batch."""
    resid = _residuals(values.to_numpy(dtype=float), encoded)
    codes, _ = pd.factorize(batch.astype(str))
    z = np.empty_like(resid)
    for b in np.unique(codes):
        rows = codes == b
        z[rows] = np.abs(resid[rows] - np.median(resid[rows], axis=0))
    groups = [z[codes == b] for b in np.unique(codes)]
    f, p = stats.f_oneway(*groups, axis=0)
    sig, _ = diagnostics._bh(np.asarray(p), alpha)
    return {"significant": int(sig.sum()), "share": round(float(sig.mean()), 4),
            "features": [str(c) for c, s in zip(values.columns, sig) if s][:20]}


def site_prediction(values: pd.DataFrame, encoded: pd.DataFrame, batch: pd.Series, seed: int = 0) -> dict[str, Any]:
    """Cross-validated balanced accuracy of a random forest predicting the batch from the features."""
    resid = _residuals(values.to_numpy(dtype=float), encoded)
    labels = batch.astype(str).to_numpy()
    folds = min(PREDICTION_FOLDS, int(pd.Series(labels).value_counts().min()))
    if folds < 2:
        return {"balanced_accuracy": None, "chance": None, "folds": folds}
    forest = RandomForestClassifier(n_estimators=50, min_samples_leaf=2, random_state=seed, n_jobs=1)
    guess = cross_val_predict(forest, resid, labels, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return {"balanced_accuracy": round(float(balanced_accuracy_score(labels, guess)), 4),
            "chance": round(1.0 / len(set(labels)), 4), "folds": folds}


def combat_world(data: HarmonizationData, settings: HarmonizationSettings):
    """A copy of the data in which ComBat's model holds exactly: the estimation-noise floor.

    From a fit on all rows: each row keeps its covariates, batch and the fitted covariate mean;
    its site effect is the fitted gamma*/delta* of its site; its residual is a real standardized
    harmonized residual (every feature, their correlation kept) of a randomly drawn row, so any
    site effect left in the residuals is shuffled away. What a held-out test still finds there is
    the error of site estimates from that many scans. Returns ``draw(seed) -> HarmonizationData``.
    """
    full = combat.fit(data, settings)
    m = full.model
    centre = m.grand_mean + combat.covariate_design(m, full.encoded) @ m.B_hat[len(m.batches):]
    sd = np.sqrt(m.var_pooled)
    resid = (full.harmonized.to_numpy() - centre) / sd
    b = pd.Index(m.batches).get_indexer(full.batch.to_numpy())
    shift, scale = m.gamma_star[b], np.sqrt(m.delta_star[b])

    def draw(seed: int) -> HarmonizationData:
        r = resid[np.random.default_rng(seed).permutation(len(resid))]
        x = centre + sd * (shift + scale * r)
        return HarmonizationData(pd.DataFrame(x, index=data.features.index, columns=data.features.columns),
                                 data.covariates, data.batch, data.row_labels, "ComBat world")
    return draw


def held_out(data: HarmonizationData, settings: HarmonizationSettings, encoded: pd.DataFrame,
             seed: int = 0) -> dict[str, Any]:
    """k-fold: fit without each fold (stratified by batch), apply to it; site-effect share per fold,
    with the site labels permuted (the test's false-positive level) and on a copy of the data where
    ComBat's model holds exactly (the estimation-noise floor: :func:`combat_world`)."""
    labels = data.batch.astype(str).to_numpy()
    folds = min(K_FOLDS, int(pd.Series(labels).value_counts().min()))
    if folds < 2:
        return {"folds": folds, "share_F": [], "share_F_permuted": [], "share_F_floor": []}
    settings = settings.model_copy(update={"small_site": "pool"})
    try:
        world = combat_world(data, settings)(seed)
    except HarmonizationRefused:
        world = None
    rng = np.random.default_rng(seed)
    shares, null, floor = [], [], []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(labels, labels):
        train_mask = np.zeros(len(labels), bool)
        train_mask[train] = True
        share = _fold_share(data, settings, train_mask, encoded, len(set(labels[test])), rng)
        if share is None:
            continue
        shares.append(share[0])
        null.append(share[1])
        if world is not None:
            floor_share = _fold_share(world, settings, train_mask, encoded, len(set(labels[test])), rng)
            if floor_share is not None:
                floor.append(floor_share[0])
    return {"folds": folds, "share_F": [round(s, 4) for s in shares], "share_F_permuted": [round(s, 4) for s in null],
            "share_F_floor": [round(s, 4) for s in floor],
            "median_share_F": round(float(np.median(shares)), 4) if shares else None,
            "median_share_F_permuted": round(float(np.median(null)), 4) if null else None,
            "median_share_F_floor": round(float(np.median(floor)), 4) if floor else None}


def _fold_share(data: HarmonizationData, settings: HarmonizationSettings, train_mask: np.ndarray,
                encoded: pd.DataFrame, n_test_batches: int, rng: np.random.Generator) -> tuple[float, float] | None:
    """The share of features with a site effect in the left-out rows, and with their labels permuted."""
    try:
        model = combat.fit(data.subset(train_mask), settings).model
    except HarmonizationRefused:   # a fold the fit refuses (a batch too small without it) is not a site effect
        return None
    applied = combat.apply(model, data.subset(~train_mask), refuse_empty=False)
    ok = applied.ok
    if ok.sum() <= n_test_batches + encoded.shape[1] + 1:
        return None
    enc = encoded[~train_mask][ok]
    batch = data.batch[~train_mask][ok].astype(str)
    harmonized = applied.harmonized[ok]
    shuffled = pd.Series(rng.permutation(batch.to_numpy()), index=batch.index)
    return (float(diagnostics.site_effect(harmonized, enc, batch)["significant_F"].mean()),
            float(diagnostics.site_effect(harmonized, enc, shuffled)["significant_F"].mean()))


def covariance(data: HarmonizationData, result: combat.FitResult, alpha: float = 0.05) -> dict[str, Any]:
    """Whether the features' correlation still differs by batch: on the ComBat residuals (ComBat
    changes each feature per batch by a shift and a scale, so within a batch their correlation is
    what it was before), and after CovBat when the model has it (``covbat.covariance_effect``)."""
    model = result.model
    idx = pd.Index(model.batches).get_indexer(result.batch.astype(str).to_numpy())
    x = data.features[model.features].to_numpy(dtype=float)
    resid, centre = combat.residuals(model, x, idx, combat.covariate_design(model, result.encoded))
    out: dict[str, Any] = {"combat": covbat.covariance_effect(resid, idx), "alpha": alpha}
    if model.covbat is not None:
        out["covbat"] = covbat.covariance_effect(result.harmonized.to_numpy() - centre, idx)
        out["components"] = model.covbat.metadata()["components"]
    out["remains"] = bool(out.get("covbat", out["combat"])["p"] < alpha)
    return out


PRIOR_PANELS = 4   # batches drawn against their priors: the worst fits first


def prior_panels(model: combat.ComBatModel, priors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The raw estimates of the batches whose priors fit worst (rejected first, lowest KS p), with
    their prior's parameters and the shrunken estimates: what the report draws."""
    def worst(p: dict[str, Any]) -> float:
        return min(v for v in (p["gamma_ks_p"], p["delta_ks_p"], 1.0) if v is not None)
    out = []
    for p in sorted(priors, key=worst)[:PRIOR_PANELS]:
        b = model.batches.index(p["batch"])
        g, d = np.asarray(model.gamma_hat[b], dtype=float), np.asarray(model.delta_hat[b], dtype=float)
        panel = {"batch": p["batch"], "gamma_hat": g.round(5).tolist(),
                 "gamma_star": model.gamma_star[b].round(5).tolist(), "gamma_bar": float(g.mean()),
                 "t2": float(np.var(g, ddof=1)), "gamma_ks_p": p["gamma_ks_p"], "delta_ks_p": p["delta_ks_p"]}
        if not model.options.mean_only and np.var(d, ddof=1) > 0:
            panel.update(delta_hat=d.round(5).tolist(), delta_star=model.delta_star[b].round(5).tolist(),
                         a=float(aprior(d)), b=float(bprior(d)))
        out.append(panel)
    return out


def prior_fit(model: combat.ComBatModel, alpha: float = 0.01) -> list[dict[str, Any]]:
    """Per batch: KS p-values of gamma-hat against its normal prior and delta-hat against its inverse gamma."""
    out = []
    for b, g, d in zip(model.batches, model.gamma_hat, model.delta_hat):
        row: dict[str, Any] = {"batch": b, "gamma_ks_p": None, "delta_ks_p": None}
        if len(g) >= 3 and np.var(g, ddof=1) > 0:
            row["gamma_ks_p"] = round(float(stats.kstest(g, "norm", args=(g.mean(), np.std(g, ddof=1))).pvalue), 5)
        if len(d) >= 3 and np.var(d, ddof=1) > 0 and not model.options.mean_only:
            a, bb = aprior(d), bprior(d)
            row["delta_ks_p"] = round(float(stats.kstest(d, "invgamma", args=(a, 0, bb)).pvalue), 5)
        row["rejected"] = any(p is not None and p < alpha for p in (row["gamma_ks_p"], row["delta_ks_p"]))
        row["delta_star_max"] = round(float(np.max(model.delta_star[model.batches.index(b)])), 3)
        out.append(row)
    return out
