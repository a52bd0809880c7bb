"""ComBat-GAM smooth terms, fitted for all features at once.

neuroHarmonize (Pomponio et al. 2020) models smooth covariates with one
statsmodels ``GLMGam`` per feature: a cubic B-spline basis (``BSplines``,
df=10, degree=3) next to the linear terms (batch indicators, other
covariates), with penalty weight ``alpha`` picked per feature by 5-fold
cross-validation over ``np.logspace(0, 7, 11)`` (``select_penweight_kfold``).
For a Gaussian GAM with identity link the penalised IRLS of statsmodels ends
after one step at the penalised least-squares solution

    b = argmin ||y - X b||^2 + b' (2 alpha S) b,     S = cov_der2 of the spline,

so every feature shares ``X`` and ``S`` and only ``y`` differs. This module
computes exactly that, but vectorised: the cross-validation errors of all
features and all candidate penalties come from batched normal equations
(full Gram matrix minus the held-out fold's), and the final coefficients from
one least-squares solve per distinct penalty for all features that chose it,
with statsmodels' own augmented matrix and pseudo-inverse.

neuroHarmonize draws a fresh fold shuffle for every feature and every grid
point from one generator (statsmodels ``KFold(shuffle=True, rng=rng)`` is
re-split per grid point). :func:`fold_permutations` makes the same draws in the
same order, so with the same seed the same penalties are selected and the
coefficients agree with neuroHarmonize's to rounding (tests/test_harmonization_gam.py).

Written by hand because no library fits many GAMs that share a design in one
solve; the spline basis and its penalty matrix still come from statsmodels.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from statsmodels.gam.api import BSplines
from statsmodels.gam.generalized_additive_model import make_augmented_matrix
from statsmodels.tools.tools import pinv_extended
from threadpoolctl import threadpool_limits

DF = 10          # neuroHarmonize: BSplines(..., df=10, degree=3)
DEGREE = 3
K_FOLDS = 5      # statsmodels select_penweight_kfold defaults
K_GRID = 11
# Bytes of working memory one batch of the cross-validation may use.
_CHUNK_BYTES = 96 * 2**20


@dataclass(frozen=True)
class SplineSpec:
    """What it takes to rebuild the training spline basis for new rows.

    Attributes
    ----------
    terms
        Covariate names modelled as smooth, in design order.
    knots
        All knots (boundary knots repeated) per term, as statsmodels made them.
    """

    terms: tuple[str, ...]
    knots: tuple[tuple[float, ...], ...]
    degree: int = DEGREE
    df: int = DF

    @property
    def bounds(self) -> list[tuple[float, float]]:
        """(lowest, highest) value each term may take: the outer knots."""
        return [(min(k), max(k)) for k in self.knots]

    def to_dict(self) -> dict[str, Any]:
        return {"terms": list(self.terms), "knots": [list(k) for k in self.knots],
                "degree": self.degree, "df": self.df}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SplineSpec":
        return cls(tuple(d["terms"]), tuple(tuple(float(v) for v in k) for k in d["knots"]),
                   int(d["degree"]), int(d["df"]))


def make_bsplines(x: np.ndarray, bounds: list[tuple[float, float] | None] | None = None) -> BSplines:
    """The basis neuroHarmonize builds for smooth columns ``x`` (n, k); ``bounds`` (one (lo, hi) or
    None per column) are its ``smooth_term_bounds``: the outer knots, so values the fit did not see
    (a follow-up two years older than the oldest baseline) stay inside the model."""
    x = np.asarray(x, dtype=float)
    bounds = bounds or [None] * x.shape[1]
    kwds = [{"lower_bound": b[0] if b else None, "upper_bound": b[1] if b else None} for b in bounds]
    if x.shape[1] == 1:
        return BSplines(x, df=DF, degree=DEGREE, knot_kwds=kwds)
    if not any(bounds):
        return BSplines(x, df=[DF] * x.shape[1], degree=[DEGREE] * x.shape[1])
    return BSplines(x, df=[DF] * x.shape[1], degree=[DEGREE] * x.shape[1], knot_kwds=kwds)


def spec_of(bs: BSplines, terms: list[str]) -> SplineSpec:
    return SplineSpec(tuple(terms), tuple(tuple(float(v) for v in s.knots) for s in bs.smoothers))


def basis(spec: SplineSpec, x: np.ndarray) -> np.ndarray:
    """Spline basis of new rows ``x`` (n, k); every value must lie within ``spec.bounds``."""
    x = np.asarray(x, dtype=float)
    knots = [np.asarray(k) for k in spec.knots]
    anchor = np.column_stack([[k.min(), k.max()] for k in knots])
    kwds = [{"all_knots": k} for k in knots]
    if len(knots) == 1:
        bs = BSplines(anchor, df=spec.df, degree=spec.degree, knot_kwds=kwds)
    else:
        bs = BSplines(anchor, df=[spec.df] * len(knots), degree=[spec.degree] * len(knots),
                      knot_kwds=kwds)
    return bs.transform(x)


def penalty_grid(bs: BSplines, n_linear: int,
                 alphas: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Candidate penalty weights and their penalty matrices.

    Returns
    -------
    grid
        (G, k) penalty weights, the product of one axis per smooth term in
        statsmodels' order (``itertools.product``).
    penalties
        (G, p, p) matrices ``2 * blockdiag(0, alpha_1 S_1, ..., alpha_k S_k)``;
        the 2 is statsmodels' ``penalized_wls`` convention.
    """
    blocks = [s.cov_der2 for s in bs.smoothers]
    axes = alphas if alphas is not None else [np.logspace(0, 7, K_GRID) for _ in blocks]
    grid = np.array(list(itertools.product(*axes)), dtype=float)
    p = n_linear + sum(b.shape[0] for b in blocks)
    out = np.zeros((len(grid), p, p))
    start = n_linear
    for t, block in enumerate(blocks):
        stop = start + block.shape[0]
        out[:, start:stop, start:stop] = 2.0 * grid[:, t, None, None] * block[None]
        start = stop
    return grid, out


