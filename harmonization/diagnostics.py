"""What harmonization did, in numbers a statistician can check.

Site effect (per feature, before and after)
    OLS F-test of the batch indicators given the covariates (full model
    ``feature ~ covariates + batch`` against ``feature ~ covariates``), and a
    Kruskal-Wallis test of the covariate-model residuals across batches (for a
    ComBat-GAM model the covariate model holds its spline basis);
    p-values Benjamini-Hochberg adjusted across features at ``alpha``; the share
    of features with a significant site effect.
Biology (per feature and covariate term)
    Before: OLS of the raw feature on covariates + batch (the site-adjusted
    effect ComBat is built to keep). After: OLS of the harmonized feature on the
    covariates alone (what an analysis of harmonized data fits). An effect
    *survives* when it was significant before (BH at ``alpha``), keeps its sign
    and its after-estimate lies inside the before 95 % confidence interval.
PCA
    Principal components of the z-scored features, before and after, with the
    share of each component's variance explained by batch (R^2 on batch indicators).

Every result is plain JSON-able data; :mod:`harmonization.report` draws from it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from harmonization.inputs import level_of

ALPHA = 0.05
MAX_POINTS = 3000   # PCA points kept for the plot and the JSON
MAIN_FEATURES = 4   # per-site boxplots of the features with the largest site effect


def _design(encoded: pd.DataFrame, batch: pd.Series | None) -> np.ndarray:
    parts = [np.ones((len(encoded), 1)), encoded.to_numpy(dtype=float)]
    if batch is not None:
        parts.append(pd.get_dummies(batch.to_numpy(), drop_first=True).to_numpy(dtype=float))
    return np.column_stack(parts)


def ols_many(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """OLS of every column of ``y`` on ``x``: coefficients, standard errors, RSS, residual df."""
    coef, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    rss = np.sum(resid**2, axis=0)
    df = x.shape[0] - rank
    xtx_inv = np.linalg.pinv(x.T @ x)
    se = np.sqrt(np.outer(np.diag(xtx_inv), rss / df))
    return {"coef": coef, "se": se, "rss": rss, "df": np.array(df), "resid": resid}


def _bh(p: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    reject, q, _, _ = multipletests(np.nan_to_num(p, nan=1.0), alpha=alpha, method="fdr_bh")
    return reject, q


def site_effect(values: pd.DataFrame, encoded: pd.DataFrame, batch: pd.Series,
                alpha: float = ALPHA) -> pd.DataFrame:
    """Per feature: F-test and Kruskal-Wallis of batch given covariates, BH-adjusted."""
    y = values.to_numpy(dtype=float)
    reduced = ols_many(_design(encoded, None), y)
    full = ols_many(_design(encoded, batch), y)
    k = int(reduced["df"] - full["df"])
    f = ((reduced["rss"] - full["rss"]) / k) / (full["rss"] / full["df"])
    p_f = stats.f.sf(f, k, full["df"])
    log10p_f = stats.f.logsf(f, k, full["df"]) / np.log(10)   # p below 1e-308 too
    groups = [reduced["resid"][(batch == b).to_numpy()] for b in sorted(batch.unique())]
    kw = stats.kruskal(*groups, axis=0)
    sig_f, q_f = _bh(p_f, alpha)
    sig_kw, q_kw = _bh(np.asarray(kw.pvalue), alpha)
    return pd.DataFrame({"F": f, "p_F": p_f, "log10p_F": log10p_f, "q_F": q_f, "significant_F": sig_f,
                         "H": kw.statistic, "p_KW": kw.pvalue, "q_KW": q_kw,
                         "significant_KW": sig_kw}, index=values.columns)


def coefficients(values: pd.DataFrame, encoded: pd.DataFrame, batch: pd.Series | None,
                 alpha: float = ALPHA) -> pd.DataFrame:
    """Covariate coefficients with 95 % CIs and BH-adjusted p-values (per term across features)."""
    fit = ols_many(_design(encoded, batch), values.to_numpy(dtype=float))
    tcrit = stats.t.ppf(0.975, fit["df"])
    rows = []
    for j, term in enumerate(encoded.columns, start=1):
        est, se = fit["coef"][j], fit["se"][j]
        p = 2 * stats.t.sf(np.abs(est / se), fit["df"])
        sig, q = _bh(p, alpha)
        rows.append(pd.DataFrame({"feature": values.columns, "term": term, "estimate": est,
                                  "se": se, "ci_low": est - tcrit * se, "ci_high": est + tcrit * se,
                                  "p": p, "q": q, "significant": sig}))
    if not rows:   # a model without covariates: no biology to follow through the harmonization
        return pd.DataFrame(columns=["feature", "term", "estimate", "se", "ci_low", "ci_high", "p", "q",
                                     "significant"]).astype({"significant": bool})
    return pd.concat(rows, ignore_index=True)


def survival(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Per term: how many significant effects keep their sign and stay inside their CI."""
    m = before.merge(after, on=["feature", "term"], suffixes=("_before", "_after"))
    m = m[m["significant_before"]]
    m["same_sign"] = np.sign(m["estimate_before"]) == np.sign(m["estimate_after"])
    m["within_ci"] = (m["estimate_after"] >= m["ci_low_before"]) & \
        (m["estimate_after"] <= m["ci_high_before"])
    g = m.groupby("term", sort=False)
    out = pd.DataFrame({"significant_before": g.size(), "same_sign": g["same_sign"].sum(),
                        "within_ci": g["within_ci"].sum(),
                        "still_significant": g["significant_after"].sum()})
    out["share_within_ci"] = out["within_ci"] / out["significant_before"]
    out["share_same_sign"] = out["same_sign"] / out["significant_before"]
    return out.reindex(before["term"].unique()).fillna(0)


