"""De-identified DICOM converts exactly like the original: the safe private list is long enough.

For every series of ../shared/data: dcm2niix on the de-identified copy gives the
same image (shape, affine, voxels) as the upstream ``Ref/`` NIfTI where one
exists and as the original, and a sidecar that differs from the original's
only in de-identified keys. A private element the list forgot shows up here
as lost slice timing, a wrong slice count or changed Philips scaling.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from data_contracts.trial import load_trial
from flows.cli.demo import DEMO_UPLOADS
from tasks.intake.inventory import group_series, inventory_upload
from tasks.lake.storage import Lake
from tasks.receive.study import Upload, receive_one_study
from tests.data import shared_path
from tests.helpers import DEMO_TRIAL

DEID_KEYS = {"DeidentificationMethod", "DeidentificationMethodCodeSequence", "InstitutionName",
             "InstitutionAddress", "InstitutionalDepartmentName", "ProtocolName", "SeriesDescription",
             "StudyDescription", "ProcedureStepDescription",  # cleaned: the Ingenia puts the name there
             # the Skyra's sequence file name "%CustomerSeq%\nih_ep2d_bold" names the institution
             "PulseSequenceDetails"}
REF_KEYS = ("SliceTiming", "PhaseEncodingDirection", "EffectiveEchoSpacing", "TotalReadoutTime",
            "RepetitionTime", "EchoTime", "FlipAngle", "InversionTime", "ShimSetting",
            "ImageOrientationPatientDICOM", "MagneticFieldStrength")


def dcm2niix() -> str:
    exe = shutil.which("dcm2niix", path=str(Path(sys.executable).parent)) or shutil.which("dcm2niix")
    assert exe, "dcm2niix (PyPI package) is not installed"
    return exe


def convert(src: Path, out: Path) -> tuple[nib.Nifti1Image, dict]:
    out.mkdir(parents=True)
    subprocess.run([dcm2niix(), "-b", "y", "-z", "n", "-f", "img", "-o", str(out), str(src)],
                   check=True, capture_output=True)
    (nii,) = out.glob("*.nii")
    return nib.load(nii), json.loads(nii.with_suffix(".json").read_text())


def same_image(a: nib.Nifti1Image, b: nib.Nifti1Image) -> bool:
    return (a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-4)
            and np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)))


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    trial = load_trial(DEMO_TRIAL)
    lake = Lake(str(tmp_path_factory.mktemp("lake"))).init()
    for site, rel in DEMO_UPLOADS.items():
        files = inventory_upload(shared_path(rel)).accepted
        outcome = receive_one_study(Upload(trial, site, "u", lake), files)
        assert all(s.verdict != "rejected" for s in outcome.series), outcome.all_findings
    return lake


def _cases():
    for site, rel in DEMO_UPLOADS.items():
        for (_, _), files in group_series(inventory_upload(shared_path(rel), keep_data=False).accepted).items():
            yield pytest.param(site, rel, files[0].header, id=f"{site}-{files[0].header.SeriesNumber}")


@pytest.mark.parametrize("site,rel,header", list(_cases()))
def test_deidentified_series_converts_like_the_original(lake, tmp_path, site, rel, header):
    number = int(header.SeriesNumber)
    (deid_dir,) = [Path(lake.path(p)) for p in {q.rsplit("/", 1)[0] for q in lake.find(f"deid/{site}")}
                   if p.rsplit("/", 1)[1].startswith(f"series-{number:04d}-")]
    src = tmp_path / "orig"
    src.mkdir()
    for p in shared_path(rel).rglob("*"):
        if p.is_file() and not p.name.endswith(".txt") and _series_number(p) == number:
            # dcm2niix reads no gzipped DICOM: give it the bytes inside
            (src / p.name.removesuffix(".gz")).write_bytes(_dicom_bytes(p))
    orig_img, orig_json = convert(src, tmp_path / "o")
    deid_img, deid_json = convert(deid_dir, tmp_path / "d")
    assert same_image(orig_img, deid_img)
    changed = {k for k in set(orig_json) | set(deid_json) if orig_json.get(k) != deid_json.get(k)}
    assert changed <= DEID_KEYS, changed - DEID_KEYS
    for ref in shared_path(rel.split("/")[0], "Ref").glob("*.nii"):
        ref_img = nib.load(ref)
        if ref_img.shape == deid_img.shape and _ref_series(ref) == number:
            assert same_image(ref_img, deid_img), ref.name
            ref_json = json.loads(ref.with_suffix(".json").read_text())
            for key in REF_KEYS:
                if key in ref_json:
                    assert deid_json.get(key) == ref_json[key], (ref.name, key)


def _dicom_bytes(p: Path) -> bytes:
    raw = p.read_bytes()
    return gzip.decompress(raw) if p.suffix == ".gz" else raw


def _series_number(p: Path) -> int | None:
    """The file's SeriesNumber; None for the objects of a series-less kind (a DICOMDIR, presentation
    states, which corelab quarantines)."""
    number = pydicom.dcmread(io.BytesIO(_dicom_bytes(p)), stop_before_pixels=True, force=True).get("SeriesNumber")
    return None if number is None else int(number)


def _ref_series(ref: Path) -> int:
    # Ref names end in _<series number> (patterns %p_%s, %s_%p): take the number that matches
    stem = ref.stem
    tail, head = stem.rsplit("_", 1)[-1], stem.split("_", 1)[0]
    return int(tail) if tail.isdigit() else int(head)
