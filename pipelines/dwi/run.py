"""Write one diffusion series' BIDS derivatives: tensor maps, masks, measures with their QC sidecar.

Names follow BIDS 1.10 derivatives where it has a rule (``desc-brain_mask``, ``label-WM_mask``)
and the diffusion-derivatives proposal (BEP016: ``model-tensor_param-fa_dwimap``) where it has
none yet; the spec lists those in the derivatives' ``.bidsignore`` so the official validator
checks the rest. The dataset files, staging and sidecar helpers are the anat pipeline's
(``pipelines.anat.derivatives``: the spec's sources name both folders, so the image's wheel
holds both and a change to anat's marks this image stale too).
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
from pipelines.anat.io import nifti_like, sha256_file
from pipelines.dwi import NAME, VERSION
from pipelines.dwi.errors import DwiArgumentError
from pipelines.dwi.process import MEASURES, DwiMaps, compute

BIDS_VERSION = "1.10.0"
OPTIONAL_ENTITIES = ("acq", "rec", "dir", "run")    # BIDS dwi entities after sub and ses
PARAMS = ("fa", "md", "ad", "rd")
_SOFTWARE = ("dipy", "SimpleITK", "numpy", "scipy", "nibabel")


@dataclass
class DwiResult:
    outputs: dict[str, Path]
    measures: dict[str, float]
    units: dict[str, str]
    versions: dict[str, str]
    input_sha256: str
    qc: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def file_prefix(subject: str, session: str, entities: Mapping[str, Any] | None = None) -> str:
    entities = dict(entities or {})
    unknown = set(entities) - set(OPTIONAL_ENTITIES)
    if unknown:
        raise DwiArgumentError(f"unknown BIDS entities {sorted(unknown)}; dwi accepts {list(OPTIONAL_ENTITIES)}")
    parts = [f"sub-{check_label('subject', subject)}", f"ses-{check_label('session', session)}"]
    for key in OPTIONAL_ENTITIES:
        if entities.get(key) is not None:
            parts.append(f"{key}-{check_label(key, str(entities[key]))}")
    return "_".join(parts)


def output_names(prefix: str) -> dict[str, str]:
    sub, ses = prefix.split("_")[:2]
    base = f"{sub}/{ses}/dwi/{prefix}"
    names = {"brain_mask": f"{base}_desc-brain_mask.nii.gz", "wm_mask": f"{base}_label-WM_mask.nii.gz",
             "b0": f"{base}_desc-b0_dwiref.nii.gz"}
    names.update({p: f"{base}_model-tensor_param-{p}_dwimap.nii.gz" for p in PARAMS})
    names["measures"] = f"{base}_desc-tensor_measures.tsv"     # last: marks completion
    return names


def with_t1_mask(names: dict[str, str]) -> dict[str, str]:
    """The outputs of a run given the session's T1: the T1's white matter too, before the measures."""
    base = names["wm_mask"].removesuffix("_label-WM_mask.nii.gz")
    return {**{k: v for k, v in names.items() if k != "measures"},
            "t1_wm_mask": f"{base}_label-WM_desc-T1w_mask.nii.gz", "measures": names["measures"]}


def dataset_description(container_digest: str | None) -> dict[str, Any]:
    return {"Name": f"{NAME} {VERSION}: diffusion tensor maps (FA, MD, AD, RD), masks, white-matter measures",
            "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
            "GeneratedBy": generated_by(NAME, VERSION, container_digest)}




def _sidecars(names: dict[str, str], maps: DwiMaps, common: dict[str, Any]) -> dict[str, dict]:
    source = [common["RawSources"][0]]
    own: dict[str, dict] = {
        "brain_mask": {"Description": "brain mask of the mean b0 (dipy median_otsu, largest component)",
                       "Type": "Brain", "Sources": source},
        "wm_mask": {"Description": "white matter: FA > 0.2 in the brain mask eroded by one voxel", "Label": "WM",
                    "Type": "ROI",
                    "Sources": [f"bids::{names['fa']}", f"bids::{names['brain_mask']}"]},
        "b0": {"Description": "mean of the b0 volumes after motion correction", "Sources": source},
        "measures": {"Description": "white-matter means of the tensor maps",
                     "Sources": [f"bids::{names[p]}" for p in PARAMS]
                                + [f"bids::{names[k]}" for k in ("wm_mask", "t1_wm_mask") if k in names],
                     "measure": {"Description": "measure name",
                                 "Levels": {k: d for k, (_, d) in MEASURES.items()}},
                     "value": {"Description": "measured value"},
                     "unit": {"Description": "unit of value (um2/ms = 1e-3 mm2/s, mm3, or 1)"},
                     "QC": maps.qc},
    }
    if "t1_wm_mask" in names:
        t1 = maps.qc["t1w"]
        own["t1_wm_mask"] = {
            "Description": f"white matter of the same session's T1 ({t1['image']}, labels {t1['dseg']}) registered "
                           "rigidly onto the b0 (SimpleITK Mattes MI): voxels at least half white matter",
            "Label": "WM", "Type": "ROI", "Sources": [f"bids::{names['b0']}", f"bids::{names['brain_mask']}"]}
    units = {"fa": "1", "md": "um2/ms", "ad": "um2/ms", "rd": "um2/ms"}
    for p in PARAMS:
        own[p] = {"Description": f"diffusion tensor {p.upper()} (dipy WLS fit of the motion-corrected series)",
                  "Model": "tensor", "Parameter": p, "Units": units[p], "Sources": source}
    return {k: {**common, **v} for k, v in own.items()}


def run_dwi(input_path: str | Path, output_dir: str | Path, subject: str, session: str, *,
            entities: Mapping[str, Any] | None = None, container_digest: str | None = None,
            shells: list[float] | None = None, volumes: int | None = None,
            t1w: str | Path | None = None, t1w_dseg: str | Path | None = None) -> DwiResult:
    """Process one diffusion series and write its derivatives under ``output_dir`` (all or nothing).

    ``t1w`` and ``t1w_dseg``: the same session's anat run (its ``desc-preproc_T1w`` and ``dseg``),
    both or neither; with them the T1's white matter is measured too (``*_T1WM``).
    """
    if (t1w is None) != (t1w_dseg is None):
        raise DwiArgumentError("give the T1 and its dseg together (--t1w and --t1w-dseg), or neither")
    start = time.perf_counter()
    input_path, root = Path(input_path), Path(output_dir)
    prefix = file_prefix(subject, session, entities)
    description = dataset_description(check_digest(container_digest))
    check_dataset(root, description)
    maps = compute(input_path, shells=shells, volumes=volumes, t1w=Path(t1w) if t1w else None,
                   t1w_dseg=Path(t1w_dseg) if t1w_dseg else None)
    ref = nib.load(str(input_path))
    ref = nib.Nifti1Image(np.zeros(ref.shape[:3], np.uint8), ref.affine)
    names = output_names(prefix)
    versions = software_versions(_SOFTWARE)
    input_sha = sha256_file(input_path)
    common = {"RawSources": [raw_source(input_path)], "InputSHA256": input_sha,
              "GeneratedBy": generated_by(NAME, VERSION, container_digest),
              "SoftwareVersions": "; ".join(f"{k} {v}" for k, v in versions.items()), "SpatialReference": "orig"}
    ensure_dataset(root, description, readme="Made by corelab's dwi pipeline. Tensor maps (*_dwimap, BEP016 "
                   "names), the mean b0 (*_dwiref) and the measures tables (*_measures.tsv) have no BIDS 1.10 "
                   "rule yet; the derivatives' .bidsignore lists them.")
    with Staging(root, prefix) as stage:
        images = {"brain_mask": (maps.brain_mask, np.uint8), "wm_mask": (maps.wm_mask, np.uint8),
                  "b0": (maps.b0, np.float32), **{p: (getattr(maps, p), np.float32) for p in PARAMS}}
        if maps.t1_wm_mask is not None:
            names = with_t1_mask(names)
            images["t1_wm_mask"] = (maps.t1_wm_mask, np.uint8)
        for key, (data, dtype) in images.items():
            nib.save(nifti_like(data, ref, dtype), str(stage.path(names[key])))
        units = {k: u for k, (u, _) in MEASURES.items() if k in maps.measures}
        stage.path(names["measures"]).write_text(measures_tsv(maps.measures, units))
        for key, content in _sidecars(names, maps, common).items():
            write_json(stage.path(sidecar_name(names[key])), content)
        order = [r for k, n in names.items() if k != "measures" for r in (sidecar_name(n), n)]
        placed = stage.commit(order + [sidecar_name(names["measures"]), names["measures"]])
    return DwiResult({k: placed[n] for k, n in names.items()}, dict(maps.measures), units, versions, input_sha,
                     dict(maps.qc), time.perf_counter() - start)


