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

import warnings
from typing import Any

import numpy as np
import pandas as pd

from data_contracts.harmonization_settings import HarmonizationSettings
from harmonization import available
from harmonization.errors import Finding, NoRowsToHarmonize, raise_if_refused
from harmonization.inputs import CovariateEncoding, HarmonizationData, infer_encoding, level_of

WARN_ASSOCIATION = 0.5
POOLED = "pooled"


def rows_text(labels: pd.Series, mask: np.ndarray, limit: int = 5) -> str:
    """The first ``limit`` labels of the rows in ``mask`` (by subject where the table names one)."""
    return _rows(labels, mask, limit)


def _rows(labels: pd.Series, mask: np.ndarray, limit: int = 5) -> str:
    hit = labels[np.asarray(mask, dtype=bool)].astype(str).tolist()
    more = f" and {len(hit) - limit} more" if len(hit) > limit else ""
    return ", ".join(hit[:limit]) + more


def check_not_empty(data: HarmonizationData, settings: HarmonizationSettings) -> list[Finding]:
    """No row or no feature column: nothing for any other check (or ComBat) to look at."""
    where = data.source or "the input"
    out = []
    if data.n == 0:
        out.append(Finding("refusal", "no_rows",
                           f"{where}: no rows to fit; ComBat needs scans of at least two "
                           f"sites, {settings.min_site_n} or more each",
                           {"rows": 0, "source": where}))
    if data.features.shape[1] == 0:
        out.append(Finding("refusal", "no_features", f"{where}: no feature column to harmonize",
                           {"source": where}))
    return out


def check_features(features: pd.DataFrame, labels: pd.Series,
                   values: np.ndarray | None = None, allow_missing: bool = False) -> list[Finding]:
    """Missing (NaN, unless ``allow_missing``: available-case ComBat) or infinite values, and
    features with one value only (``values``: the features as a float array, when the caller has
    it already)."""
    out = []
    values = features.to_numpy(dtype=float) if values is None else values
    finite = np.isfinite(values)
    if not values.size:
        return out
    usable = finite | np.isnan(values) if allow_missing else finite
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # a feature missing in every row: reported below
        spread = (np.nanmax(values, axis=0) - np.nanmin(values, axis=0)) if allow_missing \
            else values.max(axis=0) - values.min(axis=0)
    for j in np.nonzero(~usable.all(axis=0))[0]:
        bad = ~usable[:, j]
        what = "infinite" if allow_missing else "missing or infinite"
        out.append(Finding("refusal", "nan_feature",
                           f"feature {features.columns[j]!r} has {int(bad.sum())} {what} "
                           f"value(s) ({_rows(labels, bad)}); fill or drop them, or "
                           "exclude the feature", {"feature": str(features.columns[j]),
                                                   "rows": int(bad.sum())}))
    if allow_missing:
        for j in np.nonzero(~finite.any(axis=0) & usable.all(axis=0))[0]:
            out.append(Finding("refusal", "empty_feature", f"feature {features.columns[j]!r} has no value in any "
                               "row: exclude it", {"feature": str(features.columns[j])}))
    for j in np.nonzero(usable.all(axis=0) & (np.asarray(spread) == 0))[0]:
        name, value = features.columns[j], float(np.nanmin(values[:, j]))
        out.append(Finding("refusal", "constant_feature",
                           f"feature {name!r} is constant ({value:g} in every row): there is no "
                           "site effect to remove; exclude it (--exclude)",
                           {"feature": str(name), "value": value}))
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
        elif len(covariates) and covariates[name].nunique() < 2:
            out.append(Finding("refusal", "constant_covariate",
                               f"covariate {name!r} has a single value "
                               f"({covariates[name].iloc[0]!r}): drop it from the covariates",
                               {"covariate": name}))
    return out


