"""Stages 3-4: the diffusion tensor (dipy, weighted least squares), its maps, and the checks of its fit.

Units: dipy gives diffusivities in mm2/s when b is in s/mm2; corelab reports them in um2/ms
(x 1000; 1 um2/ms = 1e-3 mm2/s), the unit of the diffusion literature (white matter MD ~0.7,
CSF ~3.0 at body temperature).

The gradient sign check is hand-written: neither dipy nor nibabel checks a table's signs. It is
the fibre coherence idea of Schilling et al. 2019 (Magn Reson Imaging 57:75): in white matter,
the principal direction of a voxel points to a neighbour whose principal direction is the same
when the table is right; an axis of the table with the wrong sign mirrors every direction along
that axis, and the field stops following its fibres. Flipping an axis of the table maps the
tensor to ``F D F`` (``F`` = diag with one -1), so each candidate table's principal directions
are ``F v1``: no refit is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst import dti
from dipy.reconst.dti import TensorModel

from pipelines.dwi.gradients import B0_MAX, Gradients

UM2_PER_MS = 1000.0           # mm2/s -> um2/ms
WM_FA = 0.2                   # white matter: FA above this in the brain (no T1 segmentation)
COHERENCE_FA = 0.4            # voxels that take part in the sign check
CSF_MD = 2.5                  # um2/ms: CSF voxels for the FA-in-CSF mask check
FLIPS = {"none": (1, 1, 1), "x": (-1, 1, 1), "y": (1, -1, 1), "z": (1, 1, -1)}
FLIP_MARGIN = 0.015            # a flip more coherent than the given table by this: its sign is wrong


@dataclass(frozen=True)
class TensorMaps:
    fa: np.ndarray
    md: np.ndarray                # um2/ms
    ad: np.ndarray
    rd: np.ndarray
    v1: np.ndarray                # x, y, z, 3: principal direction (voxel axes)
    residual: float               # mean |S - S_fit| / S0 over brain voxels and DW volumes
    predicted: np.ndarray         # x, y, z, volume: the fitted signal (brain only)


def fit_tensor(data: np.ndarray, mask: np.ndarray, grads: Gradients) -> TensorMaps:
    """dipy's WLS fit in the mask, then maps, the fitted signal and its residual from the mask's
    voxels only (dipy's own ``predict`` and map properties cover the whole grid: 19.9 % over the
    bare fit on the Philips series, bench/dwi.py)."""
    gtab = gradient_table(grads.bvals, bvecs=grads.bvecs, b0_threshold=B0_MAX)
    fit = TensorModel(gtab, fit_method="WLS").fit(data, mask=mask)
    evals, q = fit.evals[mask], fit.quadratic_form[mask]
    s0 = data[..., grads.b0].mean(axis=-1)[mask]
    adc = np.einsum("vi,nij,vj->nv", gtab.bvecs, q, gtab.bvecs)
    fitted = (s0[:, None] * np.exp(-gtab.bvals[None, :] * adc)).astype(np.float32)
    predicted = np.zeros(data.shape, np.float32)
    predicted[mask] = fitted
    dw, ok = ~grads.b0, s0 > 0
    residual = float(np.mean(np.abs(data[mask][ok][:, dw] - fitted[ok][:, dw]) / s0[ok][:, None]))

    def grid(values: np.ndarray, scale: float = 1.0) -> np.ndarray:
        out = np.zeros(mask.shape, np.float32)
        out[mask] = np.nan_to_num(values * scale, nan=0.0, posinf=0.0, neginf=0.0)
        return out

    v1 = np.zeros(mask.shape + (3,))
    v1[mask] = np.nan_to_num(fit.evecs[mask][..., 0])
    return TensorMaps(grid(dti.fractional_anisotropy(evals)).clip(0, 1), grid(dti.mean_diffusivity(evals), UM2_PER_MS),
                      grid(dti.axial_diffusivity(evals), UM2_PER_MS), grid(dti.radial_diffusivity(evals), UM2_PER_MS),
                      v1, residual, predicted)


def _along(v: np.ndarray, core: np.ndarray, zooms: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel of ``core``: summed ``|v(p) . v(q)|`` over the voxels ``q`` one step along ``v(p)``
    both ways that are in ``core`` too, and how many there were."""
    points = np.argwhere(core)
    d = v[core] / np.asarray(zooms[:3], dtype=float)
    d /= np.abs(d).max(axis=1, keepdims=True).clip(1e-9)       # one voxel along the largest axis
    total, count = np.zeros(len(points)), np.zeros(len(points))
    for sign in (1, -1):
        q = np.rint(points + sign * d).astype(int)
        ok = np.flatnonzero(np.all((q >= 0) & (q < np.asarray(core.shape)), axis=1))
        ok = ok[core[q[ok, 0], q[ok, 1], q[ok, 2]]]
        qq = q[ok]
        total[ok] += np.abs(np.einsum("ij,ij->i", v[core][ok], v[qq[:, 0], qq[:, 1], qq[:, 2]]))
        count[ok] += 1
    return total, count


def coherence(v1: np.ndarray, fa: np.ndarray, zooms: tuple[float, ...]) -> dict[str, float]:
    """Per axis flip of the table (:data:`FLIPS`): how much more coherent the flipped table's
    principal directions are than the given table's, as mean ``|v1(p) . v1(q)|`` over white-matter
    voxels ``p`` (FA > 0.4) whose direction the flip turns by more than 45 degrees, and the voxels
    ``q`` one step along ``v1(p)``. Negative for every flip when the table is right.

    Measured on the Philips 12-direction series of ../shared/data: the given table leads every
    flip by 0.031 to 0.052; with one axis's sign planted wrong, the flip that undoes it leads by
    0.031 (y) to 0.052 (x), and it leads the other flips.
    """
    core = fa > COHERENCE_FA
    given_total, given_count = _along(v1, core, zooms)
    gains = {}
    for name, flip in FLIPS.items():
        if name == "none":
            continue
        v = v1 * np.asarray(flip, dtype=float)
        total, count = _along(v, core, zooms)
        turned = np.abs(np.einsum("ij,ij->i", v1[core], v[core])) < np.cos(np.radians(45))
        use = turned & (count > 0) & (given_count > 0)
        gains[name] = (float(total[use].sum() / count[use].sum() - given_total[use].sum() / given_count[use].sum())
                       if use.any() else float("nan"))
    return gains


def slice_dropout(data: np.ndarray, predicted: np.ndarray, mask: np.ndarray, grads: Gradients,
                  ratio: float = 0.7, min_voxels: int = 100) -> np.ndarray:
    """(volume, slice) pairs of DW volumes whose measured signal in the slice's brain is below
    ``ratio`` times the tensor's prediction (slices are the third voxel axis, as dcm2niix writes
    an axial EPI); an array of shape (n, 2)."""
    found = []
    for v in np.flatnonzero(~grads.b0):
        for z in range(data.shape[2]):
            m = mask[:, :, z]
            if m.sum() < min_voxels:
                continue
            expected = float(predicted[:, :, z, v][m].mean())
            if expected > 0 and float(data[:, :, z, v][m].mean()) < ratio * expected:
                found.append((int(v), z))
    return np.array(found, dtype=int).reshape(-1, 2)
