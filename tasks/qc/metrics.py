"""Image quality metrics of a structural MRI, the MRIQC way: small pure functions.

Catalogue (direction: which way is better):

snr_gm, snr_wm (higher)
    Signal-to-noise ratio inside a tissue: :math:`\\mu_T / (\\sigma_T \\sqrt{n/(n-1)})`
    (MRIQC ``snr``; Esteban et al. 2017, doi:10.1371/journal.pone.0184661).
cnr (higher)
    Contrast-to-noise ratio: :math:`|\\mu_{WM}-\\mu_{GM}| / \\sqrt{\\sigma_{air}^2+\\sigma_{GM}^2+\\sigma_{WM}^2}`
    (Magnotta & Friedman 2006, doi:10.1007/s10278-006-0264-x).
cjv (lower)
    Coefficient of joint variation of GM and WM: :math:`(\\sigma_{WM}+\\sigma_{GM})/|\\mu_{WM}-\\mu_{GM}|`,
    sensitive to noise and intensity non-uniformity (Ganzetti et al. 2016, doi:10.3389/fninf.2016.00010).
efc (lower)
    Entropy focus criterion, the Shannon entropy of intensities normalised by its maximum; rises
    with ghosting and blurring from motion (Atkinson et al. 1997, doi:10.1109/42.650883).
fber (higher)
    Foreground-background energy ratio :math:`median(|F|^2)/median(|B|^2)` (Shehzad et al. 2015,
    doi:10.3389/conf.fnins.2015.91.00047).
wm2max (range)
    Median WM intensity over the 99.95th percentile of the image; far from ~0.6-0.9 means a
    long tail of bright artefacts (MRIQC ``wm2max``).
inu_range (lower)
    Spread (95th minus 5th percentile) of the N4 bias field inside the brain: intensity
    non-uniformity (Tustison et al. 2010, doi:10.1109/TMI.2010.2046908).
coverage (higher)
    Fraction of the template brain that the registration maps inside the field of view;
    catches missed slices and a cut vertex or cerebellum, when the registration is right.
fov_cut (lower)
    Largest share of the head's cross-section lying on a face of the field of view other
    than the inferior one (where the neck always leaves it): a head cut by the field of
    view. It needs no registration, which a truncated head can mislead into a shrunken fit
    (measured here: three real T1s with their top 30 % removed, coverage stayed 1.0 on two).
tiv_cm3, gm_fraction, wm_fraction, csf_fraction (range)
    Segmentation sanity: intracranial volume and tissue fractions of an adult brain.

A metric that cannot be computed is a :class:`NotComputed` with the reason (never a sentinel
such as -1, nor a 0 that flatters it); the gate turns it into a FAIL that names it.

The metrics come in groups (:data:`GROUPS`) a pipeline spec asks for by name, each computed
from the raw image and some of the pipeline's outputs. This module is pure: loading the images
and sharing the work between threads is :mod:`tasks.qc.measure`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from data_contracts.qc_settings import IMAGE_QC_GROUPS

# MRIQC's robust estimator of sigma from the MAD (1.4826 = 1/Phi^-1(3/4)).
MAD_TO_SIGMA = 1.4826
MIN_AIR_VOXELS = 100


@dataclass(frozen=True)
class NotComputed:
    """A metric that cannot be computed on this image, and why (never a sentinel value)."""

    why: str


@dataclass(frozen=True)
class TissueStats:
    mean: float
    sd: float
    n: int


def tissue_stats(img: np.ndarray, mask: np.ndarray) -> TissueStats:
    n = int(np.count_nonzero(mask))
    if n < 2:
        return TissueStats(math.nan, math.nan, n)
    values = img[mask].astype(np.float64)
    return TissueStats(float(values.mean()), float(values.std(ddof=1)), n)


def snr(t: TissueStats) -> float:
    """:math:`\\mu / (\\sigma \\sqrt{n/(n-1)})` (MRIQC ``snr``)."""
    if t.n < 2 or not t.sd > 0:
        return math.nan
    return t.mean / (t.sd * math.sqrt(t.n / (t.n - 1)))


def cnr(gm: TissueStats, wm: TissueStats, air_sd: float | NotComputed) -> float | NotComputed:
    """:math:`|\\mu_{WM}-\\mu_{GM}| / \\sqrt{\\sigma_{air}^2+\\sigma_{GM}^2+\\sigma_{WM}^2}` (needs the air's noise)."""
    if isinstance(air_sd, NotComputed):
        return air_sd
    denom = math.sqrt(air_sd ** 2 + gm.sd ** 2 + wm.sd ** 2)
    return abs(wm.mean - gm.mean) / denom if denom > 0 else math.nan


def cjv(gm: TissueStats, wm: TissueStats) -> float:
    diff = abs(wm.mean - gm.mean)
    return (wm.sd + gm.sd) / diff if diff > 0 else math.nan


def efc(img: np.ndarray) -> float:
    """Entropy focus criterion normalised by its maximum (MRIQC ``efc``, Atkinson 1997 eq. 3).

    Computed as :math:`(\\sum x \\ln x - B \\ln B) / B` with :math:`B=\\sqrt{\\sum x^2}`
    (the same sum rearranged, so the large image is read twice, not copied six times).
    """
    x = np.abs(img).ravel()
    n = x.size
    b_max = math.sqrt(float(np.dot(x, x)))  # BLAS accumulates in blocks: float32 is precise enough
    if n < 2 or b_max <= 0:
        return math.nan
    efc_max = n * (1.0 / math.sqrt(n)) * math.log(1.0 / math.sqrt(n))
    x_log_x = float(np.sum(x * np.log(x + 1e-16), dtype=np.float64))
    total = float(np.sum(x, dtype=np.float64))
    return (1.0 / efc_max) * (x_log_x - total * math.log(b_max)) / b_max


def fber(img: np.ndarray, head: np.ndarray) -> float:
    """Infinite when the background is zero-filled (nothing to compare with): a pass, not an error."""
    fg, bg = img[head], img[~head]
    if fg.size == 0 or bg.size == 0:
        return math.nan
    bg_e = float(np.median(np.abs(bg) ** 2))
    return float(np.median(np.abs(fg) ** 2)) / bg_e if bg_e > 1e-3 else math.inf


def wm2max(img: np.ndarray, wm: np.ndarray) -> float:
    top = float(np.percentile(img, 99.95))
    return float(np.median(img[wm])) / top if top > 0 and wm.any() else math.nan


def head_mask(img: np.ndarray) -> np.ndarray:
    """The head: voxels above 10 % of the 98th percentile, closed, filled, largest component.

    Otsu's threshold, which MRIQC applies to its background-rich images,
    splits tissue classes instead of head from air when the field of view is
    tight; a fraction of a robust maximum separates air reliably. Large images
    are shaped at half resolution (the mask only separates head from air).
    """
    step = 2 if img.size > 4_000_000 else 1
    small = img[::step, ::step, ::step]
    top = float(np.percentile(small, 98))
    if top <= 0:
        return np.zeros(img.shape, bool)
    small = small > 0.1 * top
    mask = ndimage.binary_closing(small, iterations=2)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == 1 + int(np.argmax(sizes))
    mask = ndimage.binary_fill_holes(mask)
    if step > 1:
        mask = np.repeat(np.repeat(np.repeat(mask, step, 0), step, 1), step, 2)
        mask = mask[: img.shape[0], : img.shape[1], : img.shape[2]]
    return mask


def fov_cut(img: np.ndarray, zooms: tuple[float, ...]) -> float:
    """Share of the head touching a non-inferior face of the field of view (RAS-ordered image).

    The image is smoothed (4 mm) so noise does not pose as head; the head is what
    rises 30 % of the way from the faces' median (air) to the 98th percentile.
    """
    step = 2 if img.size > 4_000_000 else 1  # 4 mm smoothing loses nothing at half resolution
    s = ndimage.gaussian_filter(img[::step, ::step, ::step].astype(np.float32),
                                [4.0 / (z * step) for z in zooms[:3]])
    faces = np.concatenate([np.take(s, i, axis=a).ravel() for a in range(3) for i in (0, -1)])
    air, top = float(np.median(faces)), float(np.percentile(s, 98))
    head = s > air + 0.3 * (top - air)
    worst = 0.0
    for axis in range(3):
        area = float(head.sum(axis=tuple(a for a in range(3) if a != axis)).max())
        if area == 0:
            return math.nan
        for end in (0, -1):
            if axis == 2 and end == 0:
                continue  # inferior face: the neck leaves every head scan there
            worst = max(worst, float(np.take(head, end, axis=axis).sum()) / area)
    return worst


def air_sd(img: np.ndarray, head: np.ndarray) -> float | NotComputed:
    """Noise in the air: a robust sigma (1.4826 MAD) of the non-zero voxels well away from the head.

    Fewer than 100 such voxels (a zero-filled background, a field of view tight on the head)
    leave nothing to estimate the noise from: :class:`NotComputed`, not 0 (which would make
    CNR look better than the image is).
    """
    step = 2 if head.size > 4_000_000 else 1
    near = ndimage.binary_dilation(head[::step, ::step, ::step], iterations=max(1, 3 // step))
    far = ~np.repeat(np.repeat(np.repeat(near, step, 0), step, 1), step, 2)[: head.shape[0], : head.shape[1],
                                                                          : head.shape[2]]
    air = img[far & (img != 0)]
    if air.size < MIN_AIR_VOXELS:
        return NotComputed(f"only {air.size} non-zero air voxels away from the head (at least {MIN_AIR_VOXELS} "
                           "are needed to estimate the noise)")
    return float(MAD_TO_SIGMA * np.median(np.abs(air - np.median(air))))


TISSUE_PROBABILITY = 0.9  # voxels this sure of their tissue: partial volume would pose as noise

# The groups of the catalogue a pipeline spec can ask for, and the outputs each needs.
GROUPS = IMAGE_QC_GROUPS