def resolve_small_batches(batch: pd.Series, min_n: int, policy: str,
                          codes: "BatchCodes | None" = None
                          ) -> tuple[pd.Series, dict[str, str], list[Finding]]:
    """Refuse, or pool into one batch, every batch with fewer than ``min_n`` rows.

    Returns the batch label each row is fitted with, the map from input batch
    to model batch, and the findings.
    """
    codes = BatchCodes(batch) if codes is None else codes
    mapping = {str(b): str(b) for b in codes.labels}
    if (codes.counts >= min_n).all():
        return batch, mapping, []
    counts = pd.Series(codes.counts, index=codes.labels)
    small = counts[counts < min_n]
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


class BatchCodes:
    """Each row's batch as a code into the sorted batch labels, computed once for every check."""

    def __init__(self, batch: pd.Series):
        codes, labels = pd.factorize(batch.astype(str), sort=True)
        self.codes = codes
        self.labels = np.asarray(labels)
        self.counts = np.bincount(codes, minlength=len(labels))


def _contingency(values: pd.Series, batch: pd.Series | BatchCodes
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch x level counts, with the batch and level labels."""
    b = batch if isinstance(batch, BatchCodes) else BatchCodes(batch)
    v_codes, v_labels = pd.factorize(values, sort=True)
    return _table(b, v_codes, len(v_labels)), b.labels, np.asarray(v_labels)


def _table(b: BatchCodes, v_codes: np.ndarray, n_levels: int) -> np.ndarray:
    counts = np.bincount(b.codes * n_levels + v_codes, minlength=len(b.labels) * n_levels)
    return counts.reshape(len(b.labels), n_levels)


def association(values: pd.Series, batch: pd.Series | BatchCodes, categorical: bool) -> float:
    """Cramér's V (categorical) or the correlation ratio eta (numeric) with batch."""
    b = batch if isinstance(batch, BatchCodes) else BatchCodes(batch)
    if categorical:
        table, _, _ = _contingency(values.map(str), b)
        return _cramers_v(table)
    return _eta(pd.to_numeric(values, errors="coerce").to_numpy(dtype=float), b)


def _cramers_v(table: np.ndarray) -> float:
    if min(table.shape) < 2:
        return 0.0
    # Pearson's chi-square of independence (scipy's chi2_contingency without correction);
    # every row and column of the table has a count, so no expected count is 0
    n = table.sum()
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / n
    chi2 = float(((table - expected) ** 2 / expected).sum())
    return float(np.sqrt(chi2 / (n * (min(table.shape) - 1))))


def _eta(x: np.ndarray, b: BatchCodes) -> float:
    total = float(((x - x.mean()) ** 2).sum())
    if total == 0:
        return 0.0
    means = np.bincount(b.codes, weights=x, minlength=len(b.labels)) / np.maximum(b.counts, 1)
    return float(np.sqrt(np.sum(b.counts * (means - x.mean()) ** 2) / total))


def check_confounding(covariates: pd.DataFrame, encoding: CovariateEncoding,
                      batch: pd.Series | BatchCodes,
                      max_confounding: float, level_names: dict[str, dict[str, str]] | None = None
                      ) -> tuple[list[Finding], dict[str, float]]:
    """Association of each covariate with batch, and batches where a covariate does not vary
    (its level named by ``level_names``, the settings' ``covariate_levels``, when it has one)."""
    b = batch if isinstance(batch, BatchCodes) else BatchCodes(batch)
    out, table = [], {}
    for spec in encoding.covariates:
        col = covariates[spec.name]
        # one factorization of the column serves both the association and the per-site levels
        if col.dtype.kind in "iuf":  # plain numbers: numpy sorts them faster
            levels, v_codes = np.unique(col.to_numpy(), return_inverse=True)  # sorted, as below
        else:
            v_codes, levels = pd.factorize(col, sort=True)
            levels = np.asarray(levels)
        counts = _table(b, v_codes, len(levels))
        if spec.kind == "categorical":
            # Cramér's V counts levels by their text, as association() does
            s_codes, s_levels = pd.factorize(np.array([str(v) for v in levels], dtype=object))
            merged = np.zeros((counts.shape[0], len(s_levels)), dtype=counts.dtype)
            np.add.at(merged.T, s_codes, counts.T)
            value = _cramers_v(merged)
        else:
            value = _eta(col.to_numpy(dtype=float) if pd.api.types.is_numeric_dtype(col)
                         else pd.to_numeric(col, errors="coerce").to_numpy(dtype=float), b)
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
        for i in np.nonzero(((counts > 0).sum(axis=1) == 1) & (counts.sum(axis=1) > 1))[0]:
            level = levels[np.argmax(counts[i])]
            level = (level_names or {}).get(spec.name, {}).get(level_of(level), level)
            out.append(Finding("warning", "site_single_level",
                               f"site {b.labels[i]!r}: all {int(counts[i].sum())} scans have "
                               f"{spec.name}={level!r}; that site's effect and {spec.name} "
                               "are told apart only through the other sites",
                               {"batch": str(b.labels[i]), "covariate": spec.name}))
    return out, table


def check_within_batch_variance(features: pd.DataFrame, batch: pd.Series | BatchCodes,
                                values: np.ndarray | None = None) -> list[Finding]:
    """A feature constant inside one batch makes ComBat's scale estimate 0 (then NaN)."""
    b = batch if isinstance(batch, BatchCodes) else BatchCodes(batch)
    order = np.argsort(b.codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(b.counts)])
    values = features.to_numpy(dtype=float) if values is None else values
    # max - min is exactly 0 for a constant; a variance may come out as 1e-13. Rows are
    # gathered batch by batch along whichever axis keeps a feature's values contiguous.
    if np.isnan(values).any():   # available-case: the values a batch has (fewer than two: available.check)
        by_row = values[order]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            spread = [np.where((~np.isnan(by_row[lo:hi])).sum(axis=0) >= 2,
                               np.nanmax(by_row[lo:hi], axis=0) - np.nanmin(by_row[lo:hi], axis=0), np.nan)
                      for lo, hi in zip(bounds[:-1], bounds[1:])]
    elif values.flags.f_contiguous and not values.flags.c_contiguous:
        by_feature = values.T[:, order]
        spread = [by_feature[:, lo:hi].max(axis=1) - by_feature[:, lo:hi].min(axis=1)
                  for lo, hi in zip(bounds[:-1], bounds[1:])]
    else:
        by_row = values[order]
        spread = [by_row[lo:hi].max(axis=0) - by_row[lo:hi].min(axis=0)
                  for lo, hi in zip(bounds[:-1], bounds[1:])]
    out = []
    flat_in = np.array(spread) == 0
    for i in np.nonzero(flat_in.any(axis=1))[0]:
        label = b.labels[i]
        flat = [str(features.columns[j]) for j in np.nonzero(flat_in[i])[0]]
        out.append(Finding("refusal", "constant_in_site",
                           f"site {label!r}: feature(s) {flat[:5]}{' ...' if len(flat) > 5 else ''} "
                           "do not vary within the site; ComBat cannot estimate its scale",
                           {"batch": str(label), "features": flat}))
    return out


