"""Write one BOLD series' BIDS derivatives: brain mask, mean and tSNR maps, confounds, carpet figure,
measures with their QC sidecar.

Names follow BIDS 1.10 derivatives where it has a rule (``desc-brain_mask``) and fMRIPrep's where it
has none (``desc-mean_boldref``, ``desc-confounds_timeseries``); those, the tSNR map (``*_boldmap``),
the figures and the measures tables are listed in the derivatives' ``.bidsignore`` by the spec, so
the official validator checks the rest (it reports the fMRIPrep names as NOT_INCLUDED otherwise).
The dataset files, staging and sidecar helpers are the anat pipeline's (``pipelines.anat.derivatives``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np

from pipelines.anat.derivatives import (
    Staging,
    check_dataset,
    check_digest,
    check_label,
    ensure_dataset,
    generated_by,
    measures_tsv,
    raw_source,
    sidecar_name,
    software_versions,
    write_json,
)
from pipelines.anat.io import sha256_file
from pipelines.bold import NAME, VERSION
from pipelines.bold.errors import BoldArgumentError
from pipelines.bold.process import MEASURES, BoldQC, compute

BIDS_VERSION = "1.10.0"
OPTIONAL_ENTITIES = ("acq", "ce", "rec", "dir", "run", "echo")    # BIDS func entities after task
_SOFTWARE = ("SimpleITK", "nipype", "nitime", "numpy", "scipy", "nibabel", "matplotlib")


@dataclass
class BoldResult:
    outputs: dict[str, Path]
    measures: dict[str, float]
    units: dict[str, str]
    versions: dict[str, str]
    input_sha256: str
    qc: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def file_prefix(subject: str, session: str, task: str, entities: Mapping[str, Any] | None = None) -> str:
    entities = dict(entities or {})
    unknown = set(entities) - set(OPTIONAL_ENTITIES)
    if unknown:
        raise BoldArgumentError(f"unknown BIDS entities {sorted(unknown)}; bold accepts task and "
                                f"{list(OPTIONAL_ENTITIES)}")
    parts = [f"sub-{check_label('subject', subject)}", f"ses-{check_label('session', session)}",
             f"task-{check_label('task', task)}"]
    for key in OPTIONAL_ENTITIES:
        if entities.get(key) is not None:
            parts.append(f"{key}-{check_label(key, str(entities[key]))}")
    return "_".join(parts)


def output_names(prefix: str) -> dict[str, str]:
    sub, ses = prefix.split("_")[:2]
    base = f"{sub}/{ses}/func/{prefix}"
    return {"brain_mask": f"{base}_desc-brain_mask.nii.gz", "boldref": f"{base}_desc-mean_boldref.nii.gz",
            "tsnr": f"{base}_stat-tsnr_boldmap.nii.gz", "confounds": f"{base}_desc-confounds_timeseries.tsv",
            "figure": f"{sub}/figures/{prefix}_desc-carpet_bold.png",
            "measures": f"{base}_desc-qc_measures.tsv"}      # last: marks completion


def dataset_description(container_digest: str | None) -> dict[str, Any]:
    return {"Name": f"{NAME} {VERSION}: functional QC (motion, tSNR, DVARS, ghosting, outliers, carpet)",
            "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
            "GeneratedBy": generated_by(NAME, VERSION, container_digest)}


def confounds_tsv(confounds: Mapping[str, np.ndarray]) -> str:
    """One row per volume, ``n/a`` where a column has no value (the first volume's FD and DVARS)."""
    cols = list(confounds)
    rows = ["\t".join(cols)]
    for i in range(len(next(iter(confounds.values())))):
        rows.append("\t".join("n/a" if not np.isfinite(confounds[c][i]) else repr(float(confounds[c][i]))
                              for c in cols))
    return "\n".join(rows) + "\n"


_CONFOUND_TEXT = {
    "trans_x": ("translation along the image's first (RAS) axis, relative to the reference volume", "mm"),
    "trans_y": ("translation along the second axis", "mm"),
    "trans_z": ("translation along the third axis", "mm"),
    "rot_x": ("rotation about the first axis", "rad"),
    "rot_y": ("rotation about the second axis", "rad"),
    "rot_z": ("rotation about the third axis", "rad"),
    "framewise_displacement": ("Power 2012 framewise displacement (50 mm sphere)", "mm"),
    "std_dvars": ("standardized DVARS (Nichols 2013; nipype compute_dvars)", "1"),
    "dvars": ("DVARS, intensity normalized to a median of 1000", "1"),
    "vx_std_dvars": ("voxelwise standardized DVARS", "1"),
    "aor": ("AFNI 3dToutcount outlier fraction of the mask's voxels", "1"),
    "aqi": ("AFNI 3dTqual quality index (1 - Spearman rho with the median volume)", "1"),
}


def carpet_png(path: Path, qc: BoldQC, title: str) -> None:
    """FD and standardized DVARS above the carpet (Power 2017): a reviewer's one look at the series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [1, 1, 4]})
    t = np.arange(qc.carpet.shape[1])
    axes[0].plot(t, qc.confounds["framewise_displacement"], color="tab:red")
    axes[0].axhline(qc.qc["fd_threshold_mm"], color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("FD (mm)")
    axes[1].plot(t, qc.confounds["std_dvars"], color="tab:blue")
    axes[1].set_ylabel("std DVARS")
    step = max(1, qc.carpet.shape[0] // 2000)     # at most 2000 rows drawn
    axes[2].imshow(qc.carpet[::step], aspect="auto", cmap="gray", vmin=-2, vmax=2, interpolation="nearest")
    axes[2].set_ylabel("voxels (mask)")
    axes[2].set_xlabel("volume")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _sidecars(names: dict[str, str], qc: BoldQC, common: dict[str, Any]) -> dict[str, dict]:
    source = [common["RawSources"][0]]
    own: dict[str, dict] = {
        "brain_mask": {"Description": "the object in the field of view: Otsu foreground of the mean image, "
                                      "largest component, holes filled", "Type": "Brain", "Sources": source},
        "boldref": {"Description": "temporal mean of the realigned series", "Sources": source},
        "tsnr": {"Description": "temporal mean over temporal SD of the realigned series", "Units": "1",
                 "Sources": source},
        "confounds": {**{c: {"Description": d, "Units": u} for c, (d, u) in _CONFOUND_TEXT.items()},
                      "Sources": source},
        "figure": {"Description": "framewise displacement, standardized DVARS and the carpet plot",
                   "Sources": [f"bids::{names['confounds']}"]},
        "measures": {"Description": "functional QC measures of the series",
                     "Sources": [f"bids::{names['confounds']}", f"bids::{names['tsnr']}",
                                 f"bids::{names['brain_mask']}"],
                     "measure": {"Description": "measure name",
                                 "Levels": {k: d for k, (_, d) in MEASURES.items()}},
                     "value": {"Description": "measured value"},
                     "unit": {"Description": "unit of value (mm, %, or 1)"},
                     "QC": qc.qc},
    }
    return {k: {**common, **v} for k, v in own.items()}


def run_bold(input_path: str | Path, output_dir: str | Path, subject: str, session: str, task: str, *,
             entities: Mapping[str, Any] | None = None, container_digest: str | None = None,
             volumes: int | None = None, threads: int | None = None) -> BoldResult:
    """QC one BOLD series and write its derivatives under ``output_dir`` (all or nothing)."""
    start = time.perf_counter()
    input_path, root = Path(input_path), Path(output_dir)
    prefix = file_prefix(subject, session, task, entities)
    description = dataset_description(check_digest(container_digest))
    check_dataset(root, description)
    qc = compute(input_path, volumes=volumes, workers=threads or 2)
    names = output_names(prefix)
    versions = software_versions(_SOFTWARE)
    input_sha = sha256_file(input_path)
    common = {"RawSources": [raw_source(input_path)], "InputSHA256": input_sha,
              "GeneratedBy": generated_by(NAME, VERSION, container_digest),
              "SoftwareVersions": "; ".join(f"{k} {v}" for k, v in versions.items()), "SpatialReference": "orig"}
    ensure_dataset(root, description, readme="Made by corelab's bold QC pipeline. The tSNR maps (*_boldmap), "
                   "reviewer figures (sub-*/figures) and the measures tables (*_measures.tsv) have no BIDS 1.10 "
                   "rule; the derivatives' .bidsignore lists them.")
    with Staging(root, prefix) as stage:
        for key, data, dtype in (("brain_mask", qc.mask, np.uint8), ("boldref", qc.mean, np.float32),
                                 ("tsnr", qc.tsnr, np.float32)):
            img = nib.Nifti1Image(data.astype(dtype), qc.affine)
            img.header.set_xyzt_units("mm")
            nib.save(img, str(stage.path(names[key])))
        stage.path(names["confounds"]).write_text(confounds_tsv(qc.confounds))
        carpet_png(stage.path(names["figure"]), qc, prefix)
        units = {k: u for k, (u, _) in MEASURES.items()}
        stage.path(names["measures"]).write_text(measures_tsv(qc.measures, units))
        for key, content in _sidecars(names, qc, common).items():
            write_json(stage.path(sidecar_name(names[key])), content)
        order = [r for k, n in names.items() if k != "measures" for r in (sidecar_name(n), n)]
        placed = stage.commit(order + [sidecar_name(names["measures"]), names["measures"]])
    return BoldResult({k: placed[n] for k, n in names.items()}, dict(qc.measures), units, versions, input_sha,
                      dict(qc.qc), time.perf_counter() - start)
