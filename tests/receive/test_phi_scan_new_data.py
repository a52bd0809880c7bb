"""The new folders of ../shared/data leave no PHI outside the restricted stores (issue: every vendor's data).

An independent scan, as ``tests/flows/test_receive_study.py`` does for the demo vendors: each
folder is received, tabled and converted into a lake of its own, then every byte outside
``inbox/`` and ``quarantine/`` (DICOM whole, gzip and Parquet decoded, every file name) is
searched for the identifying values read here, with plain pydicom, from the files as they came:
names and their parts, IDs, birth dates, institutions and addresses, physicians, accession
numbers, and every original study date.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest

from tasks.bids.convert import convert_study
from tasks.intake.inventory import inventory_upload
from tasks.lake.storage import Lake
from tasks.receive.record import record_study
from tasks.receive.study import Upload, receive_one_study
from tests.data import shared_path

NEW = {
    "siemens-ts": ("dcm_qa_ts", "In"),
    "agfa-pacs": ("dcm_qa_agfa", "Agfa"),
    "siemens-vida": ("dcm_qa_agfa", "Siemens"),
    "siemens-12bit": ("dcm_qa_12bit", "In"),
    "philips-ingenia": ("dcm_qa_philips_dwi", "In", "cl"),
    "siemens-xa30": ("dcm_qa_xa60", "In"),           # XA60 and XA61 phantom studies, an unknown scanner here
}
# the device identity (StationName, the station's AE title) is kept on purpose: Retain Device Identity
PEOPLE = ("PatientName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName")
WHOLE = ("PatientID", "OtherPatientIDs", "InstitutionName", "AccessionNumber")
ADDRESSES = ("InstitutionAddress", "PatientAddress")
DATES = ("PatientBirthDate", "StudyDate")


def _original_values(folder: Path) -> set[str]:
    out = set()
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        raw = p.read_bytes()
        try:
            ds = pydicom.dcmread(io.BytesIO(gzip.decompress(raw) if p.suffix == ".gz" else raw),
                                 stop_before_pixels=True)
        except Exception:  # the folders' README and PDF files
            continue
        def value(kw: str, ds=ds) -> str:
            return str(ds.get(kw, "") or "").strip()

        for kw in PEOPLE:   # names whole and by part (family, given); institutions only whole
            out |= {v for v in [value(kw), *value(kw).replace("^", " ").split()] if len(v) >= 5}
        out |= {value(kw) for kw in WHOLE if len(value(kw)) >= 5}
        out |= {part.strip() for kw in ADDRESSES for part in value(kw).split(",") if len(part.strip()) >= 5}
        out |= {value(kw)[:8] for kw in DATES if value(kw)[:8].isdigit()}
    return {v for v in out if len(set(v) - set("0 ")) > 1}


def _searchable(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        meta = {k.decode(): v.decode("utf-8", "replace") for k, v in (table.schema.metadata or {}).items()}
        data = (json.dumps(table.to_pylist(), default=str) + json.dumps(meta)).encode()
    return data.lower()


@pytest.mark.parametrize("site", sorted(NEW))
def test_no_original_identifier_outside_the_restricted_stores(site, tmp_path, trial):
    folder = shared_path(*NEW[site])
    values = _original_values(folder)
    assert values, "the folder's headers hold identifying values to look for"
    lake = Lake(str(tmp_path / "lake")).init()
    inv = inventory_upload(folder)
    studies: dict[str, list] = {}
    for f in inv.accepted:
        studies.setdefault(str(f.header.StudyInstanceUID), []).append(f)
    for files in studies.values():
        o = receive_one_study(Upload(trial, site, "u1", lake), files)
        record_study(lake, o, o.matcher)
        convert_study(lake, trial, o.study)
    root, checked = Path(lake.root), 0
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or rel.split("/")[0] in ("inbox", "quarantine", ".locks"):
            continue
        content = _searchable(path)
        for value in values:
            assert value.lower().encode() not in content, f"{site}: an original value in {rel}"
            assert value.lower() not in rel.lower(), f"{site}: an original value in the name {rel}"
        checked += 1
    assert checked >= len(inv.accepted)
