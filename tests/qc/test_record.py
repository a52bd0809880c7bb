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