def pca(values: pd.DataFrame, batch: pd.Series, n_points: int = MAX_POINTS,
        seed: int = 0) -> dict[str, Any]:
    """First two principal components of the z-scored features, and batch's share of them."""
    z = values.to_numpy(dtype=float)
    z = (z - z.mean(axis=0)) / z.std(axis=0)
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    scores = u[:, :2] * s[:2]
    explained = (s**2 / np.sum(s**2))[:2]
    onehot = pd.get_dummies(batch.to_numpy()).to_numpy(dtype=float)
    fitted = onehot @ np.linalg.lstsq(onehot, scores, rcond=None)[0]
    r2 = 1 - np.sum((scores - fitted) ** 2, axis=0) / np.sum((scores - scores.mean(0)) ** 2, axis=0)
    keep = np.sort(np.random.default_rng(seed).permutation(len(z))[:n_points])
    return {"explained": explained.round(4).tolist(), "batch_r2": r2.round(4).tolist(),
            "pc1": scores[keep, 0].round(4).tolist(), "pc2": scores[keep, 1].round(4).tolist(),
            "batch": batch.to_numpy(dtype=str)[keep].tolist()}


def box_stats(values: pd.Series, batch: pd.Series) -> list[dict[str, Any]]:
    """Per-batch boxplot statistics (matplotlib ``bxp`` format, Tukey whiskers, no fliers)."""
    out = []
    for b, v in values.groupby(batch.to_numpy()):
        v = v.dropna()   # one missing value used to blank the batch's whole box
        if v.empty:
            continue
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        iqr = q3 - q1
        inside = v[(v >= q1 - 1.5 * iqr) & (v <= q3 + 1.5 * iqr)]
        out.append({"label": str(b), "med": float(med), "q1": float(q1), "q3": float(q3),
                    "whislo": float(inside.min()), "whishi": float(inside.max()), "n": int(len(v))})
    return out


def site_table(covariates: pd.DataFrame, batch: pd.Series, kinds: dict[str, str]) -> list[dict]:
    """N per batch and each covariate's distribution there (mean, sd, range or level counts);
    numeric covariates also carry boxplot statistics under ``<name>:box``."""
    rows = []
    for b, idx in covariates.groupby(batch.to_numpy()).groups.items():
        part = covariates.loc[idx]
        row: dict[str, Any] = {"batch": str(b), "n": int(len(part))}
        for name, kind in kinds.items():
            col = part[name]
            if kind == "numeric":
                v = pd.to_numeric(col, errors="coerce")
                row[name] = {"mean": round(float(v.mean()), 3), "sd": round(float(v.std()), 3),
                             "min": float(v.min()), "max": float(v.max())}
                row[f"{name}:box"] = box_stats(v, pd.Series(str(b), index=v.index))[0]
            else:
                row[name] = {str(k): int(n) for k, n in col.dropna().map(level_of).value_counts().sort_index().items()}
        rows.append(row)
    return rows


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()}
            for r in df.reset_index().to_dict(orient="records")]


def diagnose(raw: pd.DataFrame, harmonized: pd.DataFrame, encoded: pd.DataFrame,
             batch: pd.Series, adjust_for: pd.DataFrame | None = None,
             main_features: list[str] | None = None, alpha: float = ALPHA) -> dict[str, Any]:
    """Every before/after figure of the report, as JSON-able data.

    ``adjust_for`` is the covariate design of the site-effect tests when it
    differs from ``encoded`` (a ComBat-GAM model's spline basis), so the test
    asks about site given the same covariate model ComBat used.
    """
    adjust = encoded if adjust_for is None else adjust_for
    before = site_effect(raw, adjust, batch, alpha)
    after = site_effect(harmonized, adjust, batch, alpha)
    coef_before = coefficients(raw, encoded, batch, alpha)
    coef_after = coefficients(harmonized, encoded, None, alpha)
    surv = survival(coef_before, coef_after)
    main = main_features or before["F"].sort_values(ascending=False).index[:MAIN_FEATURES].tolist()
    per_feature = before.add_suffix("_before").join(after.add_suffix("_after"))
    per_feature.index.name = "feature"
    return {
        "alpha": alpha,
        "site_effect": {
            "n_features": int(len(before)),
            "before": _share(before), "after": _share(after),
            "per_feature": _records(per_feature.round(6)),
        },
        "biology": {
            "survival": _records(surv.rename_axis("term").round(4)),
            "before": _records(coef_before.round(6)), "after": _records(coef_after.round(6)),
        },
        "pca": {"before": pca(raw, batch), "after": pca(harmonized, batch)},
        "boxplots": {f: {"before": box_stats(raw[f], batch), "after": box_stats(harmonized[f], batch)}
                     for f in main},
    }


def _share(table: pd.DataFrame) -> dict[str, Any]:
    n = len(table)
    return {"significant_F": int(table["significant_F"].sum()),
            "share_F": round(float(table["significant_F"].mean()), 4) if n else 0.0,
            "significant_KW": int(table["significant_KW"].sum()),
            "share_KW": round(float(table["significant_KW"].mean()), 4) if n else 0.0}
