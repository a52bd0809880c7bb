"""De-identification (PS3.15 Annex E + options) and its independent verification, on real files."""

from __future__ import annotations

from datetime import datetime

import pydicom
import pytest

from data_contracts.trial import Deidentification
from tasks.deid._safe_private import SAFE_PRIVATE
from tasks.deid.profile import DeidContext, date_shift_days, deidentify, to_bytes
from tasks.deid.series import deidentify_series
from tasks.deid.verify import Matcher, collect_identifiers, find_leaks
from tasks.intake.inventory import inventory_upload
from tests.data import shared_path

SERIES = {
    "ge": ("dcm_qa_nih", "In", "20180918GE", "mr_0004"),
    "siemens": ("dcm_qa_nih", "In", "20180918Si", "mr_0003"),
    "trio": ("dcm_qa", "In"),
    "philips": ("dcm_qa_philips", "In"),
    "philips_t1": ("dcm_qa_philips_enh", "In"),
    "xa30": ("dcm_qa_xa30", "In"),
}
# Identifiers of the MANIFEST too short for a byte search; checked element by element.
SHORT_PHI = {"DEV", "USC", "NIH", "crlab"}


def _files(name, limit=3):
    return inventory_upload(shared_path(*SERIES[name])).accepted[:limit]


def _ctx(options=None, subject="SUBJ01"):
    opts = options or Deidentification()
    return DeidContext("TRIAL", "site-a", subject, "baseline", b"unit-test-key", opts,
                       date_shift_days(b"unit-test-key", "TRIAL", subject, opts.max_date_shift_days))