def check_design_rank(design: np.ndarray, columns: list[str], n_batch: int) -> list[Finding]:
    """The batch indicators plus covariates must be linearly independent.

    Judged on the eigenvalues of the column-scaled Gram matrix (p x p, cheap for
    any number of rows); a design this close to singular would make ComBat's
    estimates meaningless even if a solver returned numbers.
    """
    if _rank(design) == design.shape[1]:
        return []
    full = _rank(design)
    culprits = [c for j, c in enumerate(columns) if j >= n_batch
                and _rank(np.delete(design, j, axis=1)) == full]
    return [Finding("refusal", "collinear_design",
                    f"covariate column(s) {culprits} are determined by site and the other "
                    "covariates; ComBat cannot separate them from the site effect",
                    {"columns": culprits})]


def _rank(design: np.ndarray, tol: float = 1e-10) -> int:
    gram = design.T @ design
    scale = np.sqrt(np.clip(np.diag(gram), 1e-300, None))
    eig = np.linalg.eigvalsh(gram / np.outer(scale, scale))
    return int(np.sum(eig > tol * eig.max()))


def check_fit_input(data: HarmonizationData, settings: HarmonizationSettings
                    ) -> tuple[CovariateEncoding, pd.DataFrame, pd.Series, dict[str, str],
                               list[Finding], dict[str, float]]:
    """Run every check of a fit; raise :class:`HarmonizationRefused` listing all refusals.

    Values and batch sizes first, then (on complete values only, where they
    mean something) confounding, within-site variation and the design. Returns
    the covariate encoding, the encoded covariates, the batch per row after
    pooling, the input-to-model batch map, the findings and each covariate's
    association with batch.
    """
    empty = check_not_empty(data, settings)
    if empty:  # every check below (and ComBat) would index a first row that is not there
        raise NoRowsToHarmonize(empty)
    labels = data.row_labels
    values = data.features.to_numpy(dtype=float)
    available_case = settings.missing == "available_case"
    findings = list(data.notes) + check_features(data.features, labels, values, available_case)
    findings += check_covariates(data.covariates, settings.covariates, labels)
    if data.batch.isna().any():
        findings.append(Finding("refusal", "missing_batch", "the batch (site) is empty in "
                                f"{int(data.batch.isna().sum())} row(s)", {}))
        raise_if_refused(findings)
    codes = BatchCodes(data.batch)
    batch, mapping, small = resolve_small_batches(data.batch, settings.min_site_n,
                                                  settings.small_site, codes)
    findings += small
    raise_if_refused(findings)
    # a covariate whose levels are named is categorical (a 1/2/3-coded scanner is not a number)
    encoding = infer_encoding(data.covariates, settings.covariates,
                              [*settings.categorical_covariates, *settings.covariate_levels], settings.smooth_terms)
    not_smooth = [c.name for c in encoding.covariates if c.name in settings.smooth_terms and not c.smooth]
    if not_smooth:   # a text covariate asked to be smooth was dropped from the smooth terms, silently
        findings.append(Finding("refusal", "smooth_categorical",
                                f"covariate(s) {not_smooth} are categorical (text or boolean values, e.g. "
                                f"{data.covariates[not_smooth[0]].dropna().iloc[0]!r}): a smooth term needs "
                                "numbers; remove them from the smooth terms", {"covariates": not_smooth}))
        raise_if_refused(findings)
    encoded, _ = encoding.encode(data.covariates)
    if batch is not data.batch:  # small batches were pooled
        codes = BatchCodes(batch)
    if len(codes.labels) < 2:
        findings.append(Finding("refusal", "single_batch", "all rows are in one batch "
                                f"({str(codes.labels[0])!r}): there is no site effect to estimate; "
                                "ComBat needs scans of at least two sites",
                                {"batch": str(codes.labels[0])}))
    conf, assoc = check_confounding(data.covariates, encoding, codes, settings.max_confounding,
                                    settings.covariate_levels)
    findings += conf + check_within_batch_variance(data.features, codes, values)
    design = np.zeros((len(codes.codes), len(codes.labels) + encoded.shape[1]))
    design[np.arange(len(codes.codes)), codes.codes] = 1.0
    design[:, len(codes.labels):] = encoded.to_numpy(dtype=float)
    findings += check_design_rank(design, [*codes.labels, *encoded.columns], len(codes.labels))
    if available_case:
        names, batches = [str(c) for c in data.features.columns], np.asarray(codes.labels)
        findings += available.check(values, codes.codes, batches, names, design, settings.eb, settings.parametric,
                                    bool(encoding.smooth_terms), settings.repeated == "longitudinal", settings.covbat)
        findings += available.missing_finding(values, codes.codes, batches, names)
    findings += check_reference_batch(settings.ref_batch, data.batch, mapping)
    findings += check_limits(data.covariates, settings.covariates, settings.covariate_limits, labels)
    findings += check_repeated(data.subjects, settings.repeated)
    findings += check_overlap(covariate_balance(data.covariates, encoding, batch))
    findings += check_smooth_bounds(data.covariates, settings.smooth_term_bounds, labels)
    if not settings.covariates:
        findings.append(Finding("warning", "no_covariates",
                                "no covariates: every difference between sites is removed as site effect, "
                                "biological ones (age, sex, diagnosis) included", {}))
    raise_if_refused(findings)
    return encoding, encoded, batch, mapping, findings, assoc


