"""Stage 5b: white matter from the same session's T1 segmentation, when the run is given one.

The anat pipeline's bias-corrected T1 (``desc-preproc_T1w``) and its tissue labels (``dseg``: 1 GM,
2 WM, 3 CSF) are registered onto the DWI: rigid (the same head), SimpleITK Mattes mutual
information of the FA map (white matter bright, as on a T1) against the T1's brain (dseg > 0),
over the DWI's brain mask, three pyramid levels, on one thread (the result does not depend on
the thread count). Two starts, the better final metric kept: the scanner coordinates (a same-
session pair shares them) and the brains' centres of mass (a DWI slab's centre is not the whole
brain's, so that start alone can be centimetres off in z). No non-linear step: the EPI
distortion stays, which is why a voxel counts as white matter only when most of it is.

Each label is pulled onto the DWI grid as the fraction of the voxel it fills: resampled onto a
grid twice as fine (linear) and averaged over each 2x2x2 block.

The T1 is taken only when the tensor agrees: FA in its white matter at least ``MIN_FA_CONTRAST``
times FA in its grey matter, and higher than with both masks moved ``PROBE_MM`` along any axis
(the registration sits at the best fit near it). Measured with the Philips DWI of ../shared/data
(2 mm, 12 directions: noise lifts grey-matter FA to ~0.29, so the contrast of a good fit is ~1.5,
not the 2-3 of high-SNR data) and the anat pipeline's run on the Philips MPRAGE of ../shared/data:

=======================================  =============  ===========  ===========
T1 given                                 contrast       moved 8 mm   taken
=======================================  =============  ===========  ===========
the Philips MPRAGE                       1.50           1.36         yes
the same, moved 6 mm and rotated 5 deg   1.50           1.36         yes
another head (niivue chris_t1)           1.41           1.32         yes
the MPRAGE moved 37 mm and 15 deg        1.30           1.34         no
random labels                            1.01           1.01         no
=======================================  =============  ===========  ===========

Another subject's head fits as well as rigid can: the check is that the registration worked,
not whose head it is (the flow gives the dwi pipeline the T1 of the same session). A rejected T1
leaves the FA-threshold white matter alone, and the QC sidecar says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from pipelines.anat.io import to_sitk

GM, WM = 1, 2                   # pipelines.anat.derivatives.DSEG_LOOKUP
MIN_FRACTION = 0.5              # a DWI voxel is white matter when at least half of it is
MIN_FA_CONTRAST = 1.2          # FA(T1 WM) / FA(T1 GM) below this: not this DWI's tissues
PROBE_MM = 8.0                 # the registration must fit FA better than itself moved this far
STARTS = ("header", "moments")
SAMPLING, SEED, ITERATIONS = 0.2, 20261207, 100


class T1Unusable(Exception):
    """The T1 or its labels cannot be read, or are not a pair: the DWI is measured without them."""


@dataclass(frozen=True)
class T1Tissues:
    """The T1's tissues on the DWI grid and how they got there."""

    wm_fraction: np.ndarray       # fraction of each DWI voxel that is T1 white matter
    gm_fraction: np.ndarray
    transform: np.ndarray         # 4x4 world (LPS, mm): DWI point -> T1 point
    metric: float                 # final Mattes MI (negative: lower is better)
    start: str                    # which start gave it: "header" or "moments"


