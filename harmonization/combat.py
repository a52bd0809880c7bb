"""ComBat on neuroHarmonize: checked inputs, a model that can be frozen, an apply that decides.

Fit
    neuroHarmonize's ``harmonizationLearn`` (which equals neuroCombat), step for
    step: the design of neuroCombat's ``make_design_matrix`` (every batch's
    indicator, covariates as float32), the coefficients by neuroHarmonize's
    normal equations (linear covariates) or, for smooth covariates
    (ComBat-GAM), by :mod:`harmonization.gam` in place of its per-feature
    statsmodels GAM loop; the location/scale estimates and their priors by
    neuroHarmonize's and neuroCombat's own functions
    (``fitLSModelAndFindPriors``, ``find_parametric_adjustments``). The two
    closed-form steps around them, standardizing and the final adjustment, are
    its formulae over whole arrays instead of its (features x samples) matrices
    of ones and per-batch index lists. The harmonized values equal
    ``harmonizationLearn``'s to ~1e-9 (float rounding); the tests hold them to
    neuroCombat and neuroHarmonize.
Apply
    neuroHarmonize's ``harmonizationApply`` fails unless every training site is
    in the new batch and ``applyModelOne`` loops in Python, so the frozen model
    is applied here in closed form, the formula of ``adjust_data_final``
    (Johnson et al. 2007, eq. 2.4/3.3):

        x* = (x - a - m(c) - gamma*_b) / sqrt(delta*_b) * sqrt(sigma2) + a + m(c)

    with ``a`` the grand mean, ``m(c)`` the covariate part of the fitted mean and
    ``sigma2`` the pooled variance. Rows the model cannot speak for (a site it
    has not seen, a smooth covariate outside the fitted range, an unseen
    category) are not guessed at: they get a reason and no value.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from neuroCombat.neuroCombat import (
    find_non_eb_adjustments,
    find_non_parametric_adjustments,
    find_parametric_adjustments,
    fit_LS_model_and_find_priors,
)

from data_contracts.harmonization_settings import HarmonizationSettings
from harmonization import available, checks, covbat, gam, longitudinal
from harmonization.errors import Finding, HarmonizationRefused, ModelMismatchError
from harmonization.inputs import CovariateEncoding, HarmonizationData
from tasks.lake.versions import software_versions

ARRAYS = ("B_hat", "grand_mean", "var_pooled", "gamma_star", "delta_star", "gamma_hat", "delta_hat")
# Metadata that can differ between two fits of the same values with the same settings
# (when, how long, from which path); kept out of the model id.
VOLATILE = ("created_at", "fit_seconds", "source")
# Below this many bytes of features the input is fingerprinted before the fit, above it
# in a thread while ComBat runs (a thread costs milliseconds to start and hand the GIL to).
PARALLEL_FINGERPRINT_BYTES = 16 << 20


@dataclass(frozen=True)
class Options:
    """The ComBat variant: neuroCombat's ``eb``, ``parametric``, ``mean_only`` and ``ref_batch``
    (as the index of the reference among the sorted batches)."""

    eb: bool = True
    parametric: bool = True
    mean_only: bool = False
    ref: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"eb": self.eb, "parametric": self.parametric, "mean_only": self.mean_only, "ref": self.ref}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Options":
        """From a stored model's metadata (models stored before the options: parametric EB ComBat)."""
        return cls(**d) if d else cls()

    @classmethod
    def of(cls, settings: HarmonizationSettings, labels: np.ndarray) -> "Options":
        ref = None
        if settings.ref_batch is not None:
            ref = int(np.nonzero(labels == settings.ref_batch)[0][0])   # checks.py made sure it is there
        return cls(settings.eb, settings.parametric, settings.mean_only, ref)


