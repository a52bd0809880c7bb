"""The ``dwi`` pipeline's stages on one diffusion series, from its NIfTI and gradient table to maps,
measures and QC values (no files written here: :mod:`pipelines.dwi.run` writes them).

1. gradient table read and checked (:mod:`pipelines.dwi.gradients`): refusals, never a number
   from a table a tensor cannot be fitted to;
2. brain mask from the mean b0 (dipy's ``median_otsu``);
3. slice dropout, judged on the data as acquired against a first tensor fit (after correction,
   the slab's first and last slices lose the signal the transform moves out of the field of
   view, which is not dropout); then motion and eddy-current correction
   (:mod:`pipelines.dwi.motion`), b-vectors rotated;
4. tensor fit by weighted least squares, FA, MD, AD, RD (:mod:`pipelines.dwi.tensor`);
5. white matter: FA above 0.2 in the brain eroded by one voxel, the measures ``*_WM`` every run
   reports (one definition across a trial, whether a session has a T1 or not); and, when the run
   is given the same session's T1 and its anat segmentation, the T1's white matter registered
   onto the b0 (:mod:`pipelines.dwi.anatomy`), the measures ``*_T1WM``. The FA threshold keeps
   only coherent white matter (FA_WM runs higher than FA_T1WM, which includes crossing fibres).

No regional atlas values: no installed package ships a volumetric atlas (nilearn's and dipy's
atlases are fetched from the internet at run time, which these machines refuse).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from dipy.segment.mask import median_otsu
from scipy import ndimage

from pipelines.dwi.anatomy import T1Unusable, t1_tissues, t1_white_matter
from pipelines.dwi.errors import DwiInputError, DwiProcessingError
from pipelines.dwi.gradients import Gradients, distinct_directions, read_gradients
from pipelines.dwi.motion import correct, rotate_bvecs, shell_means
from pipelines.dwi.tensor import CSF_MD, FLIP_MARGIN, WM_FA, coherence, fit_tensor, slice_dropout

MIN_BRAIN_ML = 400.0          # a smaller mask is no brain (or a failed mask)

MEASURES = {
    "FA_WM": ("1", "fractional anisotropy, mean over white matter (FA > 0.2 in the eroded brain mask)"),
    "MD_WM": ("um2/ms", "mean diffusivity, mean over white matter"),
    "AD_WM": ("um2/ms", "axial diffusivity (first eigenvalue), mean over white matter"),
    "RD_WM": ("um2/ms", "radial diffusivity (mean of the second and third eigenvalues), mean over white matter"),
    "WM_volume": ("mm3", "volume of the white-matter mask"),
    "FA_T1WM": ("1", "fractional anisotropy, mean over the same session's T1 white matter (registered to the b0)"),
    "MD_T1WM": ("um2/ms", "mean diffusivity, mean over the T1 white matter"),
    "AD_T1WM": ("um2/ms", "axial diffusivity, mean over the T1 white matter"),
    "RD_T1WM": ("um2/ms", "radial diffusivity, mean over the T1 white matter"),
    "T1WM_volume": ("mm3", "volume of the T1 white matter on the DWI grid (voxels at least half white matter)"),
}
#: Reported only when the run is given the session's T1 and the registration is accepted.
OPTIONAL_MEASURES = ("FA_T1WM", "MD_T1WM", "AD_T1WM", "RD_T1WM", "T1WM_volume")


@dataclass
class DwiMaps:
    fa: np.ndarray
    md: np.ndarray
    ad: np.ndarray
    rd: np.ndarray
    b0: np.ndarray
    brain_mask: np.ndarray
    wm_mask: np.ndarray
    measures: dict[str, float]
    qc: dict = field(default_factory=dict)
    t1_wm_mask: np.ndarray | None = None      # the T1's white matter on this grid, when accepted


def load_dwi(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:   # nibabel raises many kinds for a damaged file
        raise DwiInputError("not_dwi", f"{path.name}: cannot be read ({' '.join(str(exc).split())})") from None
    if data.ndim != 4 or data.shape[3] < 2:
        raise DwiInputError("not_dwi", f"{path.name}: shape {data.shape} is not a 4D series")
    empty = [int(v) for v in range(data.shape[3]) if not np.any(data[..., v])]
    if empty:
        raise DwiInputError("incomplete", f"{path.name}: volumes {empty} hold no signal")
    return img, np.clip(np.nan_to_num(data), 0, None)


def brain_mask(b0: np.ndarray) -> np.ndarray:
    _, mask = median_otsu(b0, median_radius=2, numpass=1)
    labels, n = ndimage.label(mask)
    if n > 1:
        mask = labels == 1 + int(np.argmax(ndimage.sum_labels(mask, labels, range(1, n + 1))))
    return ndimage.binary_fill_holes(mask)


def compute(path: Path, shells: list[float] | None = None, volumes: int | None = None,
            motion: bool = True, t1w: Path | None = None, t1w_dseg: Path | None = None) -> DwiMaps:
    clock = time.perf_counter()
    img, data = load_dwi(path)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    grads = read_gradients(path, data.shape[3], img.affine, shells, volumes)
    b0 = data[..., grads.b0].mean(axis=-1)
    mask = brain_mask(b0)
    voxel_mm3 = float(np.prod(zooms))
    if mask.sum() * voxel_mm3 / 1000 < MIN_BRAIN_ML:
        raise DwiInputError("no_brain", f"{path.name}: the b0's foreground is {mask.sum() * voxel_mm3 / 1000:.0f} ml "
                                        f"(< {MIN_BRAIN_ML:.0f}): no brain in the field of view (a phantom?)")
    qc: dict = {"volumes": int(data.shape[3]), "b0_volumes": int(grads.b0.sum()),
                "directions": distinct_directions(grads.bvecs[~grads.b0]), "shells": grads.shells,
                "bvalues": sorted({float(b) for b in grads.bvals})}
    dropout = slice_dropout(data, fit_tensor(data, mask, grads).predicted, mask, grads)
    if motion:
        t = time.perf_counter()
        moved = correct(data, zooms, mask, shell_means(data, grads))
        data = moved.corrected
        grads = Gradients(grads.bvals, np.where(grads.b0[:, None], grads.bvecs,
                                                rotate_bvecs(grads.bvecs, moved.rotations)))
        b0 = data[..., grads.b0].mean(axis=-1)
        qc["motion"] = {"mean_displacement_mm": float(moved.displacement_mm.mean()),
                        "max_displacement_mm": float(moved.displacement_mm.max()),
                        "max_rotation_deg": float(moved.rotation_deg.max()),
                        "displacement_mm": [round(float(x), 3) for x in moved.displacement_mm],
                        "seconds": round(time.perf_counter() - t, 2)}
    tensor = fit_tensor(data, mask, grads)
    eroded = ndimage.binary_erosion(mask, iterations=1)
    wm = eroded & (tensor.fa > WM_FA)
    if not wm.any():
        raise DwiProcessingError(f"{path.name}: no voxel of FA > {WM_FA} in the brain: no white matter to measure")
    measures = {"FA_WM": float(tensor.fa[wm].mean()), "MD_WM": float(tensor.md[wm].mean()),
                "AD_WM": float(tensor.ad[wm].mean()), "RD_WM": float(tensor.rd[wm].mean()),
                "WM_volume": float(wm.sum() * voxel_mm3)}
    t1_wm = None
    if t1w is not None and t1w_dseg is not None:
        try:
            tissues = t1_tissues(tensor.fa, mask, img.affine, t1w, t1w_dseg)
            # the eroded brain, as for the FA-threshold white matter: the slab's edge slices lose
            # signal to motion correction and their tensors diverge (MD up to 1e4 um2/ms there)
            t1_wm, qc["t1w"] = t1_white_matter(tensor.fa, eroded, zooms, tissues)
        except T1Unusable as exc:   # another pipeline's files: a review, never a refusal of the site's DWI
            qc["t1w"] = {"accepted": False, "reason": str(exc)}
        qc["t1w"] |= {"image": Path(t1w).name, "dseg": Path(t1w_dseg).name}
        if t1_wm is not None:
            measures |= {"FA_T1WM": float(tensor.fa[t1_wm].mean()), "MD_T1WM": float(tensor.md[t1_wm].mean()),
                         "AD_T1WM": float(tensor.ad[t1_wm].mean()), "RD_T1WM": float(tensor.rd[t1_wm].mean()),
                         "T1WM_volume": float(t1_wm.sum() * voxel_mm3)}
    qc["wm_from_t1w"] = int(t1_wm is not None)
    qc["t1w_rejected"] = int(t1w is not None and t1_wm is None)
    gains = coherence(tensor.v1, tensor.fa, zooms)
    best = max(gains, key=lambda k: gains[k])
    csf = eroded & (tensor.md > CSF_MD)
    qc.update({
        "tensor_residual": tensor.residual,
        "dropout_slices": int(len(dropout)),
        "outlier_volumes": sorted({int(v) for v in dropout[:, 0]}),
        "fa_csf": float(tensor.fa[csf].mean()) if csf.any() else None,
        "csf_voxels": int(csf.sum()),
        "gradient_flip_gain": {k: round(v, 4) for k, v in gains.items()},
        "gradient_flip_gain_max": round(gains[best], 4),
        "gradient_flip_suspected": best if gains[best] > FLIP_MARGIN else None,
        "seconds": round(time.perf_counter() - clock, 2),
    })
    return DwiMaps(tensor.fa, tensor.md, tensor.ad, tensor.rd, b0, mask, wm, measures, qc, t1_wm)