def load_t1(t1w: Path, dseg: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The T1 and its labels, checked to share a grid (an anat run writes both on the T1's)."""
    try:
        img, labels = nib.load(str(t1w)), nib.load(str(dseg))
        data = np.asarray(labels.dataobj)
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise T1Unusable(f"{Path(t1w).name} / {Path(dseg).name}: not readable NIfTI ({exc})") from None
    if img.shape[:3] != labels.shape[:3] or not np.allclose(img.affine, labels.affine, atol=1e-3):
        raise T1Unusable(f"{Path(dseg).name} is not on the grid of {Path(t1w).name}: not an anat run's pair")
    if not (data == WM).any():
        raise T1Unusable(f"{Path(dseg).name}: no voxel labelled white matter ({WM})")
    return img, data


def _as_image(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    return sitk.Cast(to_sitk(nib.Nifti1Image(np.asarray(data, np.float32), affine)), sitk.sitkFloat32)


def register_t1(fa: np.ndarray, brain: np.ndarray, dwi_affine: np.ndarray, t1: nib.Nifti1Image,
                labels: np.ndarray, start: str = "header") -> tuple[sitk.Euler3DTransform, float]:
    """Rigid transform mapping DWI points into the T1 (Mattes MI of the FA map against the T1's
    brain), started from the scanner coordinates (``"header"``) or from the brains' centres of
    mass (``"moments"``). Returns the transform and its final metric (lower is better)."""
    fixed = _as_image(np.where(brain, fa, 0), dwi_affine)
    moving = _as_image(np.where(labels > 0, np.asarray(t1.dataobj, np.float32), 0), t1.affine)
    fixed_mask = sitk.Cast(_as_image(brain, dwi_affine) > 0.5, sitk.sitkUInt8)
    if start == "moments":
        transform = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
            _as_image(brain, dwi_affine), _as_image(labels > 0, t1.affine), sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS))
    else:
        transform = sitk.Euler3DTransform()
        transform.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(SAMPLING, SEED)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=ITERATIONS,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([4.0, 2.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        reg.Execute(fixed, moving)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    return transform, float(reg.GetMetricValue())


def fractions(labels: np.ndarray, t1_affine: np.ndarray, dwi_affine: np.ndarray, dwi_shape: tuple[int, ...],
              transform: sitk.Transform, values: tuple[int, ...] = (WM, GM)) -> list[np.ndarray]:
    """The fraction of each DWI voxel each label fills: resampled onto a grid twice as fine along
    each axis (linear), then averaged over each 2x2x2 block."""
    fine_affine = dwi_affine.copy()
    fine_affine[:3, :3] = dwi_affine[:3, :3] / 2
    fine_affine[:3, 3] = dwi_affine[:3, :3] @ np.full(3, -0.25) + dwi_affine[:3, 3]
    shape = tuple(2 * int(n) for n in dwi_shape[:3])
    reference = _as_image(np.zeros(shape, np.float32), fine_affine)
    out = []
    for value in values:
        moving = _as_image(labels == value, t1_affine)
        fine = sitk.GetArrayFromImage(sitk.Resample(moving, reference, transform, sitk.sitkLinear, 0.0,
                                                    sitk.sitkFloat32)).transpose(2, 1, 0)
        nx, ny, nz = dwi_shape[:3]
        out.append(fine.reshape(nx, 2, ny, 2, nz, 2).mean(axis=(1, 3, 5)))
    return out


def t1_tissues(fa: np.ndarray, brain: np.ndarray, dwi_affine: np.ndarray, t1w: Path, dseg: Path) -> T1Tissues:
    """The T1's white and grey matter on the DWI grid: registered from both starts, the better
    final metric kept (see the module docstring)."""
    t1, labels = load_t1(t1w, dseg)
    runs = [(*register_t1(fa, brain, dwi_affine, t1, labels, start), start) for start in STARTS]
    transform, metric, start = min(runs, key=lambda r: r[1])
    wm, gm = fractions(labels, t1.affine, dwi_affine, fa.shape, transform)
    matrix = np.eye(4)
    m = np.array(transform.GetMatrix()).reshape(3, 3)
    c, t = np.array(transform.GetCenter()), np.array(transform.GetTranslation())
    matrix[:3, :3], matrix[:3, 3] = m, t + c - m @ c
    return T1Tissues(wm, gm, matrix, metric, start)


def _shifted(mask: np.ndarray, axis: int, n: int) -> np.ndarray:
    out = np.roll(mask, n, axis=axis)
    edge = [slice(None)] * 3
    edge[axis] = slice(0, n) if n > 0 else slice(n, None)
    out[tuple(edge)] = False
    return out


def fa_contrast(fa: np.ndarray, wm: np.ndarray, gm: np.ndarray) -> float:
    """Mean FA in ``wm`` over mean FA in ``gm`` (0 when either is empty)."""
    if not wm.any() or not gm.any():
        return 0.0
    return float(fa[wm].mean() / max(float(fa[gm].mean()), 1e-6))


def t1_white_matter(fa: np.ndarray, brain: np.ndarray, zooms: tuple[float, ...],
                    tissues: T1Tissues) -> tuple[np.ndarray | None, dict]:
    """White matter from the T1 when the tensor agrees with the registration, and the QC values.

    Accepted when FA contrast (white over grey matter) is at least ``MIN_FA_CONTRAST`` and no
    copy of both masks moved ``PROBE_MM`` along an axis fits the FA map better. Returns the mask
    (None when rejected) and the QC values.
    """
    wm = brain & (tissues.wm_fraction >= MIN_FRACTION)
    gm = brain & (tissues.gm_fraction >= MIN_FRACTION)
    contrast = fa_contrast(fa, wm, gm)
    probes = [fa_contrast(fa, _shifted(wm, ax, n), _shifted(gm, ax, n))
              for ax in range(3) for step in [max(1, round(PROBE_MM / zooms[ax]))] for n in (-step, step)]
    qc: dict = {"wm_voxels": int(wm.sum()), "gm_voxels": int(gm.sum()), "mattes_mi": round(tissues.metric, 4),
                "start": tissues.start, "fa_contrast": round(contrast, 3),
                "fa_contrast_moved_max": round(max(probes), 3)}
    if contrast < MIN_FA_CONTRAST:
        why = (f"FA in the registered T1's white matter is {contrast:.2f} times FA in its grey matter "
               f"(< {MIN_FA_CONTRAST}): these tissues are not this DWI's")
    elif contrast < max(probes):
        why = (f"the T1's tissues moved {PROBE_MM:.0f} mm fit the FA map better ({max(probes):.2f} against "
               f"{contrast:.2f}): the registration did not converge")
    else:
        return wm, qc | {"accepted": True, "reason": None}
    return None, qc | {"accepted": False, "reason": why}
