"""Stage 2: MRIQC's functional image quality metrics (Esteban et al. 2017, PLoS ONE 12:e0184661),
computed here on the realigned series, each with its source; the slice timing check; the carpet.

Pure functions of arrays (DVARS goes through files: nipype's ``compute_dvars`` reads NIfTI).
``mask`` is the brain (foreground) mask of the mean image, as MRIQC's.

- tSNR: the voxel's temporal mean over its temporal standard deviation; the median in the mask
  (MRIQC ``tsnr``, from nipype's TSNR).
- DVARS: nipype's ``compute_dvars`` (Power 2012; standardized as Nichols 2013), as MRIQC calls it.
- GSR: ghost-to-signal ratio along an in-plane axis (Giannelli et al. 2010; MRIQC ``gsr_x/y``).
- AOR: AFNI ``3dToutcount`` outlier fraction per volume (Cox 1996), mean over volumes.
- AQI: AFNI ``3dTqual`` quality index, 1 - Spearman correlation of each volume with the median
  volume, mean over volumes.
- GCOR: global correlation, the mean correlation of every pair of voxel time series (Saad et al.
  2013, Brain Connectivity 3:339; AFNI ``@compute_gcor``).
- Carpet (Power 2017, NeuroImage 154:150): voxel time series detrended and z-scored; a volume is a
  spike when its mean |z| is more than 3 robust SD above the series' median.

Written by hand: the AFNI indices and GCOR (AFNI is no Python library; each is a few lines of
numpy over the masked voxels: 4 ms for 7 volumes of 100x100x10 here) and GSR and the slice timing
check (MRIQC's own code is a whole application, not a library to call).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np
from scipy import special, stats

#: 3dToutcount's default: a value is an outlier beyond the (0.001 / N) two-sided Gaussian quantile.
OUTLIER_Q = 0.001
SPIKE_SD = 3.0


def tsnr_map(data: np.ndarray) -> np.ndarray:
    """Temporal mean over temporal SD per voxel (0 where the SD is 0)."""
    mean, sd = data.mean(axis=-1, dtype=np.float64), data.std(axis=-1, dtype=np.float64)
    return np.divide(mean, sd, out=np.zeros_like(mean), where=sd > 0).astype(np.float32)


def dvars(data: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> dict[str, np.ndarray]:
    """nipype's DVARS per volume after the first: standardized, not standardized, voxelwise."""
    from nipype.algorithms.confounds import compute_dvars

    with tempfile.TemporaryDirectory(prefix="corelab-bold-") as tmp:
        func, m = Path(tmp) / "bold.nii", Path(tmp) / "mask.nii"
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(func))
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(m))
        std, nstd, vstd = compute_dvars(str(func), str(m), remove_zerovariance=True)
    return {"std_dvars": np.asarray(std), "dvars": np.asarray(nstd), "vx_std_dvars": np.asarray(vstd)}


def ghost_to_signal(mean: np.ndarray, mask: np.ndarray, axis: int) -> float:
    """GSR along ``axis``: the N/2 ghost (the mask shifted by half the field of view, outside the
    mask) minus the rest of the background, over the median signal in the mask."""
    ghost = np.roll(mask, mask.shape[axis] // 2, axis=axis) & ~mask
    background = ~mask & ~ghost
    signal = float(np.median(mean[mask]))
    if not ghost.any() or not background.any() or signal <= 0:
        return float("nan")
    return float((mean[ghost].mean() - mean[background].mean()) / signal)


def outlier_fraction(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """3dToutcount -fraction: per volume, the fraction of mask voxels whose value is further from
    the voxel's median than ``Q(0.001/N) * sqrt(pi/2) * MAD``."""
    ts = data[mask]
    n = ts.shape[1]
    med = np.median(ts, axis=1, keepdims=True)
    mad = np.median(np.abs(ts - med), axis=1, keepdims=True)
    alpha = special.ndtri(1 - OUTLIER_Q / n / 2) * np.sqrt(np.pi / 2)
    out = np.abs(ts - med) > alpha * mad
    out &= mad > 0
    return out.mean(axis=0)


def quality_index(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """3dTqual: per volume, 1 - Spearman's rho with the voxelwise median volume, in the mask."""
    ts = data[mask]
    median = np.median(ts, axis=1)
    return np.array([1.0 - stats.spearmanr(ts[:, v], median).statistic for v in range(ts.shape[1])])


def global_correlation(data: np.ndarray, mask: np.ndarray) -> float:
    """GCOR: the squared norm of the mean of the unit-variance, zero-mean voxel time series."""
    ts = data[mask].astype(np.float64)
    ts -= ts.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(ts, axis=1, keepdims=True)
    ts = ts[norm[:, 0] > 0] / norm[norm[:, 0] > 0]
    u = ts.mean(axis=0)
    return float(u @ u)


def carpet(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(voxels x volumes matrix of linearly detrended, z-scored time series; spike volumes)."""
    ts = data[mask].astype(np.float64)
    t = np.arange(ts.shape[1], dtype=np.float64)
    design = np.column_stack([np.ones_like(t), t - t.mean()])
    beta, *_ = np.linalg.lstsq(design, ts.T, rcond=None)
    resid = ts - (design @ beta).T
    sd = resid.std(axis=1, keepdims=True)
    z = np.divide(resid, sd, out=np.zeros_like(resid), where=sd > 0)
    level = np.abs(z).mean(axis=0)
    med = np.median(level)
    mad = 1.4826 * np.median(np.abs(level - med))
    spikes = np.flatnonzero(level > med + SPIKE_SD * mad) if mad > 0 else np.array([], int)
    return z.astype(np.float32), spikes


def slice_timing_problems(sidecar: Mapping[str, Any], n_slices: int) -> tuple[bool, list[str]]:
    """(present, problems) of the sidecar's SliceTiming for ``n_slices`` slices.

    Sane means one time per slice, each in [0, TR), and, for a multiband factor M, N/M distinct
    times (M slices excited together): the Siemens XA60/XA61 fault writes the single-band timing
    of the first volume, N distinct times, for a multiband series (dcm2niix issue 870).
    """
    timing = sidecar.get("SliceTiming")
    if timing is None:
        return False, []
    problems = []
    times = np.asarray(timing, dtype=float)
    if times.size != n_slices:
        problems.append(f"SliceTiming has {times.size} times for {n_slices} slices")
    tr = sidecar.get("RepetitionTime")
    if tr is not None and times.size and (times.min() < 0 or times.max() >= float(tr)):
        problems.append(f"SliceTiming spans {times.min():g}-{times.max():g} s, outside [0, TR = {float(tr):g} s)")
    mb = int(sidecar.get("MultibandAccelerationFactor") or 1)
    distinct = np.unique(np.round(times, 4)).size
    if mb > 1 and times.size == n_slices and n_slices % mb == 0 and distinct != n_slices // mb:
        problems.append(f"SliceTiming has {distinct} distinct times for multiband factor {mb} and {n_slices} "
                        f"slices (expected {n_slices // mb}): single-band timing in a multiband series")
    return True, problems
