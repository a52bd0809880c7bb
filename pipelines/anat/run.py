"""``run_anat``: one T1 in, one complete set of BIDS derivatives out (or nothing).

The entry point both the ``local`` backend and the container call. Order of
work: check arguments and the input (nothing is written for a bad input),
compute, write every output into a staging folder, then rename into place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np

from pipelines.anat import NAME, VERSION
from pipelines.anat.derivatives import (
    raw_source,
    software_versions,
    Staging, check_dataset, check_digest, dataset_description, dseg_tsv, ensure_dataset, file_prefix,
    generated_by, measures_tsv, output_names, sidecar_name, write_json,
)
from pipelines.anat.io import load_t1, nifti_like, sha256_file
from pipelines.anat.parameters import AnatParameters
from pipelines.anat.process import MEASURES, AnatMaps, compute
from pipelines.anat.report import overlay_png
from pipelines.anat.template import TEMPLATE_NAME, TISSUES, load_template, template_version

#: Packages whose versions shape the outputs.
_SOFTWARE = ("SimpleITK", "numpy", "scipy", "nibabel", "nilearn", "matplotlib")


@dataclass(frozen=True)
class AnatResult:
    """What one run produced.

    Attributes
    ----------
    outputs : dict
        Output key (``preproc``, ``bias_field``, ``brain_mask``, ``dseg``,
        ``probseg_GM``/``_WM``/``_CSF``, ``figure``, ``measures``) -> path; each
        has a JSON sidecar next to it (see ``sidecars``).
    measures : dict
        ``TIV``, ``GM``, ``WM``, ``CSF`` (mm³) and ``GM_fraction`` (GM / TIV).
    units : dict
        Measure -> unit.
    parameters, versions : dict
        Settings and software versions, as written in every sidecar.
    input_sha256 : str
        sha256 of the input NIfTI file's bytes.
    qc : dict
        Values for QC: N4 bias-field spread in the brain, registration metric,
        affine volume scale, template brain in field of view, tissue means/SDs, and the head
        check (template correlation, tissue order, scalp margin; see ``headcheck``).
    seconds : float
        Wall time of the run.
    """

    outputs: dict[str, Path]
    sidecars: dict[str, Path]
    dataset_description: Path
    measures: dict[str, float]
    units: dict[str, str]
    parameters: dict[str, Any]
    versions: dict[str, str]
    input_sha256: str
    qc: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0






def _sidecars(names: dict[str, str], maps: AnatMaps, common: dict[str, Any]) -> dict[str, dict]:
    preproc = f"bids::{names['preproc']}"
    own = {
        "preproc": {"Description": "T1w reoriented to RAS and N4 bias-corrected (not skull-stripped)",
                    "SkullStripped": False, "BiasField": maps.qc["bias_field"]},
        "bias_field": {"Description": "N4 multiplicative bias field: input / field = desc-preproc",
                       "SkullStripped": False, "Sources": [preproc], "BiasField": maps.qc["bias_field"]},
        "brain_mask": {"Description": "intracranial mask: MNI152 template mask, "
                                      "affine-warped, within the head",
                       "Type": "Brain", "Sources": [preproc]},
        "dseg": {"Description": "most probable tissue in the brain mask (labels in dseg.tsv)",
                 "Sources": [preproc, f"bids::{names['brain_mask']}"]},
        "figure": {"Description": "reviewer overlay: dseg and brain mask on desc-preproc, "
                                  "only within 4 mm of the brain mask (no face)",
                   "Sources": [preproc, f"bids::{names['dseg']}"]},
        "measures": {"Description": "volumes from the tissue posteriors in the brain mask",
                     "Sources": [f"bids::{names[f'probseg_{t}']}" for t in TISSUES],
                     "measure": {"Description": "measure name",
                                 "Levels": {k: d for k, (_, d) in MEASURES.items()}},
                     "value": {"Description": "measured value"},
                     "unit": {"Description": "unit of value (mm3, or 1 for a ratio)"},
                     # what only the pipeline can know (registration, N4), for the QC gate
                     "QC": maps.qc},
    }
    for t in TISSUES:
        own[f"probseg_{t}"] = {"Description": f"posterior probability of {t}", "Label": t,
                               "Sources": [preproc, f"bids::{names['brain_mask']}"]}
    return {k: {**common, **v} for k, v in own.items()}


def _write_images(stage: Staging, names: dict[str, str], maps: AnatMaps, ref: nib.Nifti1Image) -> None:
    arrays = {"preproc": (maps.preproc, np.float32), "bias_field": (maps.bias_field, np.float32),
              "brain_mask": (maps.brain_mask, np.uint8), "dseg": (maps.dseg, np.uint8)}
    arrays.update({f"probseg_{t}": (maps.posteriors[i], np.float32) for i, t in enumerate(TISSUES)})
    for key, (data, dtype) in arrays.items():
        img = nifti_like(data, ref, dtype)
        if key == "bias_field":
            # A smooth float field compresses badly (28 MB for a 1 mm head); int16
            # with a scale factor keeps it to about 1e-5 and a tenth of the size.
            img.set_data_dtype(np.int16)
        nib.save(img, str(stage.path(names[key])))


def _write_outputs(
    root: Path, prefix: str, names: dict[str, str], maps: AnatMaps, img: nib.Nifti1Image,
    common: dict[str, Any],
) -> dict[str, Path]:
    """Stage every output and sidecar, then move them into ``root`` (measures TSV last)."""
    with Staging(root, prefix) as stage:
        _write_images(stage, names, maps, img)
        overlay_png(stage.path(names["figure"]), maps.preproc, maps.dseg, maps.brain_mask, prefix,
                    tuple(float(z) for z in img.header.get_zooms()[:3]))
        units = {k: u for k, (u, _) in MEASURES.items()}
        stage.path(names["measures"]).write_text(measures_tsv(maps.measures, units))
        for key, content in _sidecars(names, maps, common).items():
            write_json(stage.path(sidecar_name(names[key])), content)
        order = [r for k, n in names.items() if k != "measures" for r in (sidecar_name(n), n)]
        order += [sidecar_name(names["measures"]), names["measures"]]
        return stage.commit(order)


def run_anat(
    input_path: str | Path,
    output_dir: str | Path,
    subject: str,
    session: str,
    *,
    entities: Mapping[str, Any] | None = None,
    container_digest: str | None = None,
    threads: int | None = None,
    params: AnatParameters | None = None,
) -> AnatResult:
    """Segment one T1 and write its BIDS derivatives under ``output_dir``.

    Parameters
    ----------
    input_path : str or Path
        The T1w NIfTI (``.nii`` or ``.nii.gz``).
    output_dir : str or Path
        Derivatives root, e.g. ``<lake>/derivatives/anat-<version>``.
    subject, session : str
        BIDS labels (letters and digits, no ``sub-``/``ses-`` prefix).
    entities : mapping, optional
        Extra entities among ``acq``, ``ce``, ``rec``, ``run``.
    container_digest : str, optional
        ``sha256:...`` of the image this runs in; written to GeneratedBy.
    threads : int, optional
        SimpleITK threads (default :attr:`AnatParameters.threads`, fixed).
    params : AnatParameters, optional
        Settings (defaults are the released ones).

    Returns
    -------
    AnatResult

    Raises
    ------
    AnatInputError
        Unusable input (unreadable, truncated, 2D, singular affine...); nothing written.
    AnatArgumentError
        Bad label, entity, digest or thread count; nothing written.
    AnatProcessingError
        Registration diverged or the brain mask is implausible; nothing written.
    AnatOutputError
        ``output_dir`` belongs to another version or container.
    """
    start = time.perf_counter()
    input_path, root = Path(input_path), Path(output_dir)
    prefix = file_prefix(subject, session, entities)
    description = dataset_description(NAME, VERSION, check_digest(container_digest))
    check_dataset(root, description)  # before the work, not after it
    params = (params or AnatParameters()).with_threads(threads)
    img = load_t1(input_path)  # raises AnatInputError before anything is written
    input_sha = sha256_file(input_path)
    maps = compute(img, params)
    names = output_names(prefix, TISSUES)
    versions = software_versions(_SOFTWARE)
    common = {
        "RawSources": [raw_source(input_path)], "InputSHA256": input_sha,
        "GeneratedBy": generated_by(NAME, VERSION, container_digest),
        # BIDS wants a string here; the packages one by one are in the result (AnatResult.versions)
        "Parameters": params.as_dict(), "SoftwareVersions": "; ".join(f"{k} {v}" for k, v in versions.items()),
        "Template": {"Name": TEMPLATE_NAME, "Provider": f"nilearn {template_version()}",
                     "Files": load_template().files},
        "SpatialReference": "orig",
    }
    ensure_dataset(root, description, {"dseg.tsv": dseg_tsv()})
    placed = _write_outputs(root, prefix, names, maps, img, common)
    units = {k: u for k, (u, _) in MEASURES.items()}
    return AnatResult(
        outputs={k: placed[n] for k, n in names.items()},
        sidecars={k: placed[sidecar_name(n)] for k, n in names.items()},
        dataset_description=root / "dataset_description.json",
        measures=dict(maps.measures), units=units, parameters=params.as_dict(),
        versions=versions, input_sha256=input_sha, qc=dict(maps.qc),
        seconds=time.perf_counter() - start,
    )
