"""The nightly selection: exactly the studies with work left, and nothing else.

Built from real studies of ../shared/data (the Siemens XA30 T1 that anat takes, the GE EPI that no
pipeline takes), then each state a study can be in is made by writing what the stages would write.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import pytest

from pipelines.registry import get_spec
from tasks.bids.convert import convert_study
from tasks.intake.inventory import inventory_upload
from tasks.lake.storage import Lake
from tasks.lake.studies import read_study
from tasks.lake.tables import delete_rows, read_table, update_rows, write_rows
from tasks.qc.due import studies_due
from tasks.receive.record import record_study
from tasks.receive.study import Upload, receive_one_study
from tests.data import shared_path

NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)
UPLOADS = {"siemens-xa30": ("dcm_qa_xa30", "In"), "ge-nih": ("dcm_qa_nih", "In", "20180918GE")}


@pytest.fixture(scope="module")
def received(trial, tmp_path_factory):
    lake = Lake(str(tmp_path_factory.mktemp("due") / "lake")).init()
    keys = {}
    for site, parts in UPLOADS.items():
        o = receive_one_study(Upload(trial, site, "u", lake), inventory_upload(shared_path(*parts)).accepted)
        record_study(lake, o, o.matcher)
        keys[site] = o.study.study_key
    return lake, keys


def _due(lake, trial, specs=None):
    return {d.site: d.reasons for d in studies_due(lake, trial, specs or [get_spec("anat")])}


def _verdict(lake, site, uid, key, version, verdict, code=None, override_by=None):
    study = read_study(lake, site, key)
    write_rows(lake, "qc", site, [{
        "series_uid": uid, "study_key": key, "subject": study.subject, "session": study.session,
        "pipeline_name": "anat", "pipeline_version": version, "metric": "verdict", "status": verdict,
        "verdict": verdict, "automatic_verdict": verdict, "reason_code": code, "override_by": override_by,
        "created_at": NOW}])


def test_selection_follows_what_the_lake_holds(received, trial):
    lake, keys = received
    anat = get_spec("anat")
    # never processed: nothing in BIDS yet, both studies are due
    due = _due(lake, trial)
    assert set(due) == {"siemens-xa30", "ge-nih"} and all("not in BIDS yet" in r for r in due["ge-nih"])
    for site, key in keys.items():
        convert_study(lake, trial, read_study(lake, site, key))
    # converted: the GE EPI has no pipeline to wait for; the XA30 T1 waits for its anat verdict
    due = _due(lake, trial)
    assert list(due) == ["siemens-xa30"] and due["siemens-xa30"] == (f"series 5: no anat {anat.version} verdict",)
    (uid,) = read_table(lake, "series").query("series_number == 5 and site == 'siemens-xa30'").series_uid
    key = keys["siemens-xa30"]
    for verdict, code, is_due in (("PASS", None, False), ("WARN", "qc_site_outlier", False),
                                  ("FAIL", "qc_limit", False),         # a fact about the data: not retried
                                  ("FAIL", "engine_missing", True),    # never ran (an older version's FAIL)
                                  ("FAIL", "pipeline_failed", False)):
        _verdict(lake, "siemens-xa30", uid, key, anat.version, verdict, code)
        assert bool(_due(lake, trial)) is is_due, (verdict, code)
    _verdict(lake, "siemens-xa30", uid, key, anat.version, "FAIL", "engine_missing", override_by="Dr R")
    assert _due(lake, trial) == {}                                      # a person decided: left alone
    # a new pipeline version makes it due again; the old version's verdict does not count
    newer = replace(anat, version="9.9.9")
    assert _due(lake, trial, [newer]) == {"siemens-xa30": ("series 5: no anat 9.9.9 verdict",)}
    delete_rows(lake, "qc", "siemens-xa30", {"series_uid": uid})
    assert list(_due(lake, trial)) == ["siemens-xa30"]
    # a rejected study is never due
    update_rows(lake, "studies", "siemens-xa30", {"study_key": key}, lambda r: {**r, "status": "rejected"})
    assert _due(lake, trial) == {}