@pytest.mark.parametrize("name", sorted(SERIES))
def test_basic_profile_with_options(name):
    files = _files(name)
    original = pydicom.dcmread(__import__("io").BytesIO(files[0].raw if not files[0].rel.endswith(".gz")
                                                       else __import__("gzip").decompress(files[0].raw)))
    ctx = _ctx().prepare([f.dataset for f in files])
    out = pydicom.dcmread(__import__("io").BytesIO(to_bytes(deidentify(files[0].dataset, ctx))))
    assert out.PatientIdentityRemoved == "YES"
    assert out.PatientName == "SUBJ01" and out.PatientID == "SUBJ01"
    codes = {item.CodeValue for item in out.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113107", "113108", "113109", "113105", "113111"}
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert not out.get("InstitutionName") and not out.get("InstitutionAddress")
    assert not str(out.get("PatientBirthDate", ""))
    # dates move back by the subject's shift; times stay
    days = (datetime.strptime(original.StudyDate, "%Y%m%d") - datetime.strptime(out.StudyDate, "%Y%m%d")).days
    assert days == -ctx.date_shift_days and 1 <= days <= 365
    assert out.get("StudyTime") == original.get("StudyTime")
    # patient characteristics and device identity retained (ComBat covariates, batches)
    for kw in ("PatientAge", "PatientSex", "PatientWeight", "DeviceSerialNumber", "Manufacturer"):
        assert out.get(kw) == original.get(kw), kw
    # UIDs replaced, consistently
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert out[kw].value != original[kw].value and out[kw].value.startswith("2.25.")
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    # only safe-listed private elements survive
    safe = SAFE_PRIVATE[{"trio": "siemens", "xa30": "siemens", "philips_t1": "philips"}.get(name, name)]
    kept = _private_keys(out)
    assert kept and kept <= safe
    for el in out.iterall():
        assert not (isinstance(el.value, str) and el.value.strip() in SHORT_PHI), (el.tag, el.value)


def _private_keys(ds) -> set[tuple[str, int, int]]:
    """(creator, group, offset) of every private data element, at any depth."""
    keys = set()
    for el in ds:
        t = el.tag
        if t.is_private and t.element >= 0x1000:
            keys.add((str(ds[t.group << 16 | t.element >> 8].value), t.group, t.element & 0xFF))
        if el.VR == "SQ":
            for item in el.value:
                keys |= _private_keys(item)
    return keys


def test_uids_and_shift_are_consistent_across_studies_and_keyed():
    files = _files("ge", limit=2)
    uid = str(files[0].dataset.StudyInstanceUID)
    a, b = _ctx(), _ctx()
    assert a.new_uid(uid) == b.new_uid(uid)
    other_key = DeidContext("TRIAL", "s", "SUBJ01", "v", b"another-key", Deidentification(), -1)
    assert other_key.new_uid(uid) != a.new_uid(uid)
    assert date_shift_days(b"k", "T", "S1", 365) == date_shift_days(b"k", "T", "S1", 365)
    shifts = {date_shift_days(b"k", "T", f"S{i}", 365) for i in range(50)}
    assert len(shifts) > 40 and all(-365 <= s <= -1 for s in shifts)


def test_options_are_configurable():
    files = _files("trio", limit=1)
    opts = Deidentification(retain_patient_characteristics=False, retain_device_identity=False,
                            retain_safe_private=False, retain_longitudinal_modified_dates=False)
    ctx = _ctx(opts).prepare([files[0].dataset])
    serial = str(files[0].dataset.DeviceSerialNumber)
    data = to_bytes(deidentify(files[0].dataset, ctx))
    out = pydicom.dcmread(__import__("io").BytesIO(data))
    assert "PatientAge" not in out and "PatientWeight" not in out
    assert "DeviceSerialNumber" not in out or not out.DeviceSerialNumber
    assert not any(el.tag.is_private for el in out)
    assert not str(out.get("StudyDate", ""))
    assert serial.encode() not in data
    codes = {item.CodeValue for item in out.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113105"}


def test_verification_fails_closed_on_a_leak(monkeypatch):
    files = _files("ge", limit=4)
    name = str(files[0].dataset.PatientName)
    headers = [f.dataset for f in files]
    matcher = Matcher(collect_identifiers(headers), own_labels=["site-a"])
    ctx = _ctx().prepare(headers)
    import tasks.deid.series as mod

    def leaky(ds, c):
        deidentify(ds, c)
        ds.ImageComments = f"scanned for {name}"   # what a broken rule would leave behind
        return ds

    monkeypatch.setattr(mod, "deidentify", leaky)
    # in this process: forked workers would keep the broken rule for every later test
    monkeypatch.setattr(mod, "PARALLEL_MIN_FILES", len(files) + 1)
    out = deidentify_series(files, ctx, matcher, series_number=4)
    assert not out.ok and out.refused_code == "phi_left"
    assert {leak.source for leak in out.leaks} >= {"PatientName"}
    assert name not in out.refused  # the reason names the kind of value, never the value


def test_verifier_finds_values_in_names_and_compressed_tables():
    files = _files("philips", limit=1)
    matcher = Matcher(collect_identifiers([files[0].dataset]))
    pid = str(files[0].dataset.PatientID)
    assert find_leaks(f"deid/x/{pid}.dcm", b"", matcher)[0].where == "file name"
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.table({"c": [f"patient {str(files[0].dataset.StudyDate)}"]}), buf, compression="zstd")
    assert any("(unshifted)" in leak.source for leak in find_leaks("t.parquet", buf.getvalue(), matcher))


def test_ge_protocol_block_is_cleaned_inside_its_gzip_stream():
    from tasks.deid.verify import gzip_contents

    files = _files("ge", limit=2)
    headers = [f.dataset for f in files]
    matcher = Matcher(collect_identifiers(headers))
    # the original block names the exam (StudyID) in its gzip file name and stamps the scan date
    assert {leak.source for leak in find_leaks("orig.dcm", files[0].raw, matcher)} >= {"StudyID"}
    assert any(c.startswith(b"gzip-mtime 2018") for c in gzip_contents(files[0].raw))
    data = to_bytes(deidentify(files[0].dataset, _ctx().prepare(headers)))
    inside = gzip_contents(data)
    assert not any(c.startswith(b"gzip-mtime") for c in inside)
    assert any(b"SEDESC" in c for c in inside)   # the block itself survives for dcm2niix
    assert find_leaks("deid.dcm", data, matcher) == []


def test_private_bytes_are_overwritten_in_any_case_and_only_as_whole_short_values():
    from tasks.deid.profile import SameLength

    scrub = SameLength(uids={}, dates={}, text=SameLength.text_pattern(
        ["Regression", "Test", "27018", "M\u00c9NARD"]))
    value = b"REGRESSION test; Latest 127018 27018 TESTER m\xc9nard"
    out = scrub(value)
    assert len(out) == len(value)
    assert out == b"XXXXXXXXXX XXXX; Latest 127018 XXXXX TESTER XXXXXX"


def test_verifier_finds_numbers_inside_tokens_and_digit_runs():
    from tasks.deid.verify import Identifier

    uid, date = "1.2.840.113619.2.5.999", "20180918"
    matcher = Matcher([Identifier("StudyInstanceUID (original)", uid),
                       Identifier("StudyDate (unshifted)", date)])
    data = b"x 9." + uid.encode() + b".7 y 77" + date.encode() + b"1 z 1.2 1.2"
    hits = matcher.in_content(data)
    assert sorted(hits) == [("StudyDate (unshifted)", data.index(date.encode())),
                            ("StudyInstanceUID (original)", 2)]
    assert matcher.in_content(b"1.2.840 2018091 " * 50) == []
