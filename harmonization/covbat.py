"""CovBat: site differences in the covariance of features, removed after ComBat (Chen et al. 2022).

ComBat equalizes each feature's mean and variance per site; a site can still differ in how
features vary together, and a multivariate classifier sees it (Chen et al. found scanner
manufacturer detectable after ComBat). CovBat, as Chen's reference code does it (``covbat`` in
R, defaults ``std.var = TRUE``, ``score.eb = FALSE``):

1. the ComBat residuals (harmonized values minus the covariate fit) are centred and scaled per
   feature and rotated onto their principal axes (``prcomp``);
2. the first components that explain ``percent_var`` of the variance have their scores
   harmonized by ComBat without covariates and without empirical Bayes: standardized by their
   grand mean and pooled SD, each site's mean and SD removed, scaled back;
3. rotated back, unscaled, and the covariate fit added again.

The score step is neuroCombat's L/S model (``eb=False``; the test compares it with neuroCombat on
the same scores). Only the changed scores are rotated back (``z + (scores' - scores) R_k'``), so
a frozen model applies to new rows exactly as the fit did, and a table with fewer rows than
features keeps what lies outside the fitted components.

By hand because no kept library does Chen's CovBat: combatlearn 2.3.0's ``method="chen"`` takes
the principal components of the harmonized values with the covariate effects still in them and
leaves each site's scores at unit variance, neither of which the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PREFIX = "covbat_"   # the model's arrays.npz keys
MAX_ROWS = 3000      # the covariance test's rows at most (a random sample above)


@dataclass
class CovBat:
    """The frozen covariance step: what rotates residuals onto the harmonized axes and back."""

    center: np.ndarray      # (F,) mean of each feature's ComBat residual
    scale: np.ndarray       # (F,) their SD (n - 1), so the axes are those of the correlations
    rotation: np.ndarray    # (F, k) the first k principal axes
    score_mean: np.ndarray  # (k,) grand mean of each score (ComBat's weighted batch means)
    score_sd: np.ndarray    # (k,) pooled SD of each score within batches
    gamma: np.ndarray       # (batches, k) each batch's standardized score mean
    delta: np.ndarray       # (batches, k) and variance (n - 1)
    percent_var: float
    explained: np.ndarray   # (k,) share of the variance each harmonized axis explains

    def arrays(self) -> dict[str, np.ndarray]:
        return {PREFIX + k: np.asarray(getattr(self, k), dtype=float)
                for k in ("center", "scale", "rotation", "score_mean", "score_sd", "gamma", "delta", "explained")}

    def metadata(self) -> dict[str, Any]:
        return {"percent_var": self.percent_var, "components": int(self.rotation.shape[1]),
                "explained": [round(float(v), 4) for v in self.explained]}

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "CovBat":
        return cls(**{k: arrays[PREFIX + k] for k in ("center", "scale", "rotation", "score_mean", "score_sd",
                                                       "gamma", "delta", "explained")},
                   percent_var=float(meta["percent_var"]))


def fit(resid: np.ndarray, codes: np.ndarray, n_batch: int, percent_var: float) -> CovBat:
    """The covariance step fitted on ComBat residuals (rows, features) of batches ``codes``."""
    center = resid.mean(axis=0)
    scale = resid.std(axis=0, ddof=1)
    z = (resid - center) / scale
    _, sv, vt = np.linalg.svd(z, full_matrices=False)
    share = sv ** 2 / np.sum(sv ** 2)
    # prcomp's rule: the first component at which the cumulative share exceeds percent_var
    above = np.cumsum(share) > percent_var
    k = int(np.argmax(above)) + 1 if above.any() else len(share)
    rotation = np.ascontiguousarray(vt[:k].T)   # one layout, so the products are the same after storage
    scores = z @ rotation
    counts = np.bincount(codes, minlength=n_batch)
    means, _ = _batch_moments(scores, codes, n_batch)
    grand = (counts / len(codes)) @ means
    sd = np.sqrt(np.mean((scores - means[codes]) ** 2, axis=0))    # neuroCombat's var_pooled: / n
    gamma, delta = _batch_moments((scores - grand) / sd, codes, n_batch)
    return CovBat(center, scale, rotation, grand, sd, gamma, delta, percent_var, share[:k])


def _batch_moments(s: np.ndarray, codes: np.ndarray, n_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(batches, k) each batch's mean and variance (n - 1) of the scores ``s``."""
    return (np.vstack([s[codes == b].mean(axis=0) for b in range(n_batch)]),
            np.vstack([s[codes == b].var(axis=0, ddof=1) for b in range(n_batch)]))


