"""The computation of ``anat``, from a checked T1 to tissue maps and volumes.

Stages (each a function of the previous stage's output):

1. N4 bias correction inside the head (``bias``);
2. registration to the MNI152 pseudo-head template (``register``);
3. template brain mask and GM/WM/CSF priors warped onto the subject's grid,
   mask refined with the subject's own head mask;
4. edge-preserving denoising, then EM segmentation with the priors (``segment``);
5. volumes from the posteriors.

Nothing here writes files: :mod:`pipelines.anat.derivatives` does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pipelines.anat.bias import field_spread, n4_correct
from pipelines.anat.errors import AnatProcessingError
from pipelines.anat.headcheck import head_check
from pipelines.anat.io import from_sitk, to_sitk
from pipelines.anat.parameters import AnatParameters
from pipelines.anat.register import Registration, register
from pipelines.anat.segment import Segmentation, segment, tissue_volumes
from pipelines.anat.template import TISSUES, Template, load_template

log = logging.getLogger(__name__)

#: A brain mask smaller than this (mm³) means the registration or the field of view failed.
MIN_TIV_MM3 = 500_000.0


@dataclass(frozen=True)
class AnatMaps:
    """Everything ``anat`` computes for one T1, on the T1's (RAS-reoriented) grid."""

    preproc: np.ndarray          # bias-corrected T1, float32
    bias_field: np.ndarray       # N4's multiplicative field, float32
    brain_mask: np.ndarray       # bool
    posteriors: np.ndarray       # (3, x, y, z) float32, TISSUES order
    dseg: np.ndarray             # uint8, 1..3 in TISSUES order, 0 outside the mask
    measures: dict[str, float]   # name -> value (see MEASURES)
    qc: dict[str, Any] = field(default_factory=dict)


#: Measure name -> (unit, description). GM fraction is GM volume over TIV.
MEASURES: dict[str, tuple[str, str]] = {
    "TIV": ("mm3", "total intracranial volume: the brain mask "
                   "(template intracranial mask warped to the subject)"),
    "GM": ("mm3", "grey matter volume: sum of GM posteriors in the brain mask"),
    "WM": ("mm3", "white matter volume: sum of WM posteriors in the brain mask"),
    "CSF": ("mm3", "cerebrospinal fluid volume: sum of CSF posteriors in the brain mask"),
    "GM_fraction": ("1", "GM volume divided by TIV"),
}


