"""A study already in the lake is recognised wherever it arrives (issue: every vendor's data, class 11).

The same images (the same SOPInstanceUIDs) sent again by another site, under another PatientID,
or with another trial file must not become a second subject: they are refused, with a reason
that says where the study already is. Sent again as they were, they are "already received".
"""

from __future__ import annotations

import pytest

from tasks.intake.inventory import inventory_upload
from tasks.lake.storage import Lake
from tasks.receive.record import record_study
from tasks.receive.study import StudyElsewhereError, Upload, receive_one_study
from tests.data import shared_path
from tests.helpers import copy_upload, rewrite


@pytest.fixture
def lake_with_xa30(tmp_path, trial):
    lake = Lake(str(tmp_path / "lake")).init()
    o = receive_one_study(Upload(trial, "siemens-xa30", "u1", lake),
                          inventory_upload(shared_path("dcm_qa_xa30", "In")).accepted)
    record_study(lake, o, o.matcher)
    return lake, o


def test_the_same_study_from_another_site_or_trial_is_refused(lake_with_xa30, trial):
    lake, first = lake_with_xa30
    files = inventory_upload(shared_path("dcm_qa_xa30", "In")).accepted
    again = receive_one_study(Upload(trial, "siemens-xa30", "u2", lake), files)
    assert again.already_received and again.study.subject == first.study.subject
    files = inventory_upload(shared_path("dcm_qa_xa30", "In")).accepted
    with pytest.raises(StudyElsewhereError, match=f"site siemens-xa30, subject {first.study.subject}") as err:
        receive_one_study(Upload(trial, "siemens-nih", "u3", lake), files)
    assert err.value.code == "study_elsewhere"
    assert "not received again as trial SHAREDDEMO, site siemens-nih" in str(err.value)
    other_trial = trial.model_copy(update={"trial_id": "OTHER"})
    with pytest.raises(StudyElsewhereError, match="trial SHAREDDEMO"):
        receive_one_study(Upload(other_trial, "siemens-xa30", "u4", lake),
                          inventory_upload(shared_path("dcm_qa_xa30", "In")).accepted)


def test_the_same_images_under_another_patient_id_are_refused(lake_with_xa30, trial, tmp_path):
    lake, first = lake_with_xa30
    up = copy_upload(tmp_path / "up", "dcm_qa_xa30", "In")
    for p in up.iterdir():
        rewrite(p, PatientID="SOMEONE-ELSE")
    with pytest.raises(StudyElsewhereError, match=f"subject {first.study.subject}"):
        receive_one_study(Upload(trial, "siemens-xa30", "u5", lake), inventory_upload(up).accepted)
