"""A name component that is a common word does not block BIDS forever (issue: every vendor's data).

PatientName ``cd211006a^dcm2niix``: its component ``dcm2niix`` used to be "found" in every
sidecar's ``"ConversionSoftware": "dcm2niix"``, so the subject could never be converted; the name
``dicom`` was "found" inside ``pydicom`` in every Parquet file's metadata. Values are matched as
whole tokens now, and a value equal to a word our own software writes is not verifiable by
content; a real name in free text is still found.
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

FOUND = [b"SMITH^JOHN", b"Dr Smith, reading", b"smith_01.dcm", b"01smith", b'"Operator": "smith"']
NOT_FOUND = [b"blacksmith", b"smithers", b"goldsmith2"]


@pytest.mark.parametrize("text", FOUND)
def test_a_name_is_found_as_a_token(text):
    m = Matcher([Identifier("PatientName component", "Smith")])
    fp = Fingerprint.from_json(Fingerprint.from_matcher(m, b"k").to_json(), b"k")
    assert m.in_content(text) and fp.in_content(text)
    assert m.in_name(text.decode())


@pytest.mark.parametrize("text", NOT_FOUND)
def test_a_name_inside_another_word_is_not(text):
    m = Matcher([Identifier("PatientName component", "Smith")])
    fp = Fingerprint.from_matcher(m, b"k")
    assert m.in_content(text) == [] and fp.in_content(text) == []


def test_digits_bound_digits_and_letters_bound_letters():
    m = Matcher([Identifier("PatientID", "AB1234")])
    assert m.in_content(b"id AB1234_t1") and m.in_content(b"xAB1234") == [] and m.in_content(b"AB12345") == []
    assert m.in_content(b"AB1234x")                   # a letter after a digit ends the token


def test_a_value_that_is_one_of_our_words_is_not_verifiable_but_the_rest_of_the_name_is():
    m = Matcher(collect_identifiers([_header("cd211006a^dcm2niix")]))
    assert "PatientName component" in m.not_verifiable
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
    up = copy_upload(tmp_path / "up", *GE_SERIES, limit=10)
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
