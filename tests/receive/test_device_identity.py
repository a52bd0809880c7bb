"""Annex E without Retain Device Identity, on every vendor of ../shared/data (issue: every vendor's data).

``retain_device_identity: false`` used to crash intake on every vendor: the series rows carried the
scanner's serial number, and the PHI check refused to write them after the de-identified files were
already in ``deid/``. Now the serial leaves intake only as a keyed label, the same for every study
of that scanner, so scanner epochs and harmonization batches still tell scanners apart.
"""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pydicom
import pytest

from flows.cli.demo import DEMO_UPLOADS
from tasks.conformance.parameters import scanner_identity
from tasks.deid.profile import device_label
from tasks.intake.inventory import inventory_upload
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tasks.receive.record import record_study
from tasks.receive.study import Upload, receive_one_study
from tests.data import shared_path


@pytest.fixture(scope="module")
def no_device_identity(trial):
    opts = trial.deidentification.model_copy(update={"retain_device_identity": False})
    return trial.model_copy(update={"deidentification": opts})


@pytest.mark.parametrize("site", sorted(DEMO_UPLOADS))
def test_every_vendor_is_received_without_its_serial_number(site, no_device_identity, tmp_path):
    trial = no_device_identity
    files = inventory_upload(shared_path(DEMO_UPLOADS[site])).accepted
    serial = scanner_identity(files[0].header)["device_serial"]
    assert serial, "the real series carry a DeviceSerialNumber"
    lake = Lake(str(tmp_path / "lake")).init()
    o = receive_one_study(Upload(trial, site, "u", lake), files)
    record_study(lake, o, o.matcher)                                   # used to raise PHILeakError
    label = device_label(trial.secret(trial.deidentification.secret_env), serial)
    series = read_table(lake, "series")
    assert set(series.device_serial) == {label} and label.startswith("D") and serial not in label
    assert all(v != "rejected" for v in series.verdict)
    # the serial as a value of its own is nowhere (a new 2.25 UID may hold its digits by chance)
    alone = re.compile(rb"(?<![0-9A-Za-z])" + re.escape(serial.encode()) + rb"(?![0-9A-Za-z])")
    for path in lake.find("tables"):                                  # Parquet is compressed: its rows
        rows = json.dumps(pq.read_table(lake.path(path)).to_pylist(), default=str).encode()
        assert not alone.search(rows), path
    for path in [p for p in lake.find("deid") if p.endswith(".dcm")][:3]:
        assert not alone.search(lake.read_bytes(path)), path
    for path in [p for p in lake.find("deid") if p.endswith(".dcm")][:3]:
        assert not pydicom.dcmread(lake.path(path), stop_before_pixels=True).get("DeviceSerialNumber")  # Z: emptied


def test_the_label_is_stable_and_keyed(no_device_identity, trial, tmp_path):
    key = no_device_identity.secret(no_device_identity.deidentification.secret_env)
    assert device_label(key, "67093") == device_label(key, "67093") != device_label(key, "67094")
    assert device_label(b"another key", "67093") != device_label(key, "67093")
    assert device_label(key, None) is None
    # with Retain Device Identity the serial and the epoch stay as they always were
    lake = Lake(str(tmp_path / "lake")).init()
    files = inventory_upload(shared_path(DEMO_UPLOADS["siemens-xa30"])).accepted
    kept = receive_one_study(Upload(trial, "siemens-xa30", "u", lake), files)
    assert kept.series[0].identity["device_serial"] == scanner_identity(files[0].header)["device_serial"]
