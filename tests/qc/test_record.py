"""qc rows and the nightly retry: what is retried is chosen by reason code, never by text."""

from __future__ import annotations

from datetime import datetime, timezone

from tasks.lake.storage import Lake
from tasks.lake.tables import read_table, write_rows
from tasks.qc.record import NOT_RUN, clear_retryable

NOW = datetime(2026, 1, 2, tzinfo=timezone.utc)


def _verdict(series: str, code: str | None, reason: str, override_by: str | None = None) -> dict:
    return {"series_uid": series, "study_key": "k", "subject": "S", "session": "baseline",
            "pipeline_name": "anat", "pipeline_version": "0.1.0", "metric": "verdict", "status": "FAIL",
            "verdict": "FAIL", "automatic_verdict": "FAIL", "reason": reason, "reason_code": code,
            "override_by": override_by, "created_at": NOW}


def test_nightly_forgets_only_verdicts_of_runs_that_never_started(tmp_path):
    lake = Lake(str(tmp_path)).init()
    write_rows(lake, "qc", "s1", [
        _verdict("1", "engine_missing", "segmentation could not be computed: anat 0.1.0 not run: no podman"),
        _verdict("2", "image_missing", "segmentation could not be computed: anat 0.1.0 not run: no image"),
        # the same words, a data reason: the pipeline ran and refused the input
        _verdict("3", "pipeline_failed", "segmentation could not be computed: anat 0.1.0 failed (not run: 2D)"),
        _verdict("4", "qc_limit", "snr_wm 2 is below the fail limit 3"),
        _verdict("5", "engine_missing", "not run: no podman", override_by="Dr Reviewer"),   # a human decided
    ])
    assert {"engine_missing", "image_missing", "storage_unavailable"} <= NOT_RUN
    assert not NOT_RUN & {"pipeline_failed", "qc_limit", "phi_in_output", "unreadable"}
    assert clear_retryable(lake, "s1") == 2
    assert sorted(read_table(lake, "qc").series_uid) == ["3", "4", "5"]


def test_a_withdrawn_not_run_verdict_closes_its_query_and_deviation(tmp_path):
    """A FAIL written (by an older version) for a run that never started asked the site to re-send a
    scan that was fine: withdrawing it deletes that deviation and closes that query, and only that."""
    from datetime import date

    from tasks.conformance.findings import Finding, record_findings
    from tasks.lake.audit import read_events
    from tasks.lake.studies import Study

    lake = Lake(str(tmp_path)).init()
    study = Study("T", "s1", "k", "S", "baseline", "1.2.3", date(2026, 1, 1), 0, True)
    write_rows(lake, "studies", "s1", [{"study_key": "k", "trial_id": "T", "subject": "S", "session": "baseline",
                                         "study_uid": "1.2.3", "acquisition_date": date(2026, 1, 1),
                                         "days_from_baseline": 0, "in_window": True, "status": "accepted",
                                         "received_at": NOW}])
    write_rows(lake, "qc", "s1", [_verdict("1", "engine_missing", "not run: no podman"),
                                  _verdict("4", "qc_limit", "snr_wm 2 is below the fail limit 3")])
    record_findings(lake, study, [
        Finding("qc_fail", "major", "anat 0.1.0 QC FAIL: not run: no podman", parameter="anat",
                observed="FAIL", series_key="1", reason_code="engine_missing"),
        Finding("qc_fail", "major", "anat 0.1.0 QC FAIL: snr_wm 2", parameter="anat", observed="FAIL",
                series_key="4", reason_code="qc_limit")])
    assert read_table(lake, "studies").n_deviations.tolist() == [2]
    assert clear_retryable(lake, "s1") == 1
    deviations, queries = read_table(lake, "deviations"), read_table(lake, "queries")
    assert deviations.series_uid.tolist() == ["4"]
    by_deviation = dict(zip(queries.deviation_id, queries.status))
    assert sorted(by_deviation.values()) == ["closed", "open"]
    assert by_deviation[deviations.deviation_id.iloc[0]] == "open"     # the data FAIL's query stays open
    assert read_table(lake, "studies").n_deviations.tolist() == [1]
    (withdrawn,) = [e for e in read_events(lake) if e["action"] == "verdict_withdrawn"]
    assert withdrawn["details"]["series_uid"] == "1" and withdrawn["details"]["reason_code"] == "engine_missing"
    assert clear_retryable(lake, "s1") == 0                             # nothing left to withdraw