@contextmanager
def sitk_threads(count: int) -> Iterator[None]:
    """Run SimpleITK filters on ``count`` threads inside the block, then restore.

    N4's B-spline fit and the registration metric sum over voxels in per-thread
    pieces, so their results change with the thread count (registration even
    from run to run at two threads). :func:`compute` runs them on one thread;
    every other stage is voxel-wise, so the outputs do not depend on ``threads``.
    """
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _bbox(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def warp_to_subject(
    template: Template, reg: Registration, reference: sitk.Image
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template mask, priors and T1 resampled onto the subject grid (linear interpolation)."""
    def pull(image: sitk.Image) -> np.ndarray:
        return from_sitk(sitk.Resample(image, reference, reg.to_template, sitk.sitkLinear, 0.0,
                                       sitk.sitkFloat32))
    return pull(template.mask), np.stack([pull(p) for p in template.priors]), pull(template.t1)


def refine_mask(warped_mask: np.ndarray, head: np.ndarray, threshold: float) -> np.ndarray:
    """Warped template mask cut at ``threshold``, within the head, one component, no holes."""
    mask = (warped_mask >= threshold) & head
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask)


def fov_coverage(template: Template, reg: Registration, subject: sitk.Image) -> float:
    """Fraction of the template brain that the affine maps inside the subject's field of view."""
    brain = sitk.Shrink(template.mask, [2, 2, 2]) > 0.5
    ones = sitk.Image(subject.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(subject)
    inside = sitk.Resample(ones, brain, reg.affine, sitk.sitkNearestNeighbor, 0)
    b = sitk.GetArrayViewFromImage(brain) > 0
    return float((sitk.GetArrayViewFromImage(inside)[b] > 0).mean())


def denoise(block: np.ndarray, spacing: tuple[float, ...], iterations: int) -> np.ndarray:
    """Edge-preserving smoothing (ITK curvature flow) of a NIfTI-ordered block.

    The Gaussian classes of the EM widen with noise, which moves the GM/WM
    boundary: on a clean 1 mm T1 with 2 % Rician noise added, WM grew by 2.2 %
    without this step and by 1.0 % with it.
    """
    if iterations <= 0:
        return block
    image = sitk.GetImageFromArray(np.ascontiguousarray(block.transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    return from_sitk(sitk.CurvatureFlow(image, timeStep=0.0625, numberOfIterations=iterations))


def measures_from(posteriors: np.ndarray, mask: np.ndarray, voxel_mm3: float) -> dict[str, float]:
    """TIV, tissue volumes (mm³) and GM fraction from posteriors in ``mask``."""
    tiv = float(mask.sum()) * voxel_mm3
    vols = tissue_volumes(posteriors, mask, voxel_mm3)
    out = {"TIV": tiv, **{t: float(v) for t, v in zip(TISSUES, vols)}}
    out["GM_fraction"] = out["GM"] / tiv
    return out


def compute(img: nib.Nifti1Image, params: AnatParameters) -> AnatMaps:
    """Run stages 1-5 on a checked, RAS-reoriented T1 (see :func:`io.load_t1`).

    Raises
    ------
    AnatProcessingError
        When registration diverges or the brain mask is implausibly small.
    """
    clock = time.perf_counter()
    template = load_template()
    subject = to_sitk(img)
    with sitk_threads(1):
        bias = n4_correct(subject, grid_mm=params.n4_grid_mm, iterations=params.n4_iterations,
                          control_points=params.n4_control_points,
                          convergence=params.n4_convergence)
        log.info("stage 1 N4 bias correction done (%.1f s)", time.perf_counter() - clock)
        reg = register(bias.corrected, bias.head_mask, template.t1, template.mask, params)
        log.info("stage 2 registration done (%.1f s, volume scale %.3f)", time.perf_counter() - clock,
                 float(np.linalg.det(np.array(reg.affine.GetMatrix()).reshape(3, 3))))
    with sitk_threads(params.threads):
        warped_mask, priors, warped_t1 = warp_to_subject(template, reg, bias.corrected)
        head = from_sitk(bias.head_mask) > 0
        mask = refine_mask(warped_mask, head, params.mask_threshold)
        voxel_mm3 = float(abs(np.linalg.det(img.affine[:3, :3])))
        if mask.sum() * voxel_mm3 < MIN_TIV_MM3:
            raise AnatProcessingError(
                f"brain mask is {mask.sum() * voxel_mm3 / 1000:.0f} cm3 "
                f"(< {MIN_TIV_MM3 / 1000:.0f}): registration failed or the field of view "
                "misses the brain"
            )
        preproc = from_sitk(bias.corrected)
        posteriors, seg = _segment_in_box(preproc, mask, priors, bias.corrected.GetSpacing(), params)
        log.info("stages 3-4 mask and segmentation done (%.1f s)", time.perf_counter() - clock)
        qc = {
            "bias_field": field_spread(bias.field, sitk_mask(mask, bias.field)),
            "registration_metric": reg.metric,
            "affine_volume_scale": float(np.linalg.det(np.array(reg.affine.GetMatrix()).reshape(3, 3))),
            "template_brain_in_fov": fov_coverage(template, reg, subject),
            "tissue_means": dict(zip(TISSUES, seg.means)),
            "tissue_sds": dict(zip(TISSUES, seg.sds)),
            "em_iterations": seg.iterations,
            "head_check": head_check(preproc, warped_t1, dict(zip(TISSUES, priors)), mask, head,
                                     bias.corrected.GetSpacing()),
        }
    dseg = np.where(mask, 1 + np.argmax(posteriors, axis=0), 0).astype(np.uint8)
    return AnatMaps(preproc=preproc, bias_field=from_sitk(bias.field), brain_mask=mask,
                    posteriors=posteriors, dseg=dseg,
                    measures=measures_from(posteriors, mask, voxel_mm3), qc=qc)


def _segment_in_box(
    preproc: np.ndarray, mask: np.ndarray, priors: np.ndarray,
    spacing: tuple[float, ...], params: AnatParameters,
) -> tuple[np.ndarray, Segmentation]:
    """Denoise and segment inside the mask's bounding box (a third of a head's voxels)."""
    box = _bbox(mask)
    smooth = denoise(preproc[box], spacing, params.denoise_iterations)
    seg = segment(smooth, mask[box], priors[(slice(None),) + box],
                  prior_weight=params.prior_weight, mrf_beta=params.mrf_beta,
                  max_iterations=params.em_max_iterations, tolerance=params.em_tolerance,
                  mrf_iterations=params.mrf_iterations)
    posteriors = np.zeros((len(TISSUES),) + mask.shape, dtype=np.float32)
    posteriors[(slice(None),) + box] = seg.posteriors
    return posteriors, seg


def sitk_mask(mask: np.ndarray, like: sitk.Image) -> sitk.Image:
    """A uint8 SimpleITK image of a NIfTI-ordered boolean array, on ``like``'s grid."""
    out = sitk.GetImageFromArray(mask.transpose(2, 1, 0).astype(np.uint8))
    out.CopyInformation(like)
    return out
