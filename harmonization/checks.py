"""The honest refusals: every reason ComBat's output would not mean what it says.

Each function looks at one thing and returns :class:`~harmonization.errors.Finding`
objects naming the feature, covariate, site or row concerned. ComBat itself
(neuroHarmonize) would crash with a linear-algebra error, or return NaN or
silently distorted values, on every one of these inputs.

Association of a covariate with batch (the confounding check)
    categorical: Cramér's V = sqrt(chi2 / (n (min(r, c) - 1))) of the batch x
    level table; numeric: the correlation ratio eta = sqrt(SS_between / SS_total)
    of the covariate across batches. Both run from 0 (independent) to 1
    (the batch determines the covariate). Above ``max_confounding`` the fit is
    refused; above :data:`WARN_ASSOCIATION` it is reported as a warning.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency

from harmonization.errors import Finding
from harmonization.inputs import CovariateEncoding

WARN_ASSOCIATION = 0.5
POOLED = "pooled"


def _rows(labels: pd.Series, mask: np.ndarray, limit: int = 5) -> str:
    hit = labels[np.asarray(mask, dtype=bool)].astype(str).tolist()
    more = f" and {len(hit) - limit} more" if len(hit) > limit else ""
    return ", ".join(hit[:limit]) + more


def check_features(features: pd.DataFrame, labels: pd.Series) -> list[Finding]:
    """NaN or infinite values, and features with one value only."""
    out = []
    values = features.to_numpy(dtype=float)
    for j, name in enumerate(features.columns):
        col = values[:, j]
        bad = ~np.isfinite(col)
        if bad.any():
            out.append(Finding("refusal", "nan_feature",
                               f"feature {name!r} has {int(bad.sum())} missing or infinite value(s) "
                               f"({_rows(labels, bad)}); fill or drop them, or exclude the feature",
                               {"feature": str(name), "rows": int(bad.sum())}))
        elif np.ptp(col) == 0:
            out.append(Finding("refusal", "constant_feature",
                               f"feature {name!r} is constant ({col[0]:g} in every row): there is no "
                               "site effect to remove; exclude it (--exclude)",
                               {"feature": str(name), "value": float(col[0])}))
    return out


def check_covariates(covariates: pd.DataFrame, names: list[str],
                     labels: pd.Series) -> list[Finding]:
    """Every covariate present, with a value in every row, and not constant."""
    out = []
    for name in names:
        if name not in covariates.columns:
            out.append(Finding("refusal", "missing_covariate",
                               f"covariate {name!r} is not in the data (columns: "
                               f"{', '.join(map(str, covariates.columns)) or 'none'})",
                               {"covariate": name}))
            continue
        miss = covariates[name].isna().to_numpy()
        if miss.any():
            out.append(Finding("refusal", "missing_covariate_value",
                               f"covariate {name!r} is empty in {int(miss.sum())} row(s) "
                               f"({_rows(labels, miss)}); ComBat needs it in every row",
                               {"covariate": name, "rows": int(miss.sum())}))
        elif covariates[name].nunique() < 2:
            out.append(Finding("refusal", "constant_covariate",
                               f"covariate {name!r} has a single value "
                               f"({covariates[name].iloc[0]!r}): drop it from the covariates",
                               {"covariate": name}))
    return out


def resolve_small_batches(batch: pd.Series, min_n: int,
                          policy: str) -> tuple[pd.Series, dict[str, str], list[Finding]]:
    """Refuse, or pool into one batch, every batch with fewer than ``min_n`` rows.

    Returns the batch label each row is fitted with, the map from input batch
    to model batch, and the findings.
    """
    counts = batch.value_counts()
    small = counts[counts < min_n].sort_index()
    mapping = {str(b): str(b) for b in counts.index}
    if small.empty:
        return batch, mapping, []
    listed = ", ".join(f"{b} (N={n})" for b, n in small.items())
    if policy == "refuse":
        return batch, mapping, [Finding(
            "refusal", "small_site",
            f"batch(es) below the minimum of {min_n}: {listed}; ComBat cannot estimate a site "
            "effect from so few scans. Remove them, lower --min-site-n, or set small_site: pool",
            {"batches": {str(b): int(n) for b, n in small.items()}, "min_site_n": min_n})]
    for b in small.index:
        mapping[str(b)] = POOLED
    pooled = batch.map(mapping)
    findings = [Finding("warning", "pooled_sites",
                        f"batch(es) below the minimum of {min_n} pooled into one batch "
                        f"{POOLED!r}: {listed}; they share one site effect",
                        {"batches": {str(b): int(n) for b, n in small.items()}})]
    n_pool = int(small.sum())
    if n_pool < min_n:
        findings.append(Finding("refusal", "small_site",
                                f"the pooled batch has only {n_pool} scans (< {min_n}): {listed}",
                                {"batches": {POOLED: n_pool}, "min_site_n": min_n}))
    return pooled, mapping, findings


def association(values: pd.Series, batch: pd.Series, categorical: bool) -> float:
    """Cramér's V (categorical) or the correlation ratio eta (numeric) with batch."""
    if categorical:
        table = pd.crosstab(batch, values.map(str))
        if min(table.shape) < 2:
            return 0.0
        chi2 = chi2_contingency(table.to_numpy(), correction=False)[0]
        return float(np.sqrt(chi2 / (table.to_numpy().sum() * (min(table.shape) - 1))))
    x = pd.to_numeric(values, errors="coerce").astype(float)
    total = float(((x - x.mean()) ** 2).sum())
    if total == 0:
        return 0.0
    grouped = x.groupby(batch.to_numpy())
    between = float((grouped.count() * (grouped.mean() - x.mean()) ** 2).sum())
    return float(np.sqrt(between / total))


