"""A name component that is a common word does not block BIDS forever (issue: every vendor's data).

PatientName ``cd211006a^dcm2niix``: its component ``dcm2niix`` used to be "found" in every
sidecar's ``"ConversionSoftware": "dcm2niix"``, so the subject could never be converted; the name
``dicom`` was "found" inside ``pydicom`` in every Parquet file's metadata. The verifier now knows
what our own software writes (its software words, JSON keys) and does not search inside those
spans; a real name in any other text, glued to other words included, is still found.
"""

from __future__ import annotations

import pytest

from tasks.bids.convert import convert_study
from tasks.deid.fingerprint import Fingerprint
from tasks.deid.verify import OWN_WORDS, Identifier, Matcher, PHILeakError, check_no_phi, collect_identifiers
from tasks.intake.inventory import inventory_upload
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tasks.receive.record import record_study
from tasks.receive.study import Upload, receive_one_study
from tests.helpers import GE_SERIES, copy_upload, rewrite

# a name is found wherever it stands, glued to other text included
FOUND = [b"SMITH^JOHN", b"Dr Smith, reading", b"smith_01.dcm", b"01smith", b'"Operator": "smith"',
         b"JohnSmith_T1", b"T1_SMITHJ", b"blacksmith"]
# ... but not inside our own software's words, nor in a JSON key
EXCUSED = [b'{"ConversionSoftware": "dcm2niix"}', b'"ImageOrientationPatientDICOM": [1, 0]',
           b"created_by: pydicom 3.0.1", b"parquet-cpp-arrow version 20.0.0"]


@pytest.mark.parametrize("text", FOUND)
def test_a_name_is_found_in_any_text(text):
    m = Matcher([Identifier("PatientName component", "Smith")])
    fp = Fingerprint.from_json(Fingerprint.from_matcher(m, b"k").to_json(), b"k")
    assert m.in_content(text) and fp.in_content(text)
    assert m.in_name(text.decode())


@pytest.mark.parametrize("text", EXCUSED)
def test_our_own_words_and_json_keys_are_not_searched(text):
    m = Matcher([Identifier("PatientName component", w) for w in ("dcm2niix", "dicom", "pydicom", "arrow")])
    fp = Fingerprint.from_matcher(m, b"k")
    assert m.in_content(text) == [] and fp.in_content(text) == []
    assert m.in_content(b"patient dicom arrived") == []                      # the word itself is ours
    assert m.in_content(b"Mr Arrow arrived") != []                           # a surname only in a phrase


def test_a_patient_value_inside_a_kept_device_value_is_still_a_leak():
    """Patient PHILIPS^ANNA on a Philips scanner: the kept Manufacturer excuses only non-patient values."""
    ids = [Identifier("PatientName component", "PHILIPS"), Identifier("InstitutionName", "PHILIPS")]
    m = Matcher(ids, retained=["Philips Medical Systems"])
    fp = Fingerprint.from_matcher(m, b"k")
    hits = {src for src, _ in m.in_content(b'"Manufacturer": "Philips Medical Systems"')}
    assert hits == {"PatientName component"}
    assert {src for src, _ in fp.in_content(b'"Manufacturer": "Philips Medical Systems"')} == hits


def test_a_value_that_is_one_of_our_words_is_not_verifiable_but_the_rest_of_the_name_is():
    m = Matcher(collect_identifiers([_header("cd211006a^dcm2niix")]))
    assert "PatientName component" in m.not_verifiable          # recorded in the fingerprint
    assert m.in_content(b'{"ConversionSoftware": "dcm2niix"}') == []
    assert m.in_content(b"subject cd211006a") != []
    assert m.in_content(b"cd211006a^dcm2niix") != []
    assert {"dcm2niix", "pydicom", "parquet"} <= OWN_WORDS


def _header(name: str):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientName = name
    return ds


@pytest.mark.parametrize("name", ["cd211006a^dcm2niix", "dicom"])
def test_a_subject_named_with_a_software_word_is_received_tabled_and_converted(name, tmp_path, trial):
    up = copy_upload(tmp_path / "up", *GE_SERIES)    # the whole series: fewer files are incomplete, not converted
    for p in up.iterdir():
        rewrite(p, PatientName=name)
    lake = Lake(str(tmp_path / "lake")).init()
    o = receive_one_study(Upload(trial, "ge-nih", "u1", lake), inventory_upload(up).accepted)
    (series,) = o.series
    assert series.verdict != "rejected", [f.message for f in series.findings]
    record_study(lake, o, o.matcher)                    # Parquet metadata names pydicom and pandas
    assert len(read_table(lake, "series")) == 1
    images, findings = convert_study(lake, trial, o.study)
    assert findings == [] and len(images) == 1         # the sidecar names dcm2niix
    if name in OWN_WORDS:                               # a name that is one of our words, whole
        assert "PatientName" in o.matcher.not_verifiable
    else:                                               # the name itself still refuses a row
        with pytest.raises(PHILeakError):
            check_no_phi("rows", {"note": f"scan of {name}"}, [o.matcher])


@pytest.mark.parametrize("name, found", [
    ("deid/site-c/S/baseline/series-0301-d483b6dc/00062-0b75a27018f9.dcm", False),   # inside our hash
    ("reports/qc/1.2.3-ab27018cd.html", False),
    ("deid/x/00062-27018.dcm", True),                 # the number as a name part of its own
    ("sub-27018_ses-1_T1w.nii.gz", True),
    ("exam27018.dcm", True),                          # glued to a word, not inside a hash
    ("a27018ff.dcm", False),
    ("27018exam.dcm", True),                          # glued to a word that is no hex
    ("27018abc.dcm", False),                          # 8 hex characters with a letter: read as a hash
])
def test_a_number_inside_a_hash_we_wrote_is_no_leak(name, found):
    """A 5-digit StudyID in the digits of a sha256 prefix of a de-identified file's name."""
    m = Matcher([Identifier("StudyID", "27018")])
    fp = Fingerprint.from_matcher(m, b"k")
    assert bool(m.in_name(name)) is found and bool(fp.find_leaks(name, b"")) is found
    content = f'"path": "{name}"'.encode()
    assert bool(m.in_content(content)) is found and bool(fp.in_content(content)) is found
