"""Whose and when, on headers that suppress what they do not want to say (issue: every vendor's data).

Each case is a real GE series of ../shared/data transformed the way scanners and upstream tools
write suppressed values: ``***`` in every date and in the patient's name, birth date and age.
"""

from __future__ import annotations

from datetime import date

import pydicom
import pytest

from tasks.conformance.visits import date_finding
from tasks.intake.identify import RECEIPT, StudyDateError, SubjectError, study_date, subject_label
from tasks.intake.inventory import inventory_upload
from tasks.intake.placeholders import is_placeholder
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tasks.receive.record import record_study
from tasks.receive.study import Upload, receive_one_study
from tests.helpers import GE_SERIES, copy_upload, dicom_files, rewrite


@pytest.mark.parametrize("value", ["", "  ", "***", "****", "ANONYMOUS", "Unknown", "^^", "00000000", "x", "N/A"])
def test_placeholders(value):
    assert is_placeholder(value)


@pytest.mark.parametrize("value", ["Test^Regression", "DEV", "12343@hucheng", "stc_test", "19700101", "NIH FMRIF"])
def test_real_values_are_not_placeholders(value):
    assert not is_placeholder(value)


def _header(**values) -> pydicom.Dataset:
    ds = pydicom.dcmread(dicom_files(*GE_SERIES)[0], stop_before_pixels=True)
    for kw, v in values.items():
        setattr(ds, kw, v)
    return ds


def test_the_date_falls_back_through_the_images_own_dates_then_the_receipt(recwarn):
    real = _header()
    assert study_date([real]) == study_date([real], date(2030, 1, 1))
    assert study_date([real]).source == "StudyDate"
    no_study = _header(StudyDate="***")
    assert study_date([no_study]).source == "SeriesDate"
    assert study_date([no_study]).value == study_date([real]).value
    # the first file suppresses everything, a later one does not: the later one's date counts
    suppressed = _header(StudyDate="***", SeriesDate="***", AcquisitionDate="***", ContentDate="***")
    assert study_date([suppressed, real]).source == "StudyDate"
    got = study_date([suppressed], received=date(2026, 12, 2))
    assert (got.value, got.source) == (date(2026, 12, 2), RECEIPT)
    with pytest.raises(StudyDateError, match="no readable StudyDate"):
        study_date([suppressed])


def test_how_sure_the_visit_date_is_becomes_a_deviation():
    assert date_finding("StudyDate") is None
    minor = date_finding("AcquisitionDate")
    assert (minor.kind, minor.severity, minor.observed) == ("study_date_substituted", "minor", "AcquisitionDate")
    major = date_finding(RECEIPT)
    assert major.severity == "major" and "confirm the scan date" in major.message
    assert major.reason_code == "date_unreadable"


def test_a_placeholder_patient_id_attributes_the_study_to_no_one(trial):
    with pytest.raises(SubjectError, match="placeholder"):
        subject_label(trial, "ge-nih", "***")
    with pytest.raises(SubjectError, match="placeholder"):
        subject_label(trial, "ge-nih", "ANONYMOUS")
    roster = trial.model_copy(update={"subjects": trial.subjects.model_copy(
        update={"mode": "roster", "roster": {"ge-nih": {"***": "S001"}}})})
    assert subject_label(roster, "ge-nih", "***") == "S001"   # a site's roster may map it: its decision


def test_a_study_whose_dates_and_names_are_suppressed_is_received(tmp_path, trial, recwarn):
    """Every date ``***``, PatientName, PatientBirthDate and PatientAge ``***``: accepted, dated by
    its arrival with a major deviation and a site query, and not refused as a PHI leak."""
    up = copy_upload(tmp_path / "up", *GE_SERIES, limit=6)
    for p in sorted(up.iterdir()):
        ds = pydicom.dcmread(p)
        for elem in ds.iterall():
            if elem.VR == "DA":
                elem.value = "***"
        ds.save_as(p, enforce_file_format=True)
        rewrite(p, PatientName="***", PatientBirthDate="***", PatientAge="***")
    lake = Lake(str(tmp_path / "lake")).init()
    o = receive_one_study(Upload(trial, "ge-nih", "u1", lake), inventory_upload(up).accepted)
    (series,) = o.series
    assert series.verdict != "rejected" and series.deid_path, [f.message for f in series.findings]
    assert o.study.session == "baseline" and o.study.acquisition_date < date.today()   # shifted back
    (dated,) = [f for f in o.findings if f.kind == "study_date_substituted"]
    assert dated.severity == "major" and dated.observed == RECEIPT
    record_study(lake, o, o.matcher)
    deviations = read_table(lake, "deviations")
    assert "study_date_substituted" in set(deviations.kind)
    queries = read_table(lake, "queries")
    assert any("confirm the scan date" in m for m in queries.message)