def fold_permutations(n_obs: int, n_features: int, n_grid: int,
                      rng: np.random.Generator) -> np.ndarray:
    """The (n_features, n_grid, n_obs) row shuffles neuroHarmonize's k-fold search draws.

    statsmodels' ``KFold.split`` shuffles ``np.array(range(n))`` in place with
    the shared generator once per grid point, feature after feature.
    """
    out = np.empty((n_features, n_grid, n_obs), dtype=np.intp)
    for f in range(n_features):
        for g in range(n_grid):
            idx = np.arange(n_obs)
            rng.shuffle(idx)
            out[f, g] = idx
    return out


def _fold_bounds(n_obs: int, k_folds: int) -> list[tuple[int, int]]:
    """Start/stop of each fold as ``np.array_split`` cuts a shuffled index."""
    sizes = [len(a) for a in np.array_split(np.arange(n_obs), k_folds)]
    stops = np.cumsum(sizes)
    return [(int(s - z), int(s)) for s, z in zip(stops, sizes)]


def cv_errors(design: np.ndarray, penalties: np.ndarray, y: np.ndarray, perms: np.ndarray,
              k_folds: int = K_FOLDS) -> np.ndarray:
    """Mean k-fold prediction error of every feature under every candidate penalty.

    Parameters
    ----------
    design
        (n, p) column-scaled design (linear terms, then spline basis).
    penalties
        (G, p, p) penalty matrices on the same column scale.
    y
        (n, F) features.
    perms
        (F, G, n) row shuffles from :func:`fold_permutations`.

    Returns
    -------
    (F, G) statsmodels' cost ``||y_test - y_hat|| / n_test`` averaged over folds.
    """
    gram = design.T @ design
    xty = design.T @ y                                   # (p, F)
    nonzero = (design != 0).sum(axis=0)
    fidx = np.arange(y.shape[1])[:, None, None]
    err = np.zeros(perms.shape[:2])
    for start, stop in _fold_bounds(design.shape[0], k_folds):
        test = perms[:, :, start:stop]                   # (F, G, m)
        xt = design[test]                                # (F, G, m, p)
        yt = y[test, fidx]                               # (F, G, m)
        a = gram - np.swapaxes(xt, -1, -2) @ xt + penalties[None]
        rhs = xty.T[:, None, :] - np.einsum("fgmp,fgm->fgp", xt, yt)
        # A column with no training rows (a batch wholly in the held-out fold)
        # gets coefficient 0, the minimum-norm answer statsmodels' pinv gives.
        empty = (nonzero[None, None, :] - (xt != 0).sum(axis=2)) == 0
        if empty.any():
            f, g, c = np.nonzero(empty)
            a[f, g, :, c] = 0.0
            a[f, g, c, :] = 0.0
            a[f, g, c, c] = 1.0
            rhs[f, g, c] = 0.0
        # Thousands of 30x30 systems: BLAS threads only add hand-over costs (10x slower on 2 cores).
        with threadpool_limits(limits=1, user_api="blas"):
            coef = np.linalg.solve(a, rhs[..., None])[..., 0]
        pred = np.einsum("fgmp,fgp->fgm", xt, coef)
        err += np.linalg.norm(yt - pred, axis=-1) / (stop - start)
    return err / k_folds


