"""The Philips 12-direction DWI of ../shared/data as corelab's BIDS stage hands it to the dwi pipeline."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

from tasks.bids.convert import dcm2niix_binary
from tests.data import shared_path


def philips_dwi(out: Path) -> Path:
    """dcm2niix's NIfTI, .bval and .bvec of the series (gzip-compressed classic DICOM, Philips'
    scrambled instance numbers sorted by dcm2niix's private-tag rule), in ``out``."""
    dicom = out / "dicom"
    dicom.mkdir(parents=True)
    for f in sorted(shared_path("dcm_qa_philips_dwi", "In", "cl", "DICOM").glob("IM_*.gz")):
        (dicom / f.name.removesuffix(".gz")).write_bytes(gzip.decompress(f.read_bytes()))
    subprocess.run([dcm2niix_binary(), "-z", "y", "-f", "sub-01_ses-1_dwi", "-o", str(out), str(dicom)],
                   check=True, capture_output=True)
    return out / "sub-01_ses-1_dwi.nii.gz"


def in_bids(series: Path, root: Path) -> Path:
    """The series placed as corelab's BIDS stage places it, with a raw dataset_description."""
    folder = root / "sub-01" / "ses-1" / "dwi"
    folder.mkdir(parents=True)
    for ext in (".nii.gz", ".bval", ".bvec"):
        shutil.copy(series.with_name(series.name.removesuffix(".nii.gz") + ext), folder / f"sub-01_ses-1_dwi{ext}")
    (root / "dataset_description.json").write_text('{"Name": "raw", "BIDSVersion": "1.10.0"}')
    return folder / "sub-01_ses-1_dwi.nii.gz"


def philips_t1_anat(out: Path) -> tuple[Path, Path]:
    """The Philips MPRAGE of ../shared/data (Ingenia Elition X, as the DWI) through the anat pipeline
    as corelab runs it: its ``desc-preproc_T1w`` and ``dseg``."""
    from pipelines.anat.run import run_anat

    dicom = out / "t1-dicom"
    dicom.mkdir(parents=True)
    for f in sorted(shared_path("dcm_qa_philips_enh", "In", "cl").glob("*.dcm.gz")):
        (dicom / f.name.removesuffix(".gz")).write_bytes(gzip.decompress(f.read_bytes()))
    subprocess.run([dcm2niix_binary(), "-b", "n", "-z", "y", "-f", "sub-01_ses-1_T1w", "-o", str(out), str(dicom)],
                   check=True, capture_output=True)
    result = run_anat(out / "sub-01_ses-1_T1w.nii.gz", out / "anat", "01", "1")
    return result.outputs["preproc"], result.outputs["dseg"]
