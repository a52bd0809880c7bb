"""A value the trial retains may contain another identifier: it is that value, not a leak.

A scanner's DeviceSerialNumber ``0000000000orange`` contains its site's InstitutionName
``orange``. Under Retain Device Identity the serial stays (in the DICOM, the series rows, the BIDS
sidecar); the institution must still go everywhere else. Before, the series was refused as
``phi_left`` and recording the study crashed with PHILeakError.
"""

from __future__ import annotations

import pytest

from tasks.bids.convert import convert_study
from tasks.deid.fingerprint import Fingerprint
from tasks.deid.verify import Identifier, Matcher, PHILeakError, check_no_phi
from tasks.intake.inventory import inventory_upload
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tasks.receive.record import record_study
from tasks.receive.study import Upload, receive_one_study
from tests.helpers import GE_SERIES, copy_upload, rewrite

SERIAL, INSTITUTION = "0000000000orange", "orange"


def test_the_matcher_and_the_fingerprint_let_a_retained_value_be():
    m = Matcher([Identifier("InstitutionName", INSTITUTION)], retained=[SERIAL])
    assert m.in_content(b'"DeviceSerialNumber": "0000000000ORANGE"') == []
    assert m.in_content(b"scanned at Orange General") != []          # the institution alone is still found
    fp = Fingerprint.from_matcher(m, b"key")
    again = Fingerprint.from_json(fp.to_json(), b"key")
    assert again.in_content(b'"DeviceSerialNumber": "0000000000orange"') == []
    assert again.in_content(b"scanned at orange general") != []
    with pytest.raises(PHILeakError, match="InstitutionName"):
        check_no_phi("rows", {"note": "from orange"}, [m, fp])
    check_no_phi("rows", {"device_serial": SERIAL}, [m, fp])


def test_a_study_whose_serial_holds_the_institution_is_received_and_converted(tmp_path, trial):
    up = copy_upload(tmp_path / "up", *GE_SERIES)      # the whole series: a part is incomplete, not converted
    for p in up.iterdir():
        rewrite(p, InstitutionName=INSTITUTION, DeviceSerialNumber=SERIAL)
    lake = Lake(str(tmp_path / "lake")).init()
    o = receive_one_study(Upload(trial, "ge-nih", "u1", lake), inventory_upload(up).accepted)
    (series,) = o.series
    assert series.verdict != "rejected", [f.message for f in series.findings]
    record_study(lake, o, o.matcher)                                  # used to raise PHILeakError
    assert read_table(lake, "series").device_serial.tolist() == [SERIAL]
    images, findings = convert_study(lake, trial, o.study)             # the sidecar keeps the serial
    assert findings == [] and len(images) == 1
    sidecar = next(p for p in lake.find("bids") if p.endswith("_bold.json"))
    assert SERIAL in lake.read_text(sidecar)
    deid = [p for p in lake.find("deid") if p.endswith(".dcm")]
    assert deid and all(INSTITUTION.encode() not in lake.read_bytes(p).replace(SERIAL.encode(), b"") for p in deid)