def adjust(model: CovBat, resid: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """ComBat residuals of batches ``codes`` (model rows) with the covariance step applied."""
    z = (resid - model.center) / model.scale
    scores = _rows_times(z, model.rotation)
    s = (scores - model.score_mean) / model.score_sd
    adjusted = ((s - model.gamma[codes]) / np.sqrt(model.delta[codes])) * model.score_sd + model.score_mean
    z += _rows_times(adjusted - scores, model.rotation.T)
    return z * model.scale + model.center


def _rows_times(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` with each row's sums in one fixed order, whatever the other rows: BLAS blocks by
    the number of rows, and a row harmonized with 683 others came out 1 ulp from the same row with
    1035 (extend must leave what was harmonized to the bit). 2.5 ms on ABIDE (1035 x 121 x 79) where
    BLAS takes 0.6 ms."""
    return np.einsum("ij,jk->ik", a, b, optimize=False)


def extend(model: CovBat, resid: np.ndarray, codes: np.ndarray, n_new: int) -> CovBat:
    """New batches' score location and scale, estimated against the frozen axes and standardization."""
    s = ((resid - model.center) / model.scale @ model.rotation - model.score_mean) / model.score_sd
    gamma, delta = _batch_moments(s, codes, n_new)
    return CovBat(model.center, model.scale, model.rotation, model.score_mean, model.score_sd,
                  np.vstack([model.gamma, gamma]), np.vstack([model.delta, delta]), model.percent_var,
                  model.explained)


def covariance_effect(resid: np.ndarray, codes: np.ndarray, permutations: int = 199,
                      seed: int = 0) -> dict[str, Any]:
    """Does the correlation of features differ by batch? Each batch's residuals are centred and
    scaled within the batch (its mean and variance, ComBat's part, taken out); the statistic is
    sum over batches of n_b * ||R_b - R||_F^2 / F^2 (R_b the batch's correlation matrix, R the
    pooled one), against the same with the batch labels permuted.

    By hand (no kept library has a test of equal correlation matrices for F > n_b). Computed from
    the rows' squared inner products: n_b ||R_b||^2 = sum over the batch's pairs of (z_i . z_j)^2
    / n_b, and the cross terms sum to a constant, so a permutation costs block sums of one n x n
    matrix: 0.13 s for 199 on ABIDE-sized data, where forming every batch's F x F matrix took 2.1 s
    (the same statistic to 1e-12)."""
    rng = np.random.default_rng(seed)
    if len(codes) > MAX_ROWS:   # the n x n products: a sample of rows (memory n^2; 3000 rows, 72 MB)
        rows = np.sort(rng.choice(len(codes), MAX_ROWS, replace=False))
        resid, codes = resid[rows], codes[rows]
    n_batch = int(codes.max()) + 1
    counts = np.bincount(codes, minlength=n_batch)
    keep = counts[codes] >= 3
    z = np.empty_like(resid, dtype=float)
    for b in range(n_batch):
        rows = codes == b
        if counts[b] >= 3:
            sd = resid[rows].std(axis=0, ddof=1)
            z[rows] = (resid[rows] - resid[rows].mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    z, codes = z[keep], codes[keep]
    n, f = z.shape
    pairs = (z @ z.T) ** 2
    pooled = z.T @ z / n
    constant = n * float(np.sum(pooled * pooled))

    def statistic(labels: np.ndarray) -> float:
        order = np.argsort(labels, kind="stable")
        groups = np.split(order, np.cumsum(np.bincount(labels, minlength=n_batch))[:-1])
        return (sum(pairs[np.ix_(g, g)].sum() / len(g) for g in groups if len(g)) - constant) / f ** 2

    observed = statistic(codes)
    null = np.array([statistic(rng.permutation(codes)) for _ in range(permutations)])
    return {"statistic": round(observed, 4), "null_median": round(float(np.median(null)), 4),
            "ratio": round(observed / float(np.median(null)), 3) if np.median(null) > 0 else None,
            "p": round(float((1 + np.sum(null >= observed)) / (1 + permutations)), 4), "permutations": permutations,
            "rows": int(n)}
