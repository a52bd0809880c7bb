"""A derived image in an acquired series is kept apart from it (issue: every vendor's data).

A Philips DTI series also held the scanner's derived isotropic image: dcm2niix made two images
of it ("img", "img_ADC"), nothing was converted, and the series row counted 17 volumes for 16.
The cases are built from real series by adding a derived copy of one of their files: a standard
ImageType DERIVED / ADC, a Siemens TRACEW, and Philips' private isotropic flag with its private
block moved to other element numbers (as a PACS may do).
"""

from __future__ import annotations

import gzip
import io

import pydicom
import pytest
from pydicom.uid import generate_uid

from tasks.bids.convert import convert_study
from tasks.intake.derived import derived_reason, split_derived
from tasks.intake.inventory import group_series, inventory_upload
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tasks.receive.record import record_study
from tasks.receive.study import Upload, receive_one_study
from tests.data import shared_path
from tests.helpers import GE_SERIES, copy_upload

PHILIPS_DWI = ("dcm_qa_philips_dwi", "In", "cl", "DICOM")


def _add_derived(up, change) -> None:
    """A derived copy of the series' first file: new SOP instance, changed by ``change``."""
    first = sorted(up.iterdir())[0]
    raw = first.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(gzip.decompress(raw) if first.suffix == ".gz" else raw))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 9999
    change(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    (up / "derived.dcm").write_bytes(buf.getvalue())


def _image_type(*values):
    def change(ds):
        ds.ImageType = list(values)
    return change


def _philips_isotropic_in_a_moved_block(ds):
    block = ds.private_block(0x2001, "Philips Imaging DD 001")
    old = {e.tag.element & 0xFF: e for e in block.dataset if e.tag.group == 0x2001
           and e.tag.element >> 8 == block.block_start >> 8 and e.tag.element & 0xFF00}
    for e in list(ds.group_dataset(0x2001)):      # the whole Philips block to creator slot 0x60
        del ds[e.tag]
    ds.add_new(0x20010060, "LO", "Philips Imaging DD 001")
    for offset, e in old.items():
        ds.add_new(0x20016000 | offset, e.VR, e.value)
    ds[0x20016004].value = "I"


CASES = {
    # the whole GE series (150 files): a part of it would be incomplete, and not converted
    "standard-adc": (GE_SERIES, 150, _image_type("DERIVED", "PRIMARY", "DIFFUSION", "ADC")),
    "siemens-tracew": (GE_SERIES, 150, _image_type("ORIGINAL", "PRIMARY", "TRACEW", "ND")),
    "philips-isotropic-moved-block": (PHILIPS_DWI, 64, _philips_isotropic_in_a_moved_block),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_derived_image_is_recognised(case, tmp_path):
    parts, limit, change = CASES[case]
    up = copy_upload(tmp_path / "up", *parts, limit=limit)
    _add_derived(up, change)
    files = inventory_upload(up).accepted
    (members,) = group_series(files).values()
    acquired, apart = split_derived(members)
    assert [m.rel for m, _ in apart] == ["derived.dcm"] and len(acquired) == len(members) - 1
    assert all(derived_reason(m.header) is None for m in acquired)


def test_no_real_acquisition_is_taken_for_a_derived_image():
    for parts in (GE_SERIES, PHILIPS_DWI, ("dcm_qa_xa30", "In"), ("dcm_qa_philips_enh", "In")):
        files = inventory_upload(shared_path(*parts)).accepted
        for members in group_series(files).values():
            assert split_derived(members)[1] == [], parts


@pytest.mark.parametrize("case", ["standard-adc", "siemens-tracew"])
def test_the_series_is_received_counted_and_converted_without_it(case, tmp_path, trial):
    parts, limit, change = CASES[case]
    up = copy_upload(tmp_path / "up", *parts, limit=limit)
    _add_derived(up, change)
    lake = Lake(str(tmp_path / "lake")).init()
    o = receive_one_study(Upload(trial, "ge-nih", "u1", lake), inventory_upload(up).accepted)
    (series,) = o.series
    assert series.n_files == limit and series.verdict != "rejected"
    (kept,) = o.quarantined
    assert kept.code == "derived_image" and "derived.dcm" in kept.reason
    (finding,) = [f for f in o.findings if f.kind == "derived_image"]
    assert finding.severity == "minor" and finding.reason_code == "derived_image"
    record_study(lake, o, o.matcher)
    assert read_table(lake, "series").n_files.tolist() == [limit]
    assert "derived_image" in set(read_table(lake, "deviations").kind)
    assert len([p for p in lake.find("deid") if p.endswith(".dcm")]) == limit
    images, findings = convert_study(lake, trial, o.study)
    assert findings == [] and len(images) == 1, [f.message for f in findings]
    assert lake.exists(kept.path) and lake.exists(kept.path + ".reason.json")

