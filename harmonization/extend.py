"""New batches (a site that joins, a scanner epoch that starts) estimated against a frozen model.

A refit with the new batch moves every value already harmonized: the grand mean, the pooled
variance, the covariate coefficients and every batch's empirical-Bayes prior change with the
data (adding a third site to a two-site ABIDE model moved 47.7 % of the existing rows by more
than 0.1 SD in one feature or more, issue 14). Here the parent model stays as it is: the new
batch's rows are standardized with the parent's grand mean, pooled variance and covariate
coefficients, and only the new batch's location and scale are estimated, with its own
empirical-Bayes shrinkage: neuroCombat's ``fit_LS_model_and_find_priors`` and adjustment
functions, as a fit would for that batch (ComBat's priors are per batch, across features), under
the parent's options (empirical Bayes or not, parametric or not, mean only or not).

The result is a child model: the parent's arrays, unchanged, with the new batches' rows added
and ``parent`` naming the model it extends, so applying the child to a row of an old batch gives
the same bits as applying the parent. neuroHarmonize's ``harmonizationLearn(..., orig_model=)``
is meant for this and fails as soon as the model has covariates (issue 14); it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from harmonization import available, covbat
from harmonization.checks import covariate_ranges
from harmonization.combat import (
    ApplyResult,
    ComBatModel,
    apply,
    covariate_design,
    info_dict,
    location_scale,
    missing_values,
    residuals,
)
from harmonization.errors import Finding, HarmonizationRefused, ModelMismatchError
from harmonization.inputs import HarmonizationData


@dataclass
class ExtendResult:
    """The child model, the harmonized rows of the table, and what was estimated or left out."""

    model: ComBatModel
    applied: ApplyResult
    estimated: dict[str, int]          # new batch -> rows it was estimated on
    findings: list[Finding]


def _usable_rows(model: ComBatModel, data: HarmonizationData, x: np.ndarray) -> tuple[np.ndarray, pd.Series]:
    """Rows whose covariates the parent can encode (known categories, inside smooth bounds) and
    whose features the parent can take (all numbers, or some for an available-case model); the
    first reason of each other row."""
    encoded, why = model.encoding.encode(data.covariates)
    why = why.copy()
    if model.spline is not None:
        for term, (lo, hi) in zip(model.spline.terms, model.spline.bounds):
            v = pd.to_numeric(data.covariates[term], errors="coerce")
            outside = ((v < lo) | (v > hi)) & (why == "")
            why[outside] = f"{term} is outside the fitted range {lo:g}..{hi:g}"
    for i, reason in missing_values(model, x).items():
        if why.iloc[i] == "":
            why.iloc[i] = reason
    return (why == "").to_numpy(), why


def extend(model: ComBatModel, data: HarmonizationData, parent_id: str, min_n: int | None = None) -> ExtendResult:
    """Estimate every batch of ``data`` the model has not seen; harmonize all of ``data`` with
    the child model (old batches exactly as the parent would).

    Raises
    ------
    ModelMismatchError
        A feature or covariate of the model is missing from ``data``.
    HarmonizationRefused
        No batch of ``data`` is new, or no new batch has enough usable rows.
    """
    missing = [f for f in model.features if f not in data.features.columns]
    missing_cov = [c for c in model.encoding.names if c not in data.covariates.columns]
    if missing or missing_cov:
        raise ModelMismatchError(f"model {parent_id} needs feature(s) {missing[:10]} and covariate(s) "
                                 f"{missing_cov} that the new data does not have")
    min_n = int(min_n or model.metadata.get("settings", {}).get("min_site_n", 20))
    x = data.features[model.features].to_numpy(dtype=float)
    usable, why = _usable_rows(model, data, x)
    batch = data.batch.astype(str)
    new = sorted(set(batch) - set(model.batch_map))
    findings: list[Finding] = []
    if not new:
        raise HarmonizationRefused([Finding("refusal", "no_new_batch",
                                            f"every batch of the table is in model {parent_id} "
                                            f"({', '.join(sorted(set(batch)))}): apply it instead", {})])
    sizes = {b: int((usable & (batch == b).to_numpy()).sum()) for b in new}
    small = {b: n for b, n in sizes.items() if n < min_n}
    for b, n in small.items():
        left = ", ".join(sorted(set(why[(batch == b).to_numpy() & ~usable]))) or "none"
        findings.append(Finding("refusal" if len(small) == len(new) else "warning", "small_new_batch",
                                f"new batch {b!r} has {n} usable row(s) (< {min_n}): not estimated "
                                f"(rows left out: {left})", {"batch": b, "rows": n}))
    kept = [b for b in new if b not in small]
    if not kept:
        raise HarmonizationRefused(findings)
    child = _child(model, data, x, usable, batch, kept, parent_id)
    applied = apply(child, data, refuse_empty=False)
    findings += applied.findings
    return ExtendResult(child, applied, {b: sizes[b] for b in kept}, findings)


def _child(model: ComBatModel, data: HarmonizationData, x: np.ndarray, usable: np.ndarray, batch: pd.Series,
           new: list[str], parent_id: str) -> ComBatModel:
    rows = usable & batch.isin(new).to_numpy()
    codes = pd.Index(new).get_indexer(batch[rows])
    encoded, _ = model.encoding.encode(data.covariates[rows])
    n_parent = len(model.batches)
    design = covariate_design(model, encoded)
    centre = design @ model.B_hat[n_parent:] + model.grand_mean
    sd = np.sqrt(model.var_pooled)
    s_data = ((x[rows] - centre) / sd).T            # neuroCombat's (features, samples)
    info = info_dict(codes, len(new))
    counts = info["sample_per_batch"]
    batch_design = np.eye(len(new))[codes]
    short = available.check(x[rows], codes, np.asarray(new), model.features, batch_design,
                            model.eb, model.options.parametric, False, False)
    if short:   # a new batch with fewer than two values of a feature (available-case models only)
        raise HarmonizationRefused(short)
    ls, gamma, delta = location_scale(s_data, batch_design, info, model.eb, model.options)
    if not (np.isfinite(gamma).all() and np.isfinite(delta).all()):
        raise HarmonizationRefused([Finding("refusal", "estimates_not_finite",
                                            "the new batches' estimates are not numbers (non-parametric "
                                            "priors underflow): extend a parametric model", {})])
    b_hat = np.vstack([model.B_hat[:n_parent], np.zeros((len(new), model.B_hat.shape[1])),
                       model.B_hat[n_parent:]])     # a new batch has no coefficient of the parent's fit
    meta = dict(model.metadata)
    meta.update({
        "parent": parent_id,
        "extended_batches": {b: int(n) for b, n in zip(new, counts)},
        "batches": {**meta.get("batches", {}), **{b: int(n) for b, n in zip(new, counts)}},
        "batch_map": {**model.batch_map, **{b: b for b in new}},
        "design_columns": [*[c for c in meta.get("design_columns", []) if c.startswith("batch:")],
                           *[f"batch:{b}" for b in new],
                           *[c for c in meta.get("design_columns", []) if not c.startswith("batch:")]],
        "extend_input": {"fingerprint": data.fingerprint(), "rows": data.n, "source": data.source},
    })
    ranges = covariate_ranges(data.covariates[rows], model.encoding, batch[rows])
    meta["covariate_ranges"] = {name: {**r, "batches": {**r["batches"], **ranges[name]["batches"]}}
                                for name, r in meta.get("covariate_ranges", {}).items() if name in ranges}
    child = replace(
        model, batches=[*model.batches, *new], batch_sizes=[*model.batch_sizes, *map(int, counts)],
        batch_map={**model.batch_map, **{b: b for b in new}}, B_hat=b_hat,
        gamma_star=np.vstack([model.gamma_star, gamma]), delta_star=np.vstack([model.delta_star, delta]),
        gamma_hat=np.vstack([model.gamma_hat, np.asarray(ls["gamma_hat"], dtype=float)]),
        delta_hat=np.vstack([model.delta_hat, np.asarray(ls["delta_hat"], dtype=float)]), metadata=meta)
    if model.covbat is not None:   # the new batches' score location and scale on the frozen axes
        resid, _ = residuals(child, x[rows], codes + n_parent, design)
        child.covbat = covbat.extend(model.covbat, resid, codes, len(new))
    return child