def penalized_solve(design: np.ndarray, penalty: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Penalised least squares for many responses at once, as statsmodels solves one.

    Minimises ``||y - X b||^2 + b' P b`` for every column of ``y`` (n, F) with
    statsmodels' own augmented design (``make_augmented_matrix``: ``X`` stacked
    on a square root of ``P``) and its pseudo-inverse (``pinv_extended``, what
    ``WLS.fit(method="pinv")`` uses), so the numbers agree with ``GLMGam.fit``
    to rounding; only the right-hand side is a matrix instead of a vector.
    """
    n = design.shape[0]
    _, aug_x, _ = make_augmented_matrix(np.zeros(n), design, penalty, np.ones(n))
    pinv, _ = pinv_extended(aug_x)
    return pinv[:, :n] @ y  # the augmented rows of y are zero


@dataclass(frozen=True)
class SmoothFit:
    """Result of :func:`fit_smooth`.

    Attributes
    ----------
    coef
        (p, F) coefficients: linear terms first, then the spline basis.
    alphas
        (F, k) selected penalty weight per feature and smooth term.
    cv_error
        (F, G) cross-validation error over the penalty grid.
    grid
        (G, k) the candidate penalty weights.
    """

    coef: np.ndarray
    alphas: np.ndarray
    cv_error: np.ndarray
    grid: np.ndarray


def fit_smooth(linear: np.ndarray, bs: BSplines, y: np.ndarray, rng: np.random.Generator,
               alphas: list[np.ndarray] | None = None, k_folds: int = K_FOLDS) -> SmoothFit:
    """Fit neuroHarmonize's GAM to every column of ``y`` with k-fold penalty selection.

    Parameters
    ----------
    linear
        (n, q) linear part of the design (batch indicators, other covariates).
    bs
        Spline basis from :func:`make_bsplines` on the same rows.
    y
        (n, F) features.
    rng
        Generator for the fold shuffles; ``np.random.default_rng(seed)`` reproduces
        ``harmonizationLearn(..., seed=seed)``.
    """
    design = np.column_stack([linear, bs.basis])
    grid, penalties = penalty_grid(bs, linear.shape[1], alphas)
    # Column scaling changes no fitted value but keeps the normal equations well conditioned.
    scale = 1.0 / np.sqrt(np.mean(design**2, axis=0))
    xs = design * scale
    ps = penalties * scale[None, :, None] * scale[None, None, :]
    n, p = xs.shape
    n_feat = y.shape[1]
    per_feature = len(grid) * (n * 8 + (n // k_folds + 1) * p * 8 * 3)
    chunk = max(1, int(_CHUNK_BYTES // max(per_feature, 1)))
    cv = np.empty((n_feat, len(grid)))
    for lo in range(0, n_feat, chunk):
        hi = min(n_feat, lo + chunk)
        perms = fold_permutations(n, hi - lo, len(grid), rng)
        cv[lo:hi] = cv_errors(xs, ps, y[:, lo:hi], perms, k_folds)
    best = np.argmin(cv, axis=1)                          # first minimum, as np.argmin in statsmodels
    coef = np.empty((p, n_feat))
    for g in np.unique(best):
        cols = np.nonzero(best == g)[0]
        coef[:, cols] = penalized_solve(design, penalties[g], y[:, cols])
    return SmoothFit(coef=coef, alphas=grid[best], cv_error=cv, grid=grid)
