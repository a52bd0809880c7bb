"""Stage 0: the gradient table, read and checked before anything is computed.

dcm2niix writes ``.bval`` (one b-value per volume, s/mm2) and ``.bvec`` (three rows, FSL's
convention: the directions in the voxel axes, with x negated when the image's voxel-to-world
matrix has a positive determinant). Volumes with b <= :data:`B0_MAX` are b0s (Philips writes
0.001 ... 0.004 for its interleaved b0s, with a direction).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.dwi.errors import DwiInputError

B0_MAX = 50.0                 # s/mm2: dipy's default b0_threshold
UNIT_TOLERANCE = 0.05         # |1 - |g|| allowed for a diffusion-weighted direction
SHELL_TOLERANCE = 0.05        # a b-value within 5 % of a protocol shell belongs to it
MIN_DIRECTIONS = 6


@dataclass(frozen=True)
class Gradients:
    bvals: np.ndarray             # volume
    bvecs: np.ndarray             # volume, 3: unit directions in the voxel axes (b0 rows as given)

    @property
    def b0(self) -> np.ndarray:
        return self.bvals <= B0_MAX

    @property
    def shells(self) -> list[float]:
        """The distinct b-values of the diffusion-weighted volumes, rounded to 10 s/mm2."""
        return sorted({float(round(b, -1)) for b in self.bvals[~self.b0]})


def sidecars(image: Path) -> tuple[Path, Path]:
    stem = image.name.removesuffix(".gz").removesuffix(".nii")
    return image.with_name(stem + ".bval"), image.with_name(stem + ".bvec")


def design_rank(bvecs: np.ndarray) -> int:
    """Rank of the tensor's design matrix over these directions: 6 when the tensor is determined."""
    g = bvecs
    rows = np.column_stack([g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2,
                            2 * g[:, 0] * g[:, 1], 2 * g[:, 0] * g[:, 2], 2 * g[:, 1] * g[:, 2]])
    return int(np.linalg.matrix_rank(rows, tol=1e-3)) if len(g) else 0


def distinct_directions(bvecs: np.ndarray, degrees: float = 5.0) -> int:
    """Directions more than ``degrees`` apart (a direction and its opposite are one)."""
    kept: list[np.ndarray] = []
    cos = np.cos(np.radians(degrees))
    for g in bvecs:
        if all(abs(float(g @ k)) < cos for k in kept):
            kept.append(g)
    return len(kept)


def read_gradients(image: Path, n_volumes: int, voxel_to_world: np.ndarray,
                   shells: list[float] | None = None, volumes: int | None = None) -> Gradients:
    """The checked table of ``image``; :class:`DwiInputError` names what makes it unusable."""
    bval_path, bvec_path = sidecars(image)
    try:
        bvals = np.atleast_1d(np.loadtxt(bval_path, dtype=float))
        bvecs = np.atleast_2d(np.loadtxt(bvec_path, dtype=float))
    except (OSError, ValueError) as exc:
        raise DwiInputError("missing_gradients", f"{image.name}: {exc}") from None
    if bvecs.shape[0] != 3 and bvecs.shape[-1] == 3:
        bvecs = bvecs.T
    if bvals.ndim != 1 or bvecs.shape != (3, bvals.size) or bvals.size != n_volumes:
        raise DwiInputError("gradients_mismatch", f"{image.name}: {n_volumes} volumes, {bvals.size} b-values in "
                                                  f"{bval_path.name}, {bvecs.shape} directions in {bvec_path.name}")
    if volumes is not None and n_volumes < volumes:
        raise DwiInputError("incomplete", f"{image.name}: {n_volumes} volumes, the protocol has {volumes}")
    g = bvecs.T.copy()
    if np.linalg.det(voxel_to_world[:3, :3]) > 0:      # FSL's convention: undo its x flip
        g[:, 0] = -g[:, 0]
    grad = Gradients(bvals, g)
    if not grad.b0.any():
        raise DwiInputError("no_b0", f"{image.name}: lowest b-value {bvals.min():g} s/mm2 (b0 <= {B0_MAX:g})")
    dw = g[~grad.b0]
    norms = np.linalg.norm(dw, axis=1)
    if np.any(np.abs(norms - 1) > UNIT_TOLERANCE):
        bad = int(np.argmax(np.abs(norms - 1)))
        raise DwiInputError("bvec_not_unit", f"{image.name}: diffusion-weighted direction {bad} has length "
                                             f"{norms[bad]:.3f} in {bvec_path.name}")
    if design_rank(dw) < MIN_DIRECTIONS:
        raise DwiInputError("too_few_directions", f"{image.name}: {distinct_directions(dw)} distinct directions, "
                                                  f"tensor design rank {design_rank(dw)} < {MIN_DIRECTIONS}")
    if shells:
        off = [float(b) for b in bvals[~grad.b0]
               if not any(abs(b - s) <= SHELL_TOLERANCE * s for s in shells)]
        if off:
            raise DwiInputError("bvalues_mismatch", f"{image.name}: b-values {sorted(set(off))} are not the "
                                                    f"protocol's shells {shells}")
    return Gradients(bvals, g / np.where(grad.b0, 1.0, np.linalg.norm(g, axis=1))[:, None].clip(1e-9))