def check_confounding(covariates: pd.DataFrame, encoding: CovariateEncoding, batch: pd.Series,
                      max_confounding: float) -> tuple[list[Finding], dict[str, float]]:
    """Association of each covariate with batch, and batches where a covariate does not vary."""
    out, table = [], {}
    for spec in encoding.covariates:
        col = covariates[spec.name]
        value = association(col, batch, spec.kind == "categorical")
        table[spec.name] = round(value, 4)
        measure = "Cramér's V" if spec.kind == "categorical" else "eta"
        where = {"covariate": spec.name, measure: value}
        if value > max_confounding:
            out.append(Finding("refusal", "confounded_covariate",
                               f"covariate {spec.name!r} is confounded with site ({measure} = "
                               f"{value:.2f} > {max_confounding}): ComBat would remove biology "
                               "with the site effect", where))
        elif value > WARN_ASSOCIATION:
            out.append(Finding("warning", "associated_covariate",
                               f"covariate {spec.name!r} is strongly associated with site "
                               f"({measure} = {value:.2f}); its effect is estimated mostly "
                               "across sites that overlap", where))
        for b, values in col.groupby(batch.to_numpy()):
            if values.nunique() == 1 and len(values) > 1:
                out.append(Finding("warning", "site_single_level",
                                   f"site {b!r}: all {len(values)} scans have {spec.name}="
                                   f"{values.iloc[0]!r}; that site's effect and {spec.name} "
                                   "are told apart only through the other sites",
                                   {"batch": str(b), "covariate": spec.name}))
    return out, table


def check_within_batch_variance(features: pd.DataFrame, batch: pd.Series) -> list[Finding]:
    """A feature constant inside one batch makes ComBat's scale estimate 0 (then NaN)."""
    sd = features.groupby(batch.to_numpy()).std(ddof=1)
    out = []
    for b, row in sd.iterrows():
        flat = row.index[(row == 0).to_numpy()].tolist()
        if flat:
            out.append(Finding("refusal", "constant_in_site",
                               f"site {b!r}: feature(s) {flat[:5]}{' ...' if len(flat) > 5 else ''} "
                               "do not vary within the site; ComBat cannot estimate its scale",
                               {"batch": str(b), "features": [str(f) for f in flat]}))
    return out


def check_design_rank(design: np.ndarray, columns: list[str], n_batch: int) -> list[Finding]:
    """The batch indicators plus covariates must be linearly independent."""
    if np.linalg.matrix_rank(design) == design.shape[1]:
        return []
    culprits = [c for j, c in enumerate(columns) if j >= n_batch and
                np.linalg.matrix_rank(np.delete(design, j, axis=1)) == np.linalg.matrix_rank(design)]
    return [Finding("refusal", "collinear_design",
                    f"covariate column(s) {culprits} are determined by site and the other "
                    "covariates; ComBat cannot separate them from the site effect",
                    {"columns": culprits})]
