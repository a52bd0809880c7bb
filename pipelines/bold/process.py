"""The ``bold`` pipeline's stages on one BOLD series, from its NIfTI and JSON sidecar to QC values,
measures and maps (no files written here: :mod:`pipelines.bold.run` writes them).

1. the series read and checked: a 4D image of at least 3 volumes (and the protocol's number when
   given), no volume without signal; refusals name their reason;
2. foreground mask of the mean image: SimpleITK's Otsu threshold, its largest connected component,
   holes filled. nilearn's ``compute_epi_mask`` (histogram cut-offs tuned for a brain filling the
   field of view) kept 478 voxels of a 12,311-voxel phantom on the XA60 multiband-5 series, and
   realigning on that fragment "found" 2.7 mm of motion in a still phantom; on the GE brain the two
   agree (the Otsu mask holds all of nilearn's 11,271 voxels and a rim of 3,261 more);
3. rigid realignment and framewise displacement (:mod:`pipelines.bold.realign`);
4. the functional IQMs on the realigned series, the slice timing check and the carpet
   (:mod:`pipelines.bold.iqms`).

Non-steady-state volumes are not detected or dropped: the metrics are of the series as acquired.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from pipelines.bold import iqms
from pipelines.bold.errors import BoldInputError
from pipelines.bold.realign import PARAMETERS, framewise_displacement, implausible, realign, volume_image

MIN_VOLUMES = 3
#: MRIQC's default FD threshold (``fd_thres``) for the share of volumes that moved.
FD_THRESHOLD_MM = 0.2

MEASURES = {
    "FD_mean": ("mm", "mean framewise displacement (Power 2012) over the volumes after the first"),
    "FD_perc": ("%", f"volumes after the first with framewise displacement above {FD_THRESHOLD_MM} mm"),
    "tSNR": ("1", "median temporal SNR of the realigned series in the brain mask"),
}


@dataclass
class BoldQC:
    mask: np.ndarray
    mean: np.ndarray
    tsnr: np.ndarray
    confounds: dict[str, np.ndarray]     # column -> one value per volume (NaN where none)
    carpet: np.ndarray                   # voxels x volumes, z-scored
    measures: dict[str, float]
    qc: dict[str, Any] = field(default_factory=dict)
    affine: np.ndarray | None = None     # RAS affine of the maps


def read_sidecar(path: Path) -> dict[str, Any]:
    """The BIDS JSON beside the image ({} when there is none: its checks then say so)."""
    side = path.with_name(path.name.split(".")[0] + ".json")
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError):
        return {}


def load_bold(path: Path, volumes: int | None) -> tuple[nib.Nifti1Image, np.ndarray, int]:
    """(RAS image, its float32 data, number of slices along the acquisition's slice axis)."""
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for a file that is not an image
        raise BoldInputError("not_bold", f"{path.name}: not a readable NIfTI ({exc})") from exc
    if len(img.shape) != 4:
        raise BoldInputError("not_bold", f"{path.name}: {len(img.shape)}D image, a BOLD series is 4D")
    n = img.shape[3]
    need = max(MIN_VOLUMES, volumes or 0)
    if n < need:
        raise BoldInputError("too_few_volumes", f"{path.name}: {n} volumes, at least {need} needed")
    axis = {"i": 0, "j": 1, "k": 2}.get(str(read_sidecar(path).get("SliceEncodingDirection", "k"))[0], 2)
    n_slices = img.shape[axis]
    ras = nib.as_closest_canonical(img)
    data = np.asanyarray(ras.dataobj, dtype=np.float32)
    empty = [v for v in range(n) if not np.any(data[..., v])]
    if empty:
        raise BoldInputError("incomplete", f"{path.name}: volumes {empty} hold no signal")
    return ras, data, n_slices


def brain_mask(mean: np.ndarray, zooms: tuple[float, ...], path: Path) -> np.ndarray:
    """The object in the field of view: Otsu foreground of ``mean``, largest component, holes filled."""
    img = volume_image(mean, zooms)
    if not np.ptp(mean) > 0:
        raise BoldInputError("no_signal", f"{path.name}: the mean image is constant")
    foreground = sitk.OtsuThreshold(img, 0, 1, 128)
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(foreground), sortByObjectSize=True) == 1
    mask = sitk.GetArrayFromImage(sitk.BinaryFillhole(largest)).transpose(2, 1, 0).astype(bool)
    if not mask.any():
        raise BoldInputError("no_signal", f"{path.name}: no foreground in the mean image")
    return mask


def compute(path: str | Path, volumes: int | None = None, workers: int = 2) -> BoldQC:
    path = Path(path)
    ras, data, n_slices = load_bold(path, volumes)
    zooms = ras.header.get_zooms()
    mask = brain_mask(data.mean(axis=-1), zooms, path)
    moved = realign(data, zooms, mask, workers)
    fd = framewise_displacement(moved.parameters)
    series = moved.corrected
    mean = series.mean(axis=-1)
    tsnr = iqms.tsnr_map(series)
    dv = iqms.dvars(series, mask, ras.affine)
    aor, aqi = iqms.outlier_fraction(series, mask), iqms.quality_index(series, mask)
    z, spikes = iqms.carpet(series, mask)
    sidecar = read_sidecar(path)
    present, problems = iqms.slice_timing_problems(sidecar, n_slices)
    lead = np.array([np.nan])
    confounds = {**{name: moved.parameters[:, i] for i, name in enumerate(PARAMETERS)},
                 "framewise_displacement": np.concatenate([lead, fd]),
                 **{k: np.concatenate([lead, v]) for k, v in dv.items()},
                 "aor": aor, "aqi": aqi}
    qc = {
        "volumes": int(data.shape[3]), "slices": int(n_slices), "reference_volume": moved.reference,
        "fd_mean": float(fd.mean()), "fd_max": float(fd.max()),
        "fd_num": int((fd > FD_THRESHOLD_MM).sum()), "fd_perc": float(100.0 * (fd > FD_THRESHOLD_MM).mean()),
        "fd_threshold_mm": FD_THRESHOLD_MM,
        "realign_failed": len(implausible(moved.parameters)), "realign_failed_volumes": implausible(moved.parameters),
        "dvars_std": float(dv["std_dvars"].mean()), "dvars_nstd": float(dv["dvars"].mean()),
        "dvars_vstd": float(dv["vx_std_dvars"].mean()),
        "tsnr": float(np.median(tsnr[mask])),
        "gsr_x": iqms.ghost_to_signal(mean, mask, 0), "gsr_y": iqms.ghost_to_signal(mean, mask, 1),
        "aor": float(aor.mean()), "aqi": float(aqi.mean()), "gcor": iqms.global_correlation(series, mask),
        "carpet_spikes": int(spikes.size), "carpet_spike_volumes": [int(s) for s in spikes],
        "slice_timing_absent": 0 if present else 1, "slice_timing_errors": len(problems),
        "slice_timing_problems": problems,
        "brain_ml": float(mask.sum() * np.prod(zooms[:3]) / 1000.0),
    }
    measures = {"FD_mean": qc["fd_mean"], "FD_perc": qc["fd_perc"], "tSNR": qc["tsnr"]}
    return BoldQC(mask, mean, tsnr, confounds, z, measures, qc, ras.affine)
