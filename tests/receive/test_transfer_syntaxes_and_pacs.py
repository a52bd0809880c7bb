"""The new real data: nine transfer syntaxes, a PACS-touched series, 12-bit pixels (issue: every vendor's data).

Each goes through intake, de-identification and (where the trial knows the series) conversion:
pixel data bit-exact, the NIfTI equal to its ``Ref/`` (voxels and affine).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tasks.bids.convert import convert_study, run_dcm2niix
from tasks.intake.inventory import inventory_upload
from tasks.lake.storage import Lake
from tasks.receive.record import record_study
from tasks.receive.study import Upload, receive_one_study
from tests.data import shared_path


def _receive(tmp_path: Path, trial, site: str, files: list[Path]):
    up = tmp_path / "up"
    up.mkdir(parents=True)
    for f in files:
        shutil.copy(f, up / f.name)
    lake = Lake(str(tmp_path / "lake")).init()
    o = receive_one_study(Upload(trial, site, "u1", lake), inventory_upload(up).accepted)
    record_study(lake, o, o.matcher)
    return lake, o


def _deid_files(lake: Lake) -> list[str]:
    return sorted(p for p in lake.find("deid") if p.endswith(".dcm"))


@pytest.mark.parametrize("n", range(1, 10))
def test_every_transfer_syntax_is_received_bit_exact_and_converts_to_its_ref(n, tmp_path, trial):
    src = shared_path("dcm_qa_ts", "In", f"{n}.dcm")
    lake, o = _receive(tmp_path, trial, "siemens-ts", [src])
    (series,) = o.series
    assert series.verdict != "rejected", [f.message for f in series.findings]
    (deid,) = _deid_files(lake)
    received, kept = pydicom.dcmread(src), pydicom.dcmread(lake.path(deid))
    assert kept.file_meta.TransferSyntaxUID == received.file_meta.TransferSyntaxUID
    assert kept.PixelData == received.PixelData
    images, findings = convert_study(lake, trial, o.study)
    assert findings == [], [f.message for f in findings]
    (image,) = images.values()
    ours, ref = nib.load(lake.path(image)), nib.load(shared_path("dcm_qa_ts", "Ref", f"{n}.nii"))
    assert ours.shape == ref.shape
    assert np.array_equal(np.asanyarray(ours.dataobj), np.asanyarray(ref.dataobj))
    assert np.allclose(ours.affine, ref.affine, atol=1e-4)


def test_a_series_whose_private_blocks_a_pacs_renamed_is_received_like_the_original(tmp_path, trial):
    out = {}
    for name, site in (("Siemens", "siemens-vida"), ("Agfa", "agfa-pacs")):
        files = sorted(shared_path("dcm_qa_agfa", name).iterdir())
        lake, o = _receive(tmp_path / name, trial, site, files)
        (series,) = o.series
        # the PACS also wrote the study date into StudyDescription: shifted, not a reason to refuse
        # the sample holds 4 of the series' 200 volumes: kept, not converted, the rest asked for
        found = [f.message for f in series.findings]
        assert series.verdict == "incomplete" and series.series_type == "qc_phantom", found
        assert [f.kind for f in series.findings] == ["incomplete_series"] and "196 of the 200" in found[0]
        assert (series.params["n_slices"], series.params["n_volumes"]) == (25, 4)   # the CSA, found by creator
        deid = [pydicom.dcmread(lake.path(p)) for p in _deid_files(lake)]
        assert not any("20200630" in str(ds.get("StudyDescription", "")) for ds in deid)
        work = tmp_path / name / "nii"
        work.mkdir()
        (image,) = [p for p in run_dcm2niix(Path(lake.path(series.deid_path)), work, "img") if p.suffix == ".gz"]
        out[name] = nib.load(image)
    assert out["Agfa"].shape == out["Siemens"].shape == (64, 64, 25, 4)
    assert np.array_equal(np.asanyarray(out["Agfa"].dataobj), np.asanyarray(out["Siemens"].dataobj))


@pytest.mark.parametrize("name", ["12bitUnsigned.dcm", "12bitUnsigned_0x0F0F.dcm", "12bitSigned_0x0F0F.dcm"])
def test_12_bit_pixels_are_kept_bit_exact(name, tmp_path, trial):
    src = shared_path("dcm_qa_12bit", "In", name)
    lake, o = _receive(tmp_path, trial, "siemens-12bit", [src])
    (series,) = o.series
    assert series.verdict != "rejected" and series.series_type == "bold", [f.message for f in series.findings]
    (deid,) = _deid_files(lake)
    received, kept = pydicom.dcmread(src), pydicom.dcmread(lake.path(deid))
    assert (kept.BitsStored, kept.PixelRepresentation) == (received.BitsStored, received.PixelRepresentation)
    assert kept.PixelData == received.PixelData


def test_dates_in_descriptors_are_shifted_and_a_zero_date_is_no_date(tmp_path, trial):
    """A PACS writes the study date, dashed, into StudyDescription; a scanner writes 00000000 for none."""
    from tests.helpers import GE_SERIES, copy_upload, rewrite

    up = copy_upload(tmp_path / "up", *GE_SERIES, limit=3)
    study_date = pydicom.dcmread(next(up.iterdir())).StudyDate
    dashed = f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}"
    for p in up.iterdir():
        rewrite(p, StudyDescription=f"{dashed} weekly QC", PatientBirthDate="00000000",
                ImageComments="gain 100000000")
    lake = Lake(str(tmp_path / "lake")).init()
    o = receive_one_study(Upload(trial, "ge-nih", "u1", lake), inventory_upload(up).accepted)
    (series,) = o.series
    assert series.verdict != "rejected", [f.message for f in series.findings]
    for p in _deid_files(lake):
        ds = pydicom.dcmread(lake.path(p))
        assert dashed not in ds.StudyDescription and ds.StudyDescription.endswith("weekly QC")
        assert ds.ImageComments == "gain 100000000"
