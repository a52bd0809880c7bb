"""What the scrub must not touch, and what another tool already did (issue: every vendor's data).

Class 7: Manufacturer ``UIH`` equalled InstitutionName ``UIH``, the text scrub blanked Manufacturer,
and dcm2niix, not knowing the vendor, wrote the mosaic as one flat image with no deviation. Built
here from the real Siemens mosaic: InstitutionName set to its Manufacturer. A converted image whose
size disagrees with the headers' is refused with a reason.

Class 9: an upload another tool had de-identified (PatientIdentityRemoved YES, its method and code
sequence, 113102 "clean recognizable visual features") lost that record: ours replaced it.
"""

from __future__ import annotations

import nibabel as nib
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from flows.cli.demo import DEMO_UPLOADS
from tasks.bids.convert import convert_study
from tasks.intake.inventory import inventory_upload
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tasks.receive.record import record_study
from tasks.receive.study import Upload, receive_one_study
from tests.data import shared_path
from tests.helpers import GE_SERIES, copy_upload, rewrite

TRIO = tuple(DEMO_UPLOADS["siemens-trio"].split("/"))
TRIO_REF = ("dcm_qa", "Ref", "ax_asc_35sl_6.nii")


def _receive(tmp_path, trial, site, up):
    lake = Lake(str(tmp_path / "lake")).init()
    o = receive_one_study(Upload(trial, site, "u1", lake), inventory_upload(up).accepted)
    record_study(lake, o, o.matcher)
    return lake, o


def _deid_headers(lake):
    return [pydicom.dcmread(lake.path(p)) for p in lake.find("deid") if p.endswith(".dcm")]


def test_an_institution_named_like_the_manufacturer_leaves_the_manufacturer(tmp_path, trial):
    up = copy_upload(tmp_path / "up", *TRIO)
    for p in up.iterdir():
        rewrite(p, InstitutionName="SIEMENS")
    lake, o = _receive(tmp_path, trial, "siemens-trio", up)
    (series,) = o.series
    assert series.verdict != "rejected", [f.message for f in series.findings]
    headers = _deid_headers(lake)
    assert {h.Manufacturer for h in headers} == {"SIEMENS"} and not any(h.get("InstitutionName") for h in headers)
    images, findings = convert_study(lake, trial, o.study)
    assert findings == [], [f.message for f in findings]
    (image,) = images.values()
    assert nib.load(lake.path(image)).shape == nib.load(shared_path(*TRIO_REF)).shape   # the mosaic unpacked


def test_an_image_the_converter_did_not_unpack_is_refused_not_written(tmp_path, trial):
    up = copy_upload(tmp_path / "up", *TRIO)
    for p in up.iterdir():
        rewrite(p, Manufacturer=None)            # what the scrub used to do
    lake, o = _receive(tmp_path, trial, "siemens-trio", up)
    assert read_table(lake, "series").n_slices.tolist() == [35]   # intake read the mosaic from its CSA header
    images, findings = convert_study(lake, trial, o.study)
    (f,) = findings
    assert images == {} and f.reason_code == "geometry_mismatch" and "35 slices" in f.message
    assert not [p for p in lake.find("bids") if p.endswith(".nii.gz")]


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def test_an_upstream_de_identification_record_is_kept_and_ours_added(tmp_path, trial):
    up = copy_upload(tmp_path / "up", *GE_SERIES, limit=5)
    for p in up.iterdir():
        rewrite(p, PatientIdentityRemoved="YES", DeidentificationMethod=["UPSTREAM TOOL 2.1", "defaced"],
                DeidentificationMethodCodeSequence=Sequence([
                    _code("113100", "Basic Application Confidentiality Profile"),
                    _code("113102", "Clean Recognizable Visual Features Option")]))
    lake, o = _receive(tmp_path, trial, "ge-nih", up)
    headers = _deid_headers(lake)
    assert headers
    for h in headers:
        methods = list(h.DeidentificationMethod)
        assert methods[:2] == ["UPSTREAM TOOL 2.1", "defaced"] and any(m.startswith("corelab") for m in methods)
        codes = [i.CodeValue for i in h.DeidentificationMethodCodeSequence]
        assert codes[:2] == ["113100", "113102"] and codes.count("113100") == 1
        assert "113107" in codes                   # ours: Retain Longitudinal Temporal Information


def test_a_header_that_was_not_de_identified_gets_ours_only(tmp_path, trial):
    up = copy_upload(tmp_path / "up", *GE_SERIES, limit=3)
    lake, _ = _receive(tmp_path, trial, "ge-nih", up)
    for h in _deid_headers(lake):
        assert all(m.startswith("corelab") or "Option" in m or "Profile" in m for m in h.DeidentificationMethod)
        assert "113102" not in [i.CodeValue for i in h.DeidentificationMethodCodeSequence]