def check_reference_batch(ref: str | None, batch: pd.Series, mapping: dict[str, str]) -> list[Finding]:
    """A reference batch must be one of the fit's batches, and a batch of its own (not pooled)."""
    if ref is None:
        return []
    if ref not in mapping:
        return [Finding("refusal", "unknown_reference_batch",
                        f"the reference batch {ref!r} is not in the data (its batches: "
                        f"{', '.join(sorted(map(str, batch.unique())))})", {"ref_batch": ref})]
    if mapping[ref] != ref:
        return [Finding("refusal", "pooled_reference_batch",
                        f"the reference batch {ref!r} is below the minimum size and was pooled "
                        f"into {mapping[ref]!r}: a reference must be estimated on its own", {"ref_batch": ref})]
    return []


def limits_of(names: list[str], limits: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The limits that apply to these covariates (names matched without regard to case)."""
    lower = {k.lower(): v for k, v in limits.items()}
    return {n: tuple(lower[n.lower()]) for n in names if n.lower() in lower}


def outside_limits(covariates: pd.DataFrame, names: list[str],
                   limits: dict[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    """Covariate -> the rows whose value is a number outside what the covariate can be."""
    out = {}
    for name, (lo, hi) in limits_of(names, limits).items():
        if name in covariates.columns:
            v = pd.to_numeric(covariates[name], errors="coerce").to_numpy(dtype=float)
            bad = np.isfinite(v) & ((v < lo) | (v > hi))
            if bad.any():
                out[name] = bad
    return out


def check_limits(covariates: pd.DataFrame, names: list[str], limits: dict[str, tuple[float, float]],
                 labels: pd.Series) -> list[Finding]:
    """A covariate value no subject can have (an age of -3 or 150): a data error, refused by row."""
    lims = limits_of(names, limits)
    return [Finding("refusal", "impossible_covariate",
                    f"{name} is outside {lims[name][0]:g}..{lims[name][1]:g} in {int(bad.sum())} row(s) "
                    f"({_rows(labels, bad)}): correct the value or drop the row", {"covariate": name,
                                                                                "rows": int(bad.sum())})
            for name, bad in outside_limits(covariates, names, limits).items()]


def check_smooth_bounds(covariates: pd.DataFrame, bounds: dict[str, tuple[float, float]],
                        labels: pd.Series) -> list[Finding]:
    """Rows outside the spline range the settings give cannot be fitted by it."""
    out = []
    for term, (lo, hi) in bounds.items():
        v = pd.to_numeric(covariates[term], errors="coerce").to_numpy(dtype=float)
        bad = np.isfinite(v) & ((v < lo) | (v > hi))
        if bad.any():
            out.append(Finding("refusal", "outside_smooth_bounds",
                               f"{term} lies outside the smooth-term bounds {lo:g}..{hi:g} in {int(bad.sum())} "
                               f"row(s) ({_rows(labels, bad)}): widen the bounds", {"covariate": term}))
    return out


def covariate_ranges(covariates: pd.DataFrame, encoding, batch: pd.Series) -> dict[str, Any]:
    """Per numeric covariate: the fitted range overall and per batch (stored with the model)."""
    out: dict[str, Any] = {}
    numeric = [spec.name for spec in encoding.covariates if spec.kind == "numeric"]
    if not numeric:
        return out
    labels, first, order = _batch_blocks(batch)
    values = _numeric(covariates, numeric)[order]
    lows, highs = np.fmin.reduceat(values, first, axis=0), np.fmax.reduceat(values, first, axis=0)
    for j, name in enumerate(numeric):
        out[name] = {"min": float(np.nanmin(values[:, j])), "max": float(np.nanmax(values[:, j])),
                     "batches": {b: [float(lo), float(hi)] for b, lo, hi in zip(labels, lows[:, j], highs[:, j])}}
    return out


def _batch_blocks(batch: pd.Series) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Sorted batch labels, where each one's rows start once sorted by batch, and that order."""
    codes, labels = pd.factorize(batch.astype(str), sort=True)
    order = np.argsort(codes, kind="stable")
    first = np.r_[0, np.cumsum(np.bincount(codes, minlength=len(labels)))[:-1]]
    return [str(b) for b in labels], first, order


def _numeric(covariates: pd.DataFrame, names: list[str]) -> np.ndarray:
    return np.column_stack([pd.to_numeric(covariates[n], errors="coerce").to_numpy(dtype=float) for n in names])


def check_repeated(subjects: pd.Series | None, repeated: str) -> list[Finding]:
    """Subjects scanned more than once: ComBat's scans are independent, a subject's are not."""
    if subjects is None:
        return [] if repeated != "longitudinal" else [Finding(
            "refusal", "no_subjects", "longitudinal ComBat needs to know whose scan each row is: name the subject "
            "column (--subject COL)", {})]
    counts = subjects.value_counts()
    many = counts[counts > 1]
    if many.empty:
        return []
    example = ", ".join(f"{s} ({n} scans)" for s, n in many.head(3).items())
    where = {"subjects": int(len(many)), "scans": int(many.sum())}
    if repeated == "longitudinal":
        return [Finding("info", "longitudinal",
                        f"{len(many)} subject(s) have more than one scan ({int(many.sum())} scans): fitted with a "
                        "random intercept per subject (longitudinal ComBat, Beer et al. 2020)", where)]
    if repeated == "independent":
        return [Finding("warning", "repeated_subjects",
                        f"{len(many)} subject(s) have more than one scan ({int(many.sum())} scans, e.g. {example}), "
                        "fitted as independent scans as asked: their within-subject correlation is ignored "
                        "(Beer et al. 2020)", where)]
    return [Finding("refusal", "repeated_subjects",
                    f"{len(many)} subject(s) have more than one scan ({int(many.sum())} scans, e.g. {example}): "
                    "ComBat takes every scan as independent, and a subject's scans are not (Beer et al. 2020). "
                    "Fit on one scan per subject (their baseline) and apply the model to the others, or ask for "
                    "independent scans (--repeated independent)", where)]


def covariate_balance(covariates: pd.DataFrame, encoding: CovariateEncoding, batch: pd.Series) -> list[dict[str, Any]]:
    """Per batch and numeric covariate: SMD against the other batches and the share of its rows
    inside the other batches' range.

    From per-batch sums, not a loop over batches with ``nanvar`` (8 ms on ABIDE's 20 sites, a
    third of bare neuroCombat's whole fit; this takes under 1 ms and agrees to 1e-12)."""
    numeric = [spec.name for spec in encoding.covariates if spec.kind == "numeric"]
    if not numeric:
        return []
    labels, first, order = _batch_blocks(batch)
    v = _numeric(covariates, numeric)[order]
    size = np.diff(np.r_[first, len(v)])
    code = np.repeat(np.arange(len(labels)), size)
    ok = ~np.isnan(v)
    shift = np.nanmean(v, axis=0)            # sums of squares about the mean: no cancellation
    c = np.where(ok, v - shift, 0.0)
    n = np.add.reduceat(ok.astype(float), first, axis=0)
    s1, s2 = np.add.reduceat(c, first, axis=0), np.add.reduceat(c * c, first, axis=0)
    rn, r1, r2 = n.sum(0) - n, s1.sum(0) - s1, s2.sum(0) - s2
    with np.errstate(invalid="ignore", divide="ignore"):
        var_mine = (s2 - s1 ** 2 / n) / (n - 1)
        var_rest = (r2 - r1 ** 2 / rn) / (rn - 1)
        pooled = np.sqrt((var_mine + var_rest) / 2)
        smd = np.where(pooled > 0, (s1 / n - r1 / rn) / pooled, np.nan)
    smd[size < 2] = np.nan
    lows, highs = np.fmin.reduceat(v, first, axis=0), np.fmax.reduceat(v, first, axis=0)
    out = []
    for j, name in enumerate(numeric):
        for b, label in enumerate(labels):
            others = np.arange(len(labels)) != b
            rows = code == b
            if others.any():
                mine = v[rows, j]
                inside = float(np.mean((mine >= np.nanmin(lows[others, j])) & (mine <= np.nanmax(highs[others, j]))))
            else:
                inside = np.nan
            out.append({"covariate": name, "batch": label, "smd": round(float(smd[b, j]), 3),
                        "share_in_others_range": round(inside, 3)})
    return out


MIN_OVERLAP = 0.5   # share of a batch's rows inside the other batches' range of a covariate


def check_overlap(balance: list[dict[str, Any]]) -> list[Finding]:
    """A batch whose covariate values mostly lie where no other batch has any: its site effect and
    that covariate's effect are told apart by extrapolation only (eta misses it when means agree)."""
    return [Finding("warning", "covariate_overlap",
                    f"batch {r['batch']!r}: only {100 * r['share_in_others_range']:.0f} % of its rows have "
                    f"{r['covariate']} inside the other batches' range (standardized mean difference "
                    f"{r['smd']:+.2f}): its site effect rests on extrapolating the {r['covariate']} effect", dict(r))
            for r in balance if r["share_in_others_range"] < MIN_OVERLAP]


OUTLIER_Z = 8.0


def outlier_rows(values: np.ndarray, design: np.ndarray, codes: np.ndarray,
                 coef: np.ndarray | None = None) -> np.ndarray:
    """Rows with a value more than ``OUTLIER_Z`` robust SDs from their batch's residual median in
    some feature (residuals of the ComBat design, so age, sex and site do not make outliers).
    ``coef``: the design's coefficients when the fit has them (they are the least-squares ones).

    Medians by sorting feature-major blocks of each batch's rows, by hand: ``np.median`` per
    batch took 10 ms on ABIDE (1035 x 121, 20 sites; half of bare neuroCombat's fit), this 3.3 ms,
    with the same rows."""
    if coef is None:
        coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    order = np.argsort(codes, kind="stable")
    resid = np.ascontiguousarray((values - design @ coef)[order].T)   # (features, rows by batch)
    # a batch's MAD floored at a quarter of the whole table's: a feature that is mostly 0 in a site
    # (ABIDE's 5th-Ventricle) has a MAD near 0 there and would flag every row that is not
    floor = 0.25 * 1.4826 * _row_median(np.abs(resid - _row_median(resid)[:, None]))
    bounds = np.r_[0, np.cumsum(np.bincount(codes))]
    z = np.empty_like(resid)
    for start, end in zip(bounds[:-1], bounds[1:]):
        dev = np.abs(resid[:, start:end] - _row_median(resid[:, start:end])[:, None])
        mad = np.maximum(1.4826 * _row_median(dev), floor)
        z[:, start:end] = dev / np.where(mad > 0, mad, np.inf)[:, None]
    out = np.empty(len(codes), dtype=bool)
    with np.errstate(invalid="ignore"):
        out[order] = (z > OUTLIER_Z).any(axis=0)     # a missing value (NaN) is never an outlier
    return out


def _row_median(a: np.ndarray) -> np.ndarray:
    """Each row's median (``np.median(a, axis=1)``'s values) from one sort; with missing values,
    the median of the values a row has (available-case fits)."""
    if np.isnan(a).any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # a row with no value: NaN, never an outlier
            return np.nanmedian(a, axis=1)
    ordered = np.sort(a, axis=1)
    n = a.shape[1]
    return (ordered[:, (n - 1) // 2] + ordered[:, n // 2]) / 2
