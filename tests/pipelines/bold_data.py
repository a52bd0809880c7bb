"""BOLD series of ../shared/data as corelab's BIDS stage hands them to the bold pipeline."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tasks.bids.convert import dcm2niix_binary
from tests.data import shared_path

#: The GE EPI (15 slices x 10 volumes, a volunteer moving throughout) and two Siemens enhanced
#: multiband phantom series (XA60 7 T: 3 volumes, multiband 2; XA61 3 T: 7 volumes, multiband 2).
SERIES = {
    "ge": ("dcm_qa_nih", "In", "20180918GE", "mr_0004"),
    "xa60": ("dcm_qa_xa60", "In", "XA60", "DICOM", "24100413", "39280000"),
    "xa61": ("dcm_qa_xa60", "In", "XA61", "DICOM", "24100310", "14440000"),
}
#: Series numbers of the XA folders' multiband-2 product BOLD.
XA_SERIES = {"xa60": "4", "xa61": "4"}


def convert(name: str, out: Path) -> Path:
    """dcm2niix's NIfTI and JSON sidecar of one series (for the XA folders, their series 4)."""
    src = shared_path(*SERIES[name])
    dicom = out / "dicom"
    dicom.mkdir(parents=True)
    if name in XA_SERIES:
        import pydicom

        for f in src.iterdir():
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            if str(ds.get("SeriesNumber")) == XA_SERIES[name]:
                shutil.copy(f, dicom / f.name)
    else:
        for f in src.iterdir():
            shutil.copy(f, dicom / f.name)
    subprocess.run([dcm2niix_binary(), "-z", "y", "-b", "y", "-f", "sub-01_ses-1_task-rest_bold", "-o", str(out),
                    str(dicom)], check=True, capture_output=True)
    return out / "sub-01_ses-1_task-rest_bold.nii.gz"


def in_bids(series: Path, root: Path) -> Path:
    """The series placed as corelab's BIDS stage places it, with a raw dataset_description."""
    folder = root / "sub-01" / "ses-1" / "func"
    folder.mkdir(parents=True)
    stem = series.name.removesuffix(".nii.gz")
    for ext in (".nii.gz", ".json"):
        shutil.copy(series.with_name(stem + ext), folder / f"sub-01_ses-1_task-rest_bold{ext}")
    (root / "dataset_description.json").write_text('{"Name": "raw", "BIDSVersion": "1.10.0"}')
    return folder / "sub-01_ses-1_task-rest_bold.nii.gz"
