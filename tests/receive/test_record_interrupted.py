"""A study's record cut short is taken up whole by the next attempt, never passed for received.

The ``studies`` row says a study was received (intake records nothing more for a study that has
one), so it is written last. Here the lake fails (StorageUnavailable, what an outage raises and
Prefect retries) at the audit append or at the studies write; receiving the same upload again
records the study once, logs its receipt once, and the audit chain verifies. The same moments
under ``kill -9`` are in tests/flows/test_kill9.py.
"""

from __future__ import annotations

import pytest

import tasks.receive.record as record
from tasks.intake.inventory import inventory_upload
from tasks.lake import tables
from tasks.lake.audit import read_events, verify_chain
from tasks.lake.storage import Lake, StorageUnavailable
from tasks.lake.tables import read_table
from tasks.receive.study import Upload, receive_one_study
from tests.data import shared_path

SITE = "siemens-xa30"


def _receive(trial, lake: Lake):
    # de-identification changes the parsed headers in place: every attempt reads the upload anew
    files = inventory_upload(shared_path("dcm_qa_xa30", "In")).accepted
    return receive_one_study(Upload(trial, SITE, "u1", lake), files)


@pytest.mark.parametrize("cut", ["audit", "studies"])
def test_a_record_cut_short_is_taken_up_whole_by_the_next_attempt(cut, trial, tmp_path, monkeypatch):
    lake = Lake(str(tmp_path / "lake")).init()
    first = _receive(trial, lake)

    def down(*args, **kwargs):
        raise StorageUnavailable("the lake is down")

    if cut == "audit":
        monkeypatch.setattr(record, "append_event", down)
    else:
        write_rows = tables.write_rows
        monkeypatch.setattr(tables, "write_rows", lambda lake, table, site, rows: down() if table == "studies"
                            else write_rows(lake, table, site, rows))
    with pytest.raises(StorageUnavailable):
        record.record_study(lake, first, first.matcher)
    monkeypatch.undo()
    assert read_table(lake, "studies").empty and len(read_table(lake, "series")) == 1
    assert [e["action"] for e in read_events(lake)] == ([] if cut == "audit" else ["study_received"])

    again = _receive(trial, lake)
    assert not again.already_received                    # no studies row: not taken for received
    record.record_study(lake, again, again.matcher)
    assert list(read_table(lake, "studies").study_key) == [first.study.study_key]
    assert len(read_table(lake, "series")) == 1
    actions = [e["action"] for e in read_events(lake)]
    assert actions == (["study_received"] if cut == "audit" else ["study_received", "study_record_resumed"])
    assert verify_chain(lake, anchor=None).ok
    assert _receive(trial, lake).already_received        # and from now on it is