@dataclass
class ComBatModel:
    """A fitted ComBat model: neuroHarmonize's estimates plus what they mean.

    Attributes
    ----------
    batches
        Batch labels in the order of the rows of ``gamma_star``/``delta_star``.
    batch_map
        Input batch label -> model batch (identity, or ``pooled`` for small sites).
    B_hat
        (batches + covariate columns [+ spline basis], F) coefficients.
    grand_mean, var_pooled
        (F,) grand mean and pooled variance of each feature.
    gamma_star, delta_star
        (batches, F) empirical-Bayes location and scale per batch.
    spline
        Smooth-term basis (ComBat-GAM) or None.
    alphas
        (F, smooth terms) selected penalty weights (ComBat-GAM) or None.
    """

    batches: list[str]
    batch_sizes: list[int]
    batch_map: dict[str, str]
    features: list[str]
    encoding: CovariateEncoding
    B_hat: np.ndarray
    grand_mean: np.ndarray
    var_pooled: np.ndarray
    gamma_star: np.ndarray
    delta_star: np.ndarray
    gamma_hat: np.ndarray
    delta_hat: np.ndarray
    eb: bool = True
    options: Options = field(default_factory=Options)
    spline: gam.SplineSpec | None = None
    alphas: np.ndarray | None = None
    subjects: list[str] | None = None          # longitudinal ComBat: the subjects fitted, in order
    intercepts: np.ndarray | None = None       # (subjects, F) their random intercepts (BLUPs)
    covbat: covbat.CovBat | None = None        # the covariance step (Chen et al. 2022), when asked
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return ("ComBat-GAM" if self.spline is not None else "ComBat") + (" + CovBat" if self.covbat else "")

    def arrays(self) -> dict[str, np.ndarray]:
        out = {k: np.asarray(getattr(self, k), dtype=float) for k in ARRAYS}
        if self.alphas is not None:
            out["alphas"] = np.asarray(self.alphas, dtype=float)
        if self.intercepts is not None:
            out["intercepts"] = np.asarray(self.intercepts, dtype=float)
        if self.covbat is not None:
            out.update(self.covbat.arrays())
        return out

    @property
    def model_id(self) -> str:
        """``hm-`` + 16 hex of the sha256 of the estimates and the stable metadata."""
        h = hashlib.sha256()
        stable = {k: v for k, v in self.metadata.items() if k not in VOLATILE}
        h.update(json.dumps(stable, sort_keys=True, default=str).encode())
        for name, arr in sorted(self.arrays().items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return "hm-" + h.hexdigest()[:16]

    def to_neuroharmonize(self) -> dict[str, Any]:
        """The model as the dict neuroHarmonize's apply functions take (linear models only)."""
        if self.spline is not None:
            raise NotImplementedError("a ComBat-GAM model keeps its spline as knots, not as "
                                      "the statsmodels object neuroHarmonize needs")
        return {
            "SITE_labels": np.array(self.batches), "B_hat": self.B_hat,
            "stand_mean": self.grand_mean[:, None], "var_pooled": self.var_pooled[:, None],
            "gamma_star": self.gamma_star, "delta_star": self.delta_star, "eb": self.eb,
            "info_dict": {"ref_level": None, "n_batch": len(self.batches)},
            "smooth_model": {"perform_smoothing": False, "smooth_cols": [], "smooth_terms": []},
        }


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes
    ----------
    harmonized
        Harmonized features of the fitted rows (same index and columns as the input).
    batch
        The batch each row was fitted in (after pooling).
    encoded
        Numeric covariate columns as they entered the design.
    association
        Covariate -> association with batch (Cramér's V / eta).
    """

    model: ComBatModel
    harmonized: pd.DataFrame
    batch: pd.Series
    encoded: pd.DataFrame
    findings: list[Finding]
    association: dict[str, float]


def info_dict(codes: np.ndarray, n_batch: int, ref: int | None = None) -> dict[str, Any]:
    """neuroCombat's bookkeeping of which rows belong to which batch.

    ``batch_info`` holds index arrays where neuroHarmonize builds lists of Python
    ints: neuroCombat only indexes with them, and an array is not converted anew
    at every use.
    """
    counts = np.bincount(codes, minlength=n_batch)
    order = np.argsort(codes, kind="stable")
    return {"batch_levels": np.arange(n_batch), "n_batch": n_batch, "n_sample": int(len(codes)),
            "sample_per_batch": counts.astype(int),
            "batch_info": np.split(order, np.cumsum(counts)[:-1]), "ref_level": ref}


def fit(data: HarmonizationData, settings: HarmonizationSettings) -> FitResult:
    """Check the input, fit ComBat (or ComBat-GAM) and harmonize the fitted rows.

    Raises
    ------
    HarmonizationRefused
        With every refusal (NaN or constant feature, missing covariate, small or
        single site, confounding, collinear design), not only the first.
    """
    encoding, encoded, batch, mapping, findings, assoc = checks.check_fit_input(data, settings)
    x = data.features.to_numpy(dtype=float)
    if x.nbytes < PARALLEL_FINGERPRINT_BYTES:
        # small input: hashing takes about a millisecond, less than handing it to a thread
        fingerprint = data.fingerprint()
        model, bayes = _fit_model(x, encoded, batch, encoding, settings, data.subjects)
    else:
        # hashlib releases the GIL on large buffers: the input's fingerprint (a third of a
        # second for 100,000 x 300) is computed while ComBat fits
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(data.fingerprint)
            model, bayes = _fit_model(x, encoded, batch, encoding, settings, data.subjects)
            fingerprint = pending.result()
    model.batch_map = mapping
    model.features = [str(c) for c in data.features.columns]
    _refuse_non_finite(model, settings)
    if settings.covbat:
        bayes = _fit_covbat(model, x, encoded, batch, settings.covbat_variance)
    model.metadata = _metadata(model, data, settings, findings, assoc, fingerprint)
    model.metadata["covariate_ranges"] = checks.covariate_ranges(data.covariates, encoding, batch)
    harmonized = pd.DataFrame(bayes, index=data.features.index, columns=data.features.columns)
    findings = findings + _impossible_values(x, bayes, model.features, data.row_labels)
    findings += _outlier_screen(model, x, encoded, batch, encoding, settings, data)
    return FitResult(model, harmonized, batch, encoded, findings, assoc)


def _fit_covbat(model: ComBatModel, x: np.ndarray, encoded: pd.DataFrame, batch: pd.Series,
                percent_var: float) -> np.ndarray:
    """The covariance step fitted on the ComBat residuals, computed as apply() computes them (so
    the fit's values are its stored model's, to the bit); returns the harmonized values."""
    idx = pd.Index(model.batches).get_indexer(batch.astype(str).to_numpy())
    s, centre = residuals(model, x, idx, covariate_design(model, encoded))
    model.covbat = covbat.fit(s, idx, len(model.batches), percent_var)
    out = covbat.adjust(model.covbat, s, idx)
    out += centre
    return out


def _outlier_screen(model: ComBatModel, x: np.ndarray, encoded: pd.DataFrame, batch: pd.Series,
                    encoding: CovariateEncoding, settings: HarmonizationSettings,
                    data: HarmonizationData) -> list[Finding]:
    """Values far from their site (robust z above ``checks.OUTLIER_Z`` after the covariates), named
    and kept in the model's metadata; the report fits again without them and shows the largest
    change of a scale estimate (:func:`outlier_effect`; three outliers gave one ABIDE site delta*
    3.7, issue 14). Not refitted here: a fit stays within 1.1x of bare neuroCombat."""
    if model.intercepts is not None or np.isinf(x).any():
        return []
    labels, codes, out = _outliers(model, x, encoded, batch)
    if not out.any():
        return []
    per = pd.Series(labels[codes[out]]).value_counts()
    meta: dict[str, Any] = {"rows": int(out.sum()), "z": checks.OUTLIER_Z,
                            "by_batch": {str(b): int(n) for b, n in per.items()},
                            "first": data.row_labels[out].astype(str).tolist()[:20]}
    model.metadata["outliers"] = meta
    text = (f"{int(out.sum())} row(s) have a value more than {checks.OUTLIER_Z:g} robust SDs from their site's after "
            f"the covariates ({checks.rows_text(data.row_labels, out)}; by site: "
            f"{', '.join(f'{b} {n}' for b, n in per.head(6).items())}); the report fits without them and "
            "shows what they do to the scale estimates")
    return [Finding("info", "outliers", text, {k: v for k, v in meta.items() if k != "first"})]


def _outliers(model: ComBatModel, x: np.ndarray, encoded: pd.DataFrame, batch: pd.Series
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch labels, each row's batch code, and the rows :func:`checks.outlier_rows` screens out."""
    labels, codes = _batch_codes(batch)
    columns = encoded[model.encoding.columns]
    if model.spline is None:   # the fit's own design and least-squares coefficients
        design = np.column_stack([_batch_design(codes, len(labels), model.options.ref),
                                  columns.to_numpy(dtype=np.float32)])
        return labels, codes, checks.outlier_rows(x, design, codes, model.B_hat)
    # ComBat-GAM's coefficients are penalized: a linear design's least squares instead
    design = np.column_stack([np.eye(len(labels))[codes], columns.to_numpy(dtype=float)])
    return labels, codes, checks.outlier_rows(x, design, codes)


def outlier_effect(result: FitResult, data: HarmonizationData,
                   settings: HarmonizationSettings) -> dict[str, Any] | None:
    """The model fitted again without the screened rows: the largest change of a delta*."""
    model = result.model
    if "outliers" not in model.metadata or model.intercepts is not None:
        return None
    x = data.features[model.features].to_numpy(dtype=float)
    labels, codes, out = _outliers(model, x, result.encoded, result.batch)
    keep = ~out
    if np.bincount(codes[keep], minlength=len(labels)).min() < 2:
        return {"refitted": False, "why": "a site would be empty without them"}
    without, _ = _fit_model(x[keep], result.encoded[keep], result.batch[keep], model.encoding, settings)
    ratio = np.abs(np.log(model.delta_star / without.delta_star))
    b, f = np.unravel_index(np.argmax(ratio), ratio.shape)
    return {"refitted": True, "rows_left_out": int((~keep).sum()), "batch": model.batches[b],
            "feature": model.features[f], "delta_with": round(float(model.delta_star[b, f]), 3),
            "delta_without": round(float(without.delta_star[b, f]), 3),
            "material": bool(ratio.max() > np.log(1.5))}


def _impossible_values(raw: np.ndarray, harmonized: np.ndarray, features: list[str],
                       labels: pd.Series) -> list[Finding]:
    """Harmonized values below zero for a feature measured above zero in every row (a volume, a
    width): ComBat's scale made them, often from an outlier-driven delta* (issue 14: a frontal horn
    width of -2.18 mm)."""
    positive = ((raw > 0) | np.isnan(raw)).all(axis=0) & (raw > 0).any(axis=0)   # missing values aside
    negative = positive & (harmonized < 0).any(axis=0)
    out = []
    for j in np.nonzero(negative)[0]:
        rows = harmonized[:, j] < 0
        out.append(Finding("warning", "impossible_harmonized",
                           f"feature {features[j]!r} is positive in every input row but harmonized below 0 in "
                           f"{int(rows.sum())} row(s) ({checks.rows_text(labels, rows)}): look at those sites' "
                           "scale estimates and outliers before using them", {"feature": features[j]}))
    return out


def _fit_model(x: np.ndarray, encoded: pd.DataFrame, batch: pd.Series, encoding: CovariateEncoding,
               settings: HarmonizationSettings, subjects: pd.Series | None = None) -> tuple[ComBatModel, np.ndarray]:
    if encoding.smooth_terms:
        return _fit_gam(x, encoded, batch, encoding, settings)
    return _fit_linear(x, encoded, batch, encoding, settings,
                       subjects if settings.repeated == "longitudinal" else None)


def _batch_codes(batch: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Sorted batch labels (neuroHarmonize's ``np.unique(covars.SITE)``) and each row's code."""
    codes, labels = pd.factorize(batch.astype(str), sort=True)
    return np.asarray(labels, dtype=str), codes


def _batch_design(codes: np.ndarray, n_batch: int, ref: int | None) -> np.ndarray:
    """neuroCombat's batch part of the design: one indicator per batch, the reference's all ones."""
    out = np.eye(n_batch)[codes]
    if ref is not None:
        out[:, ref] = 1.0
    return out


def _fit_linear(x: np.ndarray, encoded: pd.DataFrame, batch: pd.Series, encoding: CovariateEncoding,
                settings: HarmonizationSettings, subjects: pd.Series | None = None) -> tuple[ComBatModel, np.ndarray]:
    labels, codes = _batch_codes(batch)
    n_batch = len(labels)
    options = Options.of(settings, labels)
    # neuroCombat's make_design_matrix: every batch's indicator, then the covariates as float32
    design = np.zeros((len(codes), n_batch + len(encoding.columns)))
    design[:, :n_batch] = _batch_design(codes, n_batch, options.ref)
    covariates = encoded if list(encoded.columns) == encoding.columns else encoded[encoding.columns]
    design[:, n_batch:] = covariates.to_numpy(dtype=np.float32)
    if subjects is not None:   # longitudinal ComBat (Beer et al. 2020): a random intercept per subject
        subject_codes, subject_labels = pd.factorize(subjects.astype(str), sort=True)
        mixed = longitudinal.fit_random_intercept(x, design, subject_codes)
        model, bayes = _combat(x, design, codes, n_batch, mixed.b_hat, options,
                               mixed.intercepts[subject_codes], mixed.sigma2)
        model.subjects, model.intercepts = [str(s) for s in subject_labels], mixed.intercepts
    elif np.isnan(x).any():   # available-case: each feature's coefficients from the rows that have it
        b_hat = available.ols(design, x)
        model, bayes = _combat(x, design, codes, n_batch, b_hat, options)
    else:
        # neuroHarmonize's standardizeAcrossFeatures, term for term
        b_hat = np.dot(np.dot(np.linalg.inv(np.dot(design.T, design)), design.T), x)
        model, bayes = _combat(x, design, codes, n_batch, b_hat, options)
    model.batches = [str(b) for b in labels]
    model.encoding = encoding
    return model, bayes


def _fit_gam(x: np.ndarray, encoded: pd.DataFrame, batch: pd.Series, encoding: CovariateEncoding,
             settings: HarmonizationSettings) -> tuple[ComBatModel, np.ndarray]:
    labels, codes = _batch_codes(batch)
    n_batch = len(labels)
    options = Options.of(settings, labels)
    linear = np.column_stack([_batch_design(codes, n_batch, options.ref),
                              encoded[encoding.linear_columns].to_numpy(dtype=float)])
    bs = gam.make_bsplines(encoded[encoding.smooth_terms].to_numpy(dtype=float),
                           [settings.smooth_term_bounds.get(t) for t in encoding.smooth_terms])
    smooth = gam.fit_smooth(linear, bs, x, np.random.default_rng(settings.seed))
    design = np.column_stack([linear, bs.basis])
    model, bayes = _combat(x, design, codes, n_batch, smooth.coef, options)
    model.batches = [str(b) for b in labels]
    model.encoding = encoding
    model.spline = gam.spec_of(bs, encoding.smooth_terms)
    model.alphas = smooth.alphas
    return model, bayes


def location_scale(s_data: np.ndarray, design: np.ndarray, info: dict[str, Any], eb: bool,
                   options: Options) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """neuroCombat's L/S estimates and their adjustment (EB parametric, non-parametric, or none) of
    standardized data (features, samples): the priors, gamma* and delta*."""
    if np.isnan(s_data).any():
        return available.location_scale(s_data, design, info, eb, options.parametric, options.mean_only)
    ls = fit_LS_model_and_find_priors(s_data, design, info, options.mean_only)
    if not eb:
        gamma, delta = find_non_eb_adjustments(s_data, ls, info)
    elif options.parametric:
        gamma, delta = find_parametric_adjustments(s_data, ls, info, options.mean_only)
    else:
        gamma, delta = find_non_parametric_adjustments(s_data, ls, info, options.mean_only)
    return ls, np.asarray(gamma, dtype=float), np.asarray(delta, dtype=float)


def _combat(x: np.ndarray, design: np.ndarray, codes: np.ndarray, n_batch: int,
            b_hat: np.ndarray, options: Options = Options(), subject_part: np.ndarray | None = None,
            residual_var: np.ndarray | None = None) -> tuple[ComBatModel, np.ndarray]:
    """ComBat once the coefficients ``b_hat`` of ``design`` (batch part first) are known.

    Standardization and the final adjustment are neuroCombat's ``standardize_across_features``
    and ``adjust_data_final`` written row-major over whole arrays (they build (F, n) matrices of
    ones and loop over batches with index lists), with its reference-batch rules: the grand mean
    is the reference's coefficient, the pooled variance the reference's rows', and the reference
    rows come back as they went in. The estimates in between are neuroCombat's own functions
    (``fit_LS_model_and_find_priors`` and the parametric, non-parametric or no-EB adjustments).

    Longitudinal ComBat passes each row's subject intercept (``subject_part``) and the mixed
    model's residual variance: the centre then holds the subject, and the batch's scale acts on
    the residual only (Beer et al. 2020).
    """
    ref = options.ref
    missing = bool(np.isnan(x).any())   # sva: any missing value in the table, its pooled variance (n - 1)
    info = info_dict(codes, n_batch, ref)
    eb = options.eb and x.shape[1] > 1  # neuroHarmonize bypasses empirical Bayes for a single feature
    grand_mean = b_hat[ref].copy() if ref is not None else (info["sample_per_batch"] / len(codes)) @ b_hat[:n_batch]
    # the covariate part of the fitted mean, as apply() builds it (the same operands in the same
    # order, so a stored model applied to its training rows gives the fit's values to the bit)
    centre = np.ascontiguousarray(design[:, n_batch:]) @ b_hat[n_batch:]
    if subject_part is not None:
        centre += subject_part
    if residual_var is not None:
        resid = None
        var_pooled = np.array(residual_var, dtype=float)
    else:
        if ref is None:
            resid = x - centre - b_hat[:n_batch][codes]
        else:
            rows = codes == ref
            resid = x[rows] - design[rows] @ b_hat
        var_pooled = (available.pooled_variance(resid) if missing
                      else np.einsum("ij,ij->j", resid, resid) / len(resid))
    del resid
    var_pooled[var_pooled == 0] = np.median(var_pooled != 0)   # neuroCombat's rule, as it is
    sd = np.sqrt(var_pooled)
    centre += grand_mean
    # x minus the centre, row-major whatever the layout of x: the standardized data, then the result
    s = np.subtract(x, centre, order="C")
    s /= sd
    s_data = s.T  # neuroCombat's (features, samples) orientation, a view
    ls, gamma_star, delta_star = location_scale(s_data, design, info, eb, options)
    s -= gamma_star[codes]          # a reference batch's own row of gamma_star is 0
    s /= np.sqrt(delta_star)[codes]
    s *= sd
    s += centre
    if ref is not None:
        s[codes == ref] = x[codes == ref]
    model = ComBatModel(
        batches=[], batch_sizes=[int(n) for n in info["sample_per_batch"]], batch_map={},
        features=[], encoding=CovariateEncoding(), B_hat=b_hat, grand_mean=grand_mean,
        var_pooled=var_pooled, gamma_star=gamma_star, delta_star=delta_star,
        gamma_hat=np.asarray(ls["gamma_hat"]), delta_hat=np.asarray(ls["delta_hat"], dtype=float), eb=eb,
        options=options)
    return model, s


def _refuse_non_finite(model: ComBatModel, settings: HarmonizationSettings) -> None:
    """Estimates that are not numbers are refused, never written as harmonized NaN.

    Found with neuroCombat's own non-parametric priors (``int_eprior``): with ``mean_only`` and a
    reference batch, the likelihood of a batch's scans under every other feature's estimates can
    underflow to 0 and the estimate is 0/0 (ABIDE, AGE+SEX+DX, NYU as reference: site UM_1,
    features WM- and non-WM-hypointensities; neuroCombat 0.2.12 returns 1,720 NaN values).
    """
    bad = ~(np.isfinite(model.gamma_star) & np.isfinite(model.delta_star))
    if not bad.any():
        return
    findings = [Finding("refusal", "estimates_not_finite",
                        f"batch {b!r}: the {'non-' if not settings.parametric else ''}parametric empirical Bayes "
                        f"estimates of {int(row.sum())} feature(s) are not numbers "
                        f"(e.g. {[f for f, x in zip(model.features, row) if x][:3]}); "
                        + ("the non-parametric likelihood of its scans underflows: fit with parametric "
                           "priors" if not settings.parametric else "check the feature's values"),
                        {"batch": b, "features": int(row.sum())})
                for b, row in zip(model.batches, bad) if row.any()]
    raise HarmonizationRefused(findings)


def _metadata(model: ComBatModel, data: HarmonizationData, settings: HarmonizationSettings,
              findings: list[Finding], assoc: dict[str, float], fingerprint: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "schema": "corelab.harmonization.model/1",
        "method": model.method,
        "empirical_bayes": model.eb,
        "options": model.options.to_dict(),
        "reference_batch": model.batches[model.options.ref] if model.options.ref is not None else None,
        "batches": dict(zip(model.batches, model.batch_sizes)),
        "batch_map": model.batch_map,
        "features": model.features,
        "covariates": model.encoding.to_dict(),
        "design_columns": ["batch:" + b for b in model.batches] + model.encoding.linear_columns
        + ([f"spline:{t}:{i}" for t in model.encoding.smooth_terms
            for i in range(gam.DF - 1)] if model.spline else []),
        "settings": settings.model_dump(mode="json"),
        "software": software_versions(),
        "source": data.source,
        "input": {"fingerprint": fingerprint, "rows": data.n},
        "association_with_batch": assoc,
        "findings": [f.to_dict() for f in findings],
    }
    if model.covbat is not None:
        meta["covbat"] = model.covbat.metadata()
    if model.subjects is not None:
        meta["longitudinal"] = {"method": "random subject intercept (Beer et al. 2020), closed form",
                                "subjects": model.subjects}
    if model.spline is not None:
        meta["spline"] = model.spline.to_dict()
        meta["penalties"] = {f: [float(a) for a in row] for f, row in zip(model.features, model.alphas)}
    return meta


@dataclass
class ApplyResult:
    """Harmonized values of the rows the model can speak for.

    ``status`` is '' for a harmonized row, else why it was left out (and those
    rows hold NaN in ``harmonized``).
    """

    harmonized: pd.DataFrame
    status: pd.Series
    batch: pd.Series
    findings: list[Finding]

    @property
    def ok(self) -> np.ndarray:
        return (self.status == "").to_numpy()


def covariate_design(model: ComBatModel, encoded: pd.DataFrame) -> np.ndarray:
    """The non-batch columns of the design, built as the fit built them."""
    if model.spline is None:
        # neuroCombat's make_design_matrix stores covariates as float32; so must we, to agree.
        return encoded[model.encoding.columns].to_numpy(dtype=np.float32).astype(float)
    lin = encoded[model.encoding.linear_columns].to_numpy(dtype=float)
    basis = gam.basis(model.spline, encoded[model.encoding.smooth_terms].to_numpy(dtype=float))
    return np.column_stack([lin, basis])


def apply(model: ComBatModel, data: HarmonizationData, model_id: str = "",
          refuse_empty: bool = True) -> ApplyResult:
    """Harmonize new rows with a frozen model; never guess for rows it cannot speak for.

    Raises
    ------
    ModelMismatchError
        A feature or covariate of the model is missing from ``data``.
    HarmonizationRefused
        Not a single row can be harmonized (every reason listed), unless
        ``refuse_empty`` is False (a nightly run records the decision instead).
    """
    model_id = model_id or model.model_id
    missing = [f for f in model.features if f not in data.features.columns]
    missing_cov = [c for c in model.encoding.names if c not in data.covariates.columns]
    if missing or missing_cov:
        raise ModelMismatchError(f"model {model_id} needs feature(s) {missing[:10]} and covariate(s) "
                                 f"{missing_cov} that the new data does not have")
    same = list(data.features.columns) == model.features
    x = (data.features if same else data.features[model.features]).to_numpy(dtype=float)
    encoded, why = model.encoding.encode(data.covariates)
    status = _row_status(model, data, model_id, x, why)
    batch = data.batch.map(model.batch_map)
    findings = _status_findings(status, data.batch) + _extrapolation(model, data, status, batch)
    ok = (status == "").to_numpy()
    if not ok.any() and refuse_empty:
        raise HarmonizationRefused([Finding("refusal", f.code, f.message, f.where) for f in findings])
    every = bool(ok.all())  # the nightly case: skip the masked copies
    out = np.empty(x.shape) if every else np.full(x.shape, np.nan)
    if ok.any():
        idx = pd.Index(model.batches).get_indexer((batch if every else batch[ok]).to_numpy())
        design = covariate_design(model, encoded if every else encoded[ok])
        who = None
        if model.intercepts is not None:
            who = pd.Index(model.subjects).get_indexer(data.subjects.astype(str)[ok if not every else slice(None)])
        s, centre = residuals(model, x if every else x[ok], idx, design, who)
        if model.covbat is not None:
            s = covbat.adjust(model.covbat, s, idx)
        s += centre
        if model.options.ref is not None:   # the reference's rows stay as measured, as in the fit
            own = idx == model.options.ref
            s[own] = (x if every else x[ok])[own]
        if every:
            out = s
        else:
            out[ok] = s
    frame = pd.DataFrame(out, index=data.features.index, columns=model.features)
    return ApplyResult(frame, status, batch, findings)


def residuals(model: ComBatModel, x: np.ndarray, idx: np.ndarray, design: np.ndarray,
              subjects: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ComBat's adjustment of rows ``x`` of batches ``idx`` (model rows) before the fitted mean is
    added back: the harmonized residuals, and that mean (covariates, subject, grand mean)."""
    centre = design @ model.B_hat[len(model.batches):]
    if subjects is not None:
        centre += model.intercepts[subjects]
    centre += model.grand_mean
    sd = np.sqrt(model.var_pooled)
    s = np.subtract(x, centre, order="C")
    s /= sd
    s -= model.gamma_star[idx]
    s /= np.sqrt(model.delta_star)[idx]
    s *= sd
    return s, centre


def _row_status(model: ComBatModel, data: HarmonizationData, model_id: str, x: np.ndarray,
                why: pd.Series) -> pd.Series:
    """'' for a row the model can harmonize, else the first reason it cannot."""
    status = np.full(len(x), "", dtype=object)
    known = data.batch.isin(list(model.batch_map)).to_numpy()
    if not known.all():
        fitted_on = ", ".join(sorted(model.batch_map))
        status[~known] = [f"site {b!r} is not in model {model_id} (fitted on {fitted_on}): "
                          "needs a refit that includes it" for b in data.batch[~known]]
    why = why.to_numpy()
    free = (status == "") & (why != "")
    status[free] = why[free]
    if model.spline is not None:
        for term, (lo, hi) in zip(model.spline.terms, model.spline.bounds):
            v = pd.to_numeric(data.covariates[term], errors="coerce").to_numpy(dtype=float)
            out = ((v < lo) | (v > hi)) & (status == "")
            status[out] = f"{term} is outside the fitted range {lo:g}..{hi:g}: needs a refit"
    limits = model.metadata.get("settings", {}).get("covariate_limits", {})
    for name, bad in checks.outside_limits(data.covariates, model.encoding.names, limits).items():
        lo, hi = checks.limits_of([name], limits)[name]
        free = bad & (status == "")
        status[free] = f"{name} is outside what it can be ({lo:g}..{hi:g}): a data error, not harmonized"
    if model.intercepts is not None:   # a longitudinal model knows its subjects' intercepts only
        known_subject = (np.zeros(len(x), bool) if data.subjects is None
                         else data.subjects.astype(str).isin(model.subjects).to_numpy())
        free = ~known_subject & (status == "")
        status[free] = ("subject not in the longitudinal model (it holds the intercepts of the subjects it was "
                        "fitted on): refit with this subject's scans")
    for i, why in missing_values(model, x).items():
        if status[i] == "":
            status[i] = why
    return pd.Series(status, index=data.features.index)


def available_case(model: ComBatModel) -> bool:
    """Whether the model harmonizes each feature on its own (a missing value stays missing); a
    model stored before the setting existed was fitted on complete scans, CovBat rotates whole rows,
    and non-parametric priors (which a new batch's estimates need) integrate over whole rows."""
    return (model.covbat is None and (model.options.parametric or not model.eb)
            and model.metadata.get("settings", {}).get("missing", "complete_scans") == "available_case")


def missing_values(model: ComBatModel, x: np.ndarray) -> dict[int, str]:
    """Rows the model cannot harmonize for their missing values, with the reason: any missing
    feature (complete-scan models), or an infinite value or no feature at all (available-case)."""
    out: dict[int, str] = {}
    if available_case(model):
        for i in np.nonzero(np.isinf(x).any(axis=1))[0]:
            out[int(i)] = "an infinite value"
        for i in np.nonzero(np.isnan(x).all(axis=1))[0]:
            out.setdefault(int(i), "no feature measured")
        return out
    # one reason per kind (a message lists the reasons, not every row's features)
    for i in np.nonzero(~np.isfinite(x).all(axis=1))[0]:
        out[int(i)] = "a feature is missing or infinite (the model takes complete scans)"
    return out


def _extrapolation(model: ComBatModel, data: HarmonizationData, status: pd.Series, batch: pd.Series) -> list[Finding]:
    """Harmonized rows whose numeric covariate lies outside what the model was fitted on: overall
    (the covariate's fitted effect is extrapolated) or their own batch's range (its site effect
    was estimated on other values). Harmonized, and said."""
    out = []
    ok = (status == "").to_numpy()
    for name, r in model.metadata.get("covariate_ranges", {}).items():
        v = pd.to_numeric(data.covariates[name], errors="coerce").to_numpy(dtype=float)
        beyond = ok & ((v < r["min"]) | (v > r["max"]))
        if beyond.any():
            out.append(Finding("warning", "extrapolated_covariate",
                               f"{int(beyond.sum())} row(s) have {name} outside the fitted {r['min']:g}..{r['max']:g} "
                               f"({checks.rows_text(data.row_labels, beyond)}): their {name} effect is extrapolated "
                               "from the model's linear term", {"covariate": name, "rows": int(beyond.sum())}))
        own = np.array([r["batches"].get(str(b), [np.nan, np.nan]) for b in batch], dtype=float).reshape(-1, 2)
        outside_own = ok & ~beyond & ((v < own[:, 0]) | (v > own[:, 1]))
        if outside_own.any():
            out.append(Finding("warning", "outside_batch_range",
                               f"{int(outside_own.sum())} row(s) have {name} outside their own batch's fitted range "
                               f"({checks.rows_text(data.row_labels, outside_own)}): their site effect was "
                               f"estimated on other {name} values",
                               {"covariate": name, "rows": int(outside_own.sum())}))
    return out


def _status_findings(status: pd.Series, batch: pd.Series) -> list[Finding]:
    """One warning per distinct reason, with the number of rows and sites concerned."""
    out = []
    left = status[status != ""]
    if left.empty:
        return out
    for reason, rows in left.groupby(left.to_numpy()):
        sites = sorted(set(batch[rows.index].astype(str)))
        out.append(Finding("warning", "not_harmonized",
                           f"{len(rows)} row(s) not harmonized: {reason}",
                           {"rows": len(rows), "sites": sites}))
    return out
