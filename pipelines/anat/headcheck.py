"""Is the object a head? Three values the QC gate judges (``QC.head_check`` in the sidecar).

The brain-plausibility limits (TIV, tissue fractions) do not tell a head from another object of a
head's size: a GE 3D T1 of a fruit had a TIV of 1942 cm3 and a GM fraction of 0.58. What a head
has and a fruit, a phantom or a misfiled image lacks:

``template_correlation``
    Pearson correlation, inside the brain mask, between the bias-corrected image and the MNI152
    template T1 resampled onto it through the registration: the brain's own pattern (white
    matter, cortex, ventricles) in the right place.
``tissue_order``
    T1 contrast in the order a T1-weighted brain has it, WM > GM > CSF, measured in the voxels
    where the registered template is sure of each tissue (so it does not depend on how the EM
    named its classes): ``min(WM - GM, GM - CSF) / WM`` of the mean intensities; negative when
    the order is broken.
``scalp_margin_mm``
    Median distance from the brain mask's surface to the air outside the head: scalp, skull and
    CSF around a brain. A brain fitted into an object reaches the object's surface; a
    skull-stripped brain has almost none.

The limits the gate applies, and the values measured on the real T1s of ../shared/data and on
the non-heads made from them (tests/pipelines/nonheads.py), are in data_contracts/qc_settings.py;
bench/qc_calibration.py prints the whole table. No single value catches every non-head (a bottle
phantom keeps a head's tissue order and margin, an inverted head its margin, a skull-stripped
brain its correlation), so all three are judged.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: A voxel counts for a tissue's mean where the registered template's map of it is above these.
SURE = {"GM": 0.7, "WM": 0.9, "CSF": 0.9}
#: Fewest voxels a tissue's mean is taken over.
MIN_VOXELS = 50
#: The band at the field of view's faces where the head mask's closing (two iterations) removes
#: head voxels: no air there counts for the scalp margin.
EDGE_VOXELS = 2


def template_correlation(image: np.ndarray, template_t1: np.ndarray, mask: np.ndarray) -> float:
    """Pearson r of ``image`` and the template T1 on its grid, over ``mask`` (NaN if flat)."""
    a = image[mask].astype(np.float64)
    b = template_t1[mask].astype(np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def tissue_order(image: np.ndarray, priors: dict[str, np.ndarray], mask: np.ndarray) -> float:
    """``min(WM - GM, GM - CSF) / WM`` of the mean intensities where the template is sure of each.

    NaN when a tissue has fewer than :data:`MIN_VOXELS` sure voxels in the mask, or WM's mean
    is not positive.
    """
    means = {}
    for tissue, limit in SURE.items():
        voxels = image[mask & (priors[tissue] > limit)]
        if voxels.size < MIN_VOXELS:
            return float("nan")
        means[tissue] = float(voxels.mean(dtype=np.float64))
    if means["WM"] <= 0:
        return float("nan")
    return min(means["WM"] - means["GM"], means["GM"] - means["CSF"]) / means["WM"]


def scalp_margin_mm(brain: np.ndarray, head: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Median distance (mm) from the brain mask's surface voxels to the nearest voxel outside ``head``.

    Air within :data:`EDGE_VOXELS` of the field of view's faces does not count: the head mask's
    closing (``bias.head_mask``) strips that band wherever the head touches a face, and a head cut
    by the field of view is a coverage question (``coverage``, ``fov_cut``), not a shape one.
    """
    surface = brain & ~ndimage.binary_erosion(brain)
    air = ~head
    for axis in range(air.ndim):
        index = [slice(None)] * air.ndim
        index[axis] = np.r_[0:EDGE_VOXELS, air.shape[axis] - EDGE_VOXELS:air.shape[axis]]
        air[tuple(index)] = False
    if not surface.any() or not air.any():  # no air in the field of view: nothing to measure from
        return float("nan")
    depth = ndimage.distance_transform_edt(~air, sampling=spacing)
    return float(np.median(depth[surface]))


def head_check(image: np.ndarray, template_t1: np.ndarray, priors: dict[str, np.ndarray],
               brain: np.ndarray, head: np.ndarray, spacing: tuple[float, ...]
               ) -> dict[str, float | None]:
    """The three values, for the sidecar's ``QC.head_check`` (None where one cannot be measured:
    JSON has no NaN, and the gate fails a metric that is missing)."""
    values = {
        "template_correlation": template_correlation(image, template_t1, brain),
        "tissue_order": tissue_order(image, priors, brain),
        "scalp_margin_mm": scalp_margin_mm(brain, head, spacing),
    }
    return {k: (v if np.isfinite(v) else None) for k, v in values.items()}
