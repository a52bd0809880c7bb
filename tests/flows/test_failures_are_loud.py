"""Failures after intake are loud, and sending an upload again is idempotent (issue: every vendor's data).

Before: when conversion failed the CLI printed "nothing new to process" and exited 0, the studies
row still said accepted with 0 deviations, re-ingesting the same upload did not retry the failed
conversion, and a rejected upload sent again rewrote every quarantine reason file and added
another audit event.

The failing series is built from a real one: half of its slices in another plane (a localizer's
three planes in one series, in the field), which dcm2niix cannot make one image of.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.lake.audit import read_events
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tests.helpers import DEMO_TRIAL, GE_SERIES, copy_upload, rewrite

pytestmark = pytest.mark.prefect


def _two_planes(tmp_path):
    up = copy_upload(tmp_path / "up", *GE_SERIES)     # all of it: a part would be incomplete, never converted
    for p in sorted(up.iterdir())[75:]:
        rewrite(p, ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    return up


def test_a_series_that_does_not_convert_fails_the_ingest_and_says_why_every_time(prefect_harness, tmp_path):
    up, lake_dir = _two_planes(tmp_path), str(tmp_path / "lake")
    args = ["ingest", str(up), "--site", "ge-nih", "--trial", str(DEMO_TRIAL), "--lake", lake_dir]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 1, first.output
    assert "1 series failed after intake" in first.output and "series 4: not in BIDS" in first.output
    assert "dcm2niix made 2 images" in first.output
    lake = Lake(lake_dir)
    (study,) = read_table(lake, "studies").itertuples()
    devs = read_table(lake, "deviations")
    assert "processing_failed" in set(devs.kind)
    assert study.n_deviations == len(devs) and study.status == "accepted_with_deviations"
    # rewriting the row for its count kept nulls null (not NaN: ComBat covariates read them)
    (part,) = [p for p in lake.find("tables/studies") if p.endswith(".parquet")]
    stored = pq.read_table(lake.path(part))
    assert stored.column("age_years").null_count == 1          # PatientAge 000Y: unknown
    # the same upload again: the study is known, its conversion is tried again and still fails
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "already received" in again.output and "series 4: not in BIDS" in again.output
    assert "nothing new to process" in again.output                  # no pipeline ran, and it says so
    assert len(read_table(lake, "deviations")) == len(devs)           # the same deviation, not a second one


def test_a_rejected_upload_sent_again_changes_nothing(prefect_harness, tmp_path):
    up = tmp_path / "junk"
    up.mkdir()
    (up / "a.dcm").write_bytes(b"not dicom at all" * 100)
    (up / "b.dcm").write_bytes(b"")
    lake_dir = str(tmp_path / "lake")
    args = ["ingest", str(up), "--site", "ge-nih", "--trial", str(DEMO_TRIAL), "--lake", lake_dir]
    assert CliRunner().invoke(app, args).exit_code == 1
    lake = Lake(lake_dir)
    quarantined = {p: lake.read_bytes(p) for p in lake.find("quarantine")}
    events = read_events(lake)
    assert len([p for p in quarantined if p.endswith(".reason.json")]) == 2
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "nothing was accepted" in res.output
    assert {p: lake.read_bytes(p) for p in lake.find("quarantine")} == quarantined
    assert read_events(lake) == events
    reason = json.loads(next(v for p, v in quarantined.items() if p.endswith("a.dcm.reason.json")))
    assert reason["file"] == "a.dcm" and reason["code"]


def test_ingest_on_a_worker_without_its_engine_says_so_and_records_no_verdict(prefect_harness, tmp_path):
    """`--backend apptainer` where apptainer is not installed: the command fails with the reason, in one
    line, no traceback; the study is received, and no qc row, deviation or site query says anything
    about the scan. The same study processed again with a working backend (here: Dask) is judged."""
    from tests.data import shared_path

    lake_dir = str(tmp_path / "lake")
    args = ["ingest", str(shared_path("dcm_qa_xa30", "In")), "--site", "siemens-xa30", "--trial", str(DEMO_TRIAL),
            "--lake", lake_dir]
    res = CliRunner().invoke(app, [*args, "--backend", "apptainer"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "anat" in res.output and "not run on backend 'apptainer'" in res.output and "No verdict" in res.output
    lake = Lake(lake_dir)
    assert len(read_table(lake, "studies")) == 1 and read_table(lake, "qc").empty
    assert "qc_fail" not in set(read_table(lake, "deviations").kind) and read_table(lake, "queries").empty
    key = read_table(lake, "studies").study_key.iloc[0]
    again = CliRunner().invoke(app, ["process", key[:12], "--site", "siemens-xa30", "--trial", str(DEMO_TRIAL),
                                     "--lake", lake_dir, "--runner", "dask"])
    assert again.exit_code == 0, again.output
    (verdict,) = read_table(lake, "qc").query("metric == 'verdict'").itertuples()
    assert verdict.verdict == "PASS" and verdict.backend == "local"
