"""The site dashboard and `corelab status` on a real lake, checked against duckdb on the same Parquet.

The lake: GE's EPI (site ge-nih, a study with minor protocol deviations), and at site
siemens-xa30 the real XA30 T1 of two subjects made from it (new UIDs and PatientIDs), one of
whom comes back for month06 (StudyDate + 182 days) and again on day 260, in no visit's window
(month12 out of window: a major deviation and a site query); one XA30 study is processed
(anat, local), so the qc table holds a verdict. At ``as_of`` = 200 days after receipt the
second subject's month06 window (182 + 14 days) has closed: one missing visit; its month12
(opens day 344) is not expected yet. Every figure of the page equals the same question asked of the Parquet files with
duckdb, and the page written to the lake shows those rows.
"""

from __future__ import annotations

import re
import shlex
import shutil
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from data_contracts.trial import load_trial
from flows.cli import app
from flows.process_study import process_study
from flows.receive_study import receive_study
from harmonization.lake import covariates_from_studies
from tasks.conformance.findings import Finding, record_findings
from tasks.lake.audit import read_events
from tasks.lake.storage import Lake
from tasks.lake.studies import read_study
from tasks.lake.tables import read_table, update_rows, write_rows
from tasks.qc.overrides import OverrideError, override
from tasks.qc.queries import answer, escalate_overdue
from tasks.report.missing import record_missing_visits
from tasks.report.qc_page import write_qc_pages
from tasks.report.sites_page import PAGE, render_sites_page, write_sites_page
from tasks.report.status import LakeTables, site_table, utc, visit_expectations, visit_table
from tests.browser import chromium, images, table
from tests.data import shared_path
from tests.helpers import DEMO_TRIAL

pytestmark = [pytest.mark.prefect, pytest.mark.pipeline]
XA30 = ("dcm_qa_xa30", "In", "5_anat-T1w_acq-tfl")
GE = ("dcm_qa_nih", "In", "20180918GE", "mr_0004")


def _xa30_copy(dest: Path, patient: str, days: int = 0, study_uid: str | None = None) -> Path:
    """The XA30 T1 as a study of ``patient`` ``days`` after the original date."""
    (src,) = [p for p in shared_path(*XA30).iterdir() if p.suffix == ".dcm"]
    ds = pydicom.dcmread(src)
    ds.PatientID, ds.PatientName = patient, f"{patient}^TEST"
    shifted = (datetime.strptime(ds.StudyDate, "%Y%m%d") + timedelta(days=days)).strftime("%Y%m%d")
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        if kw in ds:
            setattr(ds, kw, shifted)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dest.mkdir(parents=True)
    ds.save_as(dest / "t1.dcm", enforce_file_format=True)
    return dest


@pytest.fixture(scope="module")
def lake(prefect_harness, tmp_path_factory, trial):
    root = tmp_path_factory.mktemp("sites")
    store = Lake(str(root / "lake")).init()
    receive_study(str(shared_path(*GE)), "ge-nih", lake_url=store.url, trial=trial)
    (a,) = receive_study(str(_xa30_copy(root / "a0", "SUBJ-A")), "siemens-xa30", lake_url=store.url, trial=trial)
    receive_study(str(_xa30_copy(root / "b0", "SUBJ-B")), "siemens-xa30", lake_url=store.url, trial=trial)
    receive_study(str(_xa30_copy(root / "a6", "SUBJ-A", days=182)), "siemens-xa30", lake_url=store.url,
                  trial=trial)
    # day 260 is in no window: month12 out of window, a major deviation, a site query
    receive_study(str(_xa30_copy(root / "a9", "SUBJ-A", days=260)), "siemens-xa30", lake_url=store.url,
                  trial=trial)
    process_study(a.study.study_key, "siemens-xa30", lake_url=store.url, trial=trial)
    return store


def _duck(lake: Lake, table: str) -> str:
    """The table's partitions for duckdb (an empty query when the lake holds none of it yet)."""
    if not list(Path(lake.root, "tables", table).glob("site=*/*.parquet")):
        return "(select null::varchar site, null::varchar verdict, null::varchar status where false)"
    return f"read_parquet('{lake.root}/tables/{table}/site=*/*.parquet', hive_partitioning=true, union_by_name=true)"


def test_every_site_figure_equals_duckdb_on_the_same_parquet(lake, trial):
    as_of = utc(datetime.now(timezone.utc) + timedelta(days=200))
    sites = site_table(trial, LakeTables.read(lake), as_of).set_index("site")
    con = duckdb.connect()
    studies = con.sql(f"select site, count(*) n, count(distinct subject) subjects from {_duck(lake, 'studies')} "
                      "group by site").df().set_index("site")
    series = con.sql(f"select site, count(*) n from {_duck(lake, 'series')} group by site").df().set_index("site")
    deviating = con.sql(f"select site, count(distinct study_key) n from {_duck(lake, 'deviations')} "
                        "group by site").df().set_index("site")
    verdicts = con.sql(f"""
        select site, verdict, count(*) n from (
          select site, verdict, row_number() over (partition by series_uid, pipeline_name
                                                   order by created_at desc) r
          from {_duck(lake, 'qc')} where metric = 'verdict') where r = 1 group by site, verdict""").df()
    queries = con.sql(f"select site, count(*) n from {_duck(lake, 'queries')} "
                      "where status in ('open', 'answered', 'escalated') group by site").df().set_index("site")
    assert set(studies.index) == {"ge-nih", "siemens-xa30"}
    for site in studies.index:
        row = sites.loc[site]
        assert row["studies"] == studies.loc[site, "n"] and row["subjects"] == studies.loc[site, "subjects"]
        assert row["series"] == series.loc[site, "n"]
        n_dev = deviating.loc[site, "n"] if site in deviating.index else 0
        assert row["deviation_rate"] == pytest.approx(n_dev / studies.loc[site, "n"])
        for verdict in ("PASS", "WARN", "FAIL"):
            n = verdicts[(verdicts.site == site) & (verdicts.verdict == verdict)]["n"].sum()
            assert row[f"qc_{verdict.lower()}"] == n
        assert row["open_queries"] == (queries.loc[site, "n"] if site in queries.index else 0)
    # the lake holds what the scenario planted
    assert sites.loc["siemens-xa30", "subjects"] == 2 and sites.loc["siemens-xa30", "studies"] == 4
    assert sites.loc["siemens-xa30", ["qc_pass", "qc_warn", "qc_fail"]].sum() == 1
    assert sites.loc["ge-nih", "deviation_rate"] == 1.0 and sites.loc["siemens-xa30", "open_queries"] >= 1
    assert sites.loc["siemens-xa30", "deviation_rate"] == pytest.approx(1 / 4)


def test_visits_are_expected_by_their_windows_and_a_closed_window_is_missing(lake, trial):
    tables = LakeTables.read(lake)
    now = datetime.now(timezone.utc)
    xa = lambda as_of: visit_table(trial, tables, utc(as_of)).query("site == 'siemens-xa30'").set_index("visit")  # noqa: E731
    early = xa(now + timedelta(days=10))           # baselines, and what arrived (all of it did today)
    assert early.loc["baseline", ["expected", "received", "missing"]].tolist() == [2, 2, 0]
    assert early.loc["month06", ["expected", "received", "missing", "due"]].tolist() == [1, 1, 0, 0]
    within = xa(now + timedelta(days=175))         # month06 window open: A received, B due
    assert within.loc["month06", ["expected", "received", "missing", "due"]].tolist() == [2, 1, 0, 1]
    late = xa(now + timedelta(days=200))           # window closed: B's month06 is missing
    assert late.loc["month06", ["expected", "received", "missing", "due"]].tolist() == [2, 1, 1, 0]
    # A's day-260 study took month12 (out of window): received early; B's month12 is not expected yet
    assert late.loc["month12", ["expected", "received", "missing"]].tolist() == [1, 1, 0]


def test_the_page_in_the_lake_shows_the_sites_the_missing_visit_and_the_epochs(lake, trial, tmp_path):
    copy = Lake(str(tmp_path / "lake"))
    shutil.copytree(lake.root, copy.root)
    as_of = datetime.now(timezone.utc) + timedelta(days=200)
    assert write_sites_page(copy, trial, as_of, version="test") == PAGE
    html = Path(copy.path(PAGE)).read_text()
    sites = {r[0]: r for r in table(html, "sites")[1:]}
    expected = site_table(trial, LakeTables.read(copy), utc(as_of)).set_index("site")
    assert set(sites) == {s.id for s in trial.sites} | {"trial"}
    for site in ("ge-nih", "siemens-xa30"):
        assert sites[site][2] == str(expected.loc[site, "studies"])
        assert sites[site][4] == f"{expected.loc[site, 'received_visits']} / {expected.loc[site, 'expected_visits']}"
    missing = table(html, "missing")[1:]          # GE's subject and XA30's second subject, at month06
    assert sorted((r[0], r[2]) for r in missing) == [("ge-nih", "month06"), ("siemens-xa30", "month06")]
    epochs = table(html, "epochs")[1:]
    assert {r[0] for r in epochs} == {"ge-nih", "siemens-xa30"}
    assert "<svg" in html and "<script" not in html            # self-contained: nothing fetched, nothing run
    assert not re.search(r'(src|href)="(https?:)?//', html)
    queries = table(html, "queries")[1:]
    assert queries and all(r[0] == "siemens-xa30" and r[2] == "month12" for r in queries)


def test_status_and_report_commands(lake, tmp_path):
    copy = tmp_path / "lake"
    shutil.copytree(lake.root, copy)
    runner = CliRunner()
    out = runner.invoke(app, ["status", "--trial", str(DEMO_TRIAL), "--lake", str(copy)], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    lines = {line.split("│")[1].strip(): line for line in out.output.splitlines() if line.count("│") > 5}
    assert "siemens-xa30" in lines and "ge-nih" in lines and "trial" in lines
    done = runner.invoke(app, ["report", "sites", "--trial", str(DEMO_TRIAL), "--lake", str(copy),
                               "--as-of", "2031-01-01"])
    assert done.exit_code == 0, done.output
    assert (copy / "reports" / "sites.html").stat().st_size > 1000
    bad = runner.invoke(app, ["report", "sites", "--trial", str(DEMO_TRIAL), "--lake", str(copy), "--as-of", "soon"])
    assert bad.exit_code == 2 and "not an ISO date" in bad.output


def test_chromium_shows_the_dashboard_a_person_reads(lake, trial, tmp_path):
    """What a person sees, through a real browser: the DOM Chromium built from the page has the site
    table with the planted missing visits and the query, the epoch timeline is drawn (one bar per
    epoch), and a screenshot under the lake's reports/ is a page, not a blank."""
    copy = Lake(str(tmp_path / "lake"))
    shutil.copytree(lake.root, copy.root)
    write_sites_page(copy, trial, datetime.now(timezone.utc) + timedelta(days=200), version="test")
    url = Path(copy.path(PAGE)).as_uri()
    dom = chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    sites = {r[0]: r for r in table(dom.stdout, "sites")[1:]}
    assert sites["siemens-xa30"][5] == "1" and sites["ge-nih"][5] == "1"       # missing visits
    assert sites["siemens-xa30"][10] == "1"                                     # open queries
    svg = dom.stdout[dom.stdout.index("<svg"):dom.stdout.index("</svg>")]
    # matplotlib draws the figure, the axes and its 4 spines as patches, then one bar per epoch
    assert svg.count('<g id="patch_') == 6 + len(table(dom.stdout, "epochs")[1:])
    shot = Path(copy.path("reports/screenshots/sites.png"))
    shot.parent.mkdir(parents=True)
    done = chromium("--window-size=1400,1800", f"--screenshot={shot}", url)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (1800, 1400)
    rows_with_ink = (pixels < 128).any(axis=1).mean()
    assert rows_with_ink > 0.2, f"only {rows_with_ink:.0%} of the screenshot's rows hold anything dark"


def test_the_qc_page_shows_what_a_reviewer_decides_from_and_its_command_records_the_decision(lake, tmp_path):
    copy = tmp_path / "lake"
    shutil.copytree(lake.root, copy)
    store = Lake(str(copy))
    qc = read_table(store, "qc")
    (uid,) = set(qc["series_uid"])
    runner = CliRunner()
    done = runner.invoke(app, ["report", "qc", uid[:20], "--lake", str(copy)])
    assert done.exit_code == 0, done.output
    page = copy / "reports" / "qc" / f"{uid}.html"
    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert re.search(r'id="verdict-anat">PASS<', html)
    # every metric of the run, with its value, as the qc table holds it
    rows = {r[0]: r for r in table(html, "metrics-anat")[1:]}
    metrics = qc[qc["metric"] != "verdict"].set_index("metric")
    assert set(rows) == set(metrics.index)
    for m, r in rows.items():
        assert float(r[1]) == pytest.approx(metrics.loc[m, "value"], rel=1e-2), m
        assert r[2].startswith(metrics.loc[m, "status"])
    provenance = {r[0]: r[1] for r in table(html, "provenance-anat")}
    assert provenance["input sha256"] == metrics["input_sha256"].iloc[0]
    assert provenance["backend"] == "local" and provenance["flow run"] == metrics["flow_run_id"].iloc[0]
    # the mosaics and the strip plot are real pictures: the mask's outline is drawn in red
    pics = images(html)
    assert len(pics) == 4                                  # axial + sagittal mask, segmentation, metrics
    for img in pics:
        assert img.shape[0] > 100 and img.std() > 20, "an image of the page is blank"
    red = (pics[0][..., 0] > 200) & (pics[0][..., 1] < 60) & (pics[0][..., 2] < 60)
    assert red.sum() > 200, "the brain mask's outline is not on the axial mosaic"
    shot = copy / "reports" / "screenshots" / f"qc-{uid}.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert chromium("--window-size=1300,2600", f"--screenshot={shot}", page.as_uri()).returncode == 0
    assert (np.asarray(Image.open(shot).convert("L")) < 128).any(axis=1).mean() > 0.3
    # the page's command, run as printed (with a reason), records the decision
    command = re.search(r'<pre id="command-anat">([^<]+)</pre>', html).group(1)
    words = shlex.split(command.replace("&lt;what you saw&gt;", "motion in the frontal slices"))
    assert words[:3] == ["corelab", "qc", "override"] and words[3] == uid
    done = runner.invoke(app, [*words[1:], "--lake", str(copy)])
    assert done.exit_code == 0, done.output
    assert read_table(store, "qc").query("metric == 'verdict'")["verdict"].tolist() == ["FAIL"]
    assert runner.invoke(app, ["report", "qc", uid, "--lake", str(copy)]).exit_code == 0
    again = page.read_text()
    assert 'id="verdict-anat">FAIL<' in again and "motion in the frontal slices" in again
    # the dashboard links the page
    write_sites_page(store, load_trial(DEMO_TRIAL))
    sites = (copy / "reports" / "sites.html").read_text()
    assert f'href="qc/{uid}.html"' in sites


def test_a_qc_page_for_a_series_never_processed_is_refused_in_one_line(lake):
    done = CliRunner().invoke(app, ["report", "qc", "1.2.3.4.5", "--lake", str(lake.root)])
    assert done.exit_code == 2 and "no processed series '1.2.3.4.5'" in done.output
    assert "Traceback" not in done.output


def test_studies_and_qc_list_show_the_lake_by_the_ids_the_commands_take(lake, tmp_path):
    copy = tmp_path / "lake"
    shutil.copytree(lake.root, copy)
    runner, env = CliRunner(), {"COLUMNS": "250"}
    out = runner.invoke(app, ["studies", "--lake", str(copy), "--site", "siemens-xa30"], env=env)
    assert out.exit_code == 0, out.output
    rows = [line.split("│")[1:-1] for line in out.output.splitlines() if line.startswith("│")]
    studies = read_table(Lake(str(copy)), "studies").query("site == 'siemens-xa30'")
    assert sorted(r[2].strip() for r in rows) == sorted(studies["session"])
    assert sum(r[6].strip() == "PASS 1" for r in rows) == 1
    qc = read_table(Lake(str(copy)), "qc")
    (uid,) = set(qc["series_uid"])
    listed = runner.invoke(app, ["qc", "list", "--lake", str(copy), "--verdict", "pass"], env=env)
    assert listed.exit_code == 0 and uid in listed.output and "PASS" in listed.output
    assert uid not in runner.invoke(app, ["qc", "list", "--lake", str(copy), "--verdict", "FAIL"], env=env).output
    assert runner.invoke(app, ["qc", "override", uid, "--verdict", "fail", "--reason", "ghosting",
                               "--lake", str(copy)]).exit_code == 0
    failed = runner.invoke(app, ["qc", "list", "--lake", str(copy), "--verdict", "FAIL"], env=env)
    assert uid in failed.output and "PASS -> FAIL" in failed.output and "ghosting" in failed.output
    bad = runner.invoke(app, ["qc", "list", "--lake", str(copy), "--verdict", "maybe"])
    assert bad.exit_code == 2 and "choose one of PASS, WARN, FAIL" in bad.output


def _cut_copy(dest: Path, patient: str, study_uid: str) -> Path:
    """The XA30 T1 of ``patient`` with its last 35 % of frames blanked: a scan cut short."""
    folder = _xa30_copy(dest, patient, study_uid=study_uid)
    ds = pydicom.dcmread(folder / "t1.dcm")
    pixels = ds.pixel_array.copy()
    pixels[int(len(pixels) * 0.65):] = 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(folder / "t1.dcm", enforce_file_format=True)
    return folder


def test_a_query_is_answered_resolved_and_escalated_with_who_and_when(lake, trial, tmp_path):
    copy = Lake(str(tmp_path / "lake"))
    shutil.copytree(lake.root, copy.root)
    runner, env = CliRunner(), {"COLUMNS": "250"}
    (qid,) = read_table(copy, "queries")["query_id"]
    listed = runner.invoke(app, ["queries", "list", "--trial", str(DEMO_TRIAL), "--lake", str(copy.root)], env=env)
    assert listed.exit_code == 0 and qid in listed.output and "open" in listed.output
    done = runner.invoke(app, ["queries", "answer", qid[:8], "--text", "the visit was late; patient was ill",
                               "--lake", str(copy.root)])
    assert done.exit_code == 0, done.output
    row = read_table(copy, "queries").iloc[0]
    assert row["status"] == "answered" and row["answered_by"] and row["answer"].startswith("the visit was late")
    # nobody resolved it: 5 working days later the nightly escalation takes it, and it heads the lists
    assert escalate_overdue(copy, trial, now=datetime.now(timezone.utc) + timedelta(days=4)) == []   # < 5 working days
    later = datetime.now(timezone.utc) + timedelta(days=10)                                     # > 5, any weekday
    assert escalate_overdue(copy, trial, now=later) == [qid]
    row = read_table(copy, "queries").iloc[0]
    assert row["status"] == "escalated" and abs((row["escalated_at"] - later).total_seconds()) < 1
    assert escalate_overdue(copy, trial, now=later + timedelta(days=1)) == []                 # once
    page = render_sites_page(trial, LakeTables.read(copy))
    assert "escalated" in table(page, "queries")[1]
    done = runner.invoke(app, ["queries", "resolve", qid, "--resolution", "accepted out of window",
                               "--lake", str(copy.root)])
    assert done.exit_code == 0, done.output
    row = read_table(copy, "queries").iloc[0]
    assert row["status"] == "resolved" and row["resolution"] == "accepted out of window"
    events = [e for e in read_events(copy) if e["action"].startswith("query_")]
    assert [e["action"] for e in events] == ["query_answered", "query_escalated", "query_resolved"]
    assert events[0]["actor"] == row["answered_by"] == events[2]["actor"] == row["resolved_by"]
    assert events[1]["actor"] == "corelab"
    again = runner.invoke(app, ["queries", "resolve", qid, "--resolution", "twice", "--lake", str(copy.root)])
    assert again.exit_code == 2 and "resolved already" in again.output
    assert runner.invoke(app, ["queries", "answer", "QX", "--text", "x", "--lake", str(copy.root)]).exit_code == 2


def test_a_resent_series_that_passes_resolves_the_query_its_failure_raised(lake, trial, tmp_path):
    """A site's T1 cut short FAILs the QC gate (a query goes to the site); the site sends the full
    scan again in the same study; it passes, and the query resolves itself, audited."""
    copy = Lake(str(tmp_path / "lake"))
    shutil.copytree(lake.root, copy.root)
    study_uid = generate_uid()
    (cut,) = receive_study(str(_cut_copy(tmp_path / "cut", "SUBJ-D", study_uid)), "siemens-xa30",
                           lake_url=copy.url, trial=trial)
    (sq,) = process_study(cut.study.study_key, "siemens-xa30", lake_url=copy.url, trial=trial)
    assert sq.verdict.status == "FAIL", sq.verdict.reasons
    (q,) = read_table(copy, "queries").query("subject == @cut.study.subject").itertuples()
    assert q.status == "open" and "QC FAIL" in q.message
    # (on a copy) a reviewer who passes the series instead settles the query too, in their name
    reviewed = Lake(str(tmp_path / "reviewed"))
    shutil.copytree(copy.root, reviewed.root)
    event = override(reviewed, sq.run.series_uid, "pass", "coverage enough for the endpoint", "reviewer-1")
    assert event["queries_resolved"] == [q.query_id]
    (r,) = read_table(reviewed, "queries").query("query_id == @q.query_id").itertuples()
    assert (r.status, r.resolved_by) == ("resolved", "reviewer-1") and "coverage enough" in r.resolution
    (full,) = receive_study(str(_xa30_copy(tmp_path / "full", "SUBJ-D", study_uid=study_uid)), "siemens-xa30",
                            lake_url=copy.url, trial=trial)
    assert full.study.session == cut.study.session                        # the same visit, re-sent
    (sq,) = process_study(full.study.study_key, "siemens-xa30", lake_url=copy.url, trial=trial)
    assert sq.verdict.status == "PASS"
    (q,) = read_table(copy, "queries").query("query_id == @q.query_id").itertuples()
    assert q.status == "resolved" and q.resolved_by == "corelab" and sq.run.series_uid in q.resolution
    (event,) = [e for e in read_events(copy) if e["action"] == "query_resolved"]
    assert event["details"]["query_id"] == q.query_id


def test_harmonization_covariates_come_from_the_headers_the_studies_table_kept(lake, trial):
    """Without a covariate file, age and sex are the DICOM headers' (PatientAge, PatientSex), one row
    per subject and visit: the statistician's batch and covariates both come from the lake."""
    cov = covariates_from_studies(lake, trial.trial_id)
    studies = read_table(lake, "studies")
    assert len(cov) == len(studies.drop_duplicates(["subject", "session"])) == 5
    (src,) = [p for p in shared_path(*XA30).iterdir() if p.suffix == ".dcm"]
    header = pydicom.dcmread(src, stop_before_pixels=True)
    xa = cov[cov["subject"].isin(studies.query("site == 'siemens-xa30'")["subject"])]
    assert set(xa["SEX"]) == {str(header.PatientSex)}
    assert set(xa["AGE"].round()) == {float(int(str(header.PatientAge)[:3]))}
    assert "studies table" in cov.attrs["source"]


def test_a_query_raised_again_keeps_its_answer_and_a_withdrawn_one_reopens(lake, tmp_path):
    """The same deviation found again (a series judged again by a new pipeline version) must not
    blank the query's life; a query corelab withdrew (closed) is raised afresh."""
    copy = Lake(str(tmp_path / "lake"))
    shutil.copytree(lake.root, copy.root)
    (q,) = read_table(copy, "queries").itertuples()
    answer(copy, q.query_id, "the patient came late", "site-coordinator")
    (dev,) = read_table(copy, "deviations").query("deviation_id == @q.deviation_id").itertuples()
    study = read_study(copy, dev.site, dev.study_key)
    again = Finding(kind=dev.kind, severity=dev.severity, message=dev.message, parameter=dev.parameter,
                    expected=dev.expected, observed=dev.observed, series_key=dev.series_uid)
    record_findings(copy, study, [again])
    (row,) = read_table(copy, "queries").itertuples()
    assert (row.status, row.answer, row.answered_by) == ("answered", "the patient came late", "site-coordinator")
    update_rows(copy, "queries", dev.site, {"query_id": q.query_id}, lambda r: {**r, "status": "closed"})
    record_findings(copy, study, [again])
    (row,) = read_table(copy, "queries").itertuples()
    assert row.status == "open"


def test_the_override_a_page_prints_works_when_older_versions_or_other_pipelines_judged_the_series(lake, tmp_path):
    """A series judged by an older anat version too is overridden in its newest judgement; judged by a
    second pipeline, the override asks which (--pipeline), as the QC page's command says."""
    copy = Lake(str(tmp_path / "lake"))
    shutil.copytree(lake.root, copy.root)
    qc = read_table(copy, "qc")
    (site,) = set(qc["site"])
    def plain(v):   # as a row is written: nulls as None, times as datetime
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NaT:
            return None
        return v.to_pydatetime() if isinstance(v, pd.Timestamp) else v

    rows = [{k: plain(v) for k, v in r.items()} for r in qc.drop(columns=["site"]).to_dict("records")]
    older = [{**r, "pipeline_version": "0.0.9", "created_at": r["created_at"] - timedelta(days=30)} for r in rows]
    write_rows(copy, "qc", site, older)
    uid, current = rows[0]["series_uid"], rows[0]["pipeline_version"]
    event = override(copy, uid, "fail", "motion", "reviewer-2")
    assert event["version"] == current
    write_rows(copy, "qc", site, [{**r, "pipeline_name": "dwi"} for r in rows])
    with pytest.raises(OverrideError, match="judged by anat, dwi: say which with --pipeline"):
        override(copy, uid, "pass", "fine", "reviewer-2")
    done = CliRunner().invoke(app, ["qc", "override", uid, "--pipeline", "anat", "--verdict", "pass", "--reason",
                                    "fine after all", "--lake", str(copy.root)])
    assert done.exit_code == 0, done.output
    v = read_table(copy, "qc").query("metric == 'verdict' and pipeline_name == 'anat'").set_index("pipeline_version")
    assert v.loc[current, "verdict"] == "PASS" and v.loc["0.0.9", "verdict"] == v.loc["0.0.9", "automatic_verdict"]


def test_an_infinite_metric_is_shown_as_such_and_left_out_of_the_distributions(lake, tmp_path):
    """fber is infinite when an image's background is all zeros (the demo's Philips T1): the page shows
    it, and the site and trial distributions are made of the finite values, without numpy warnings."""
    copy = Lake(str(tmp_path / "lake"))
    shutil.copytree(lake.root, copy.root)
    update_rows(copy, "qc", "siemens-xa30", {"metric": "fber"}, lambda r: {**r, "value": float("inf")})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        (page,) = write_qc_pages(copy)
    rows = {r[0]: r for r in table(Path(copy.path(page)).read_text(), "metrics-anat")[1:]}
    assert rows["fber"][1] == "inf" and rows["fber"][5].endswith("(0)")      # no finite value in the trial
    assert rows["cjv"][5].endswith("(1)")


def test_a_missing_visit_becomes_a_deviation_and_a_query_once_and_its_query_falls_overdue(lake, trial, tmp_path):
    """The nightly step: each visit whose window closed with nothing received is a missing_visit
    deviation and a site query dated the day its window closed; run again, it records nothing new;
    5 working days after the window closed the escalation takes the query."""
    copy = Lake(str(tmp_path / "lake"))
    shutil.copytree(lake.root, copy.root)
    as_of = datetime.now(timezone.utc) + timedelta(days=200)
    expected = visit_expectations(trial, LakeTables.read(copy), utc(as_of))
    missing = expected[expected["state"] == "missing"]
    assert len(missing) == 2                                   # GE's subject and XA30's second, month06
    written = record_missing_visits(copy, trial, as_of)
    assert len(written) == 2 and record_missing_visits(copy, trial, as_of) == []
    dev = read_table(copy, "deviations").set_index("deviation_id").loc[written]
    assert set(dev["kind"]) == {"missing_visit"} and set(dev["session"]) == {"month06"}
    assert sorted(zip(dev["site"], dev["subject"])) == sorted(zip(missing["site"], missing["subject"]))
    q = read_table(copy, "queries")
    q = q[q["deviation_id"].isin(written)]
    assert len(q) == 2 and set(q["status"]) == {"open"} and q["message"].str.contains("was not received").all()
    closes = dict(zip(zip(missing["site"], missing["subject"]), missing["closes"]))
    for r in q.itertuples():
        assert abs((r.created_at - closes[(r.site, r.subject)]).total_seconds()) < 1
    escalated = escalate_overdue(copy, trial, now=max(closes.values()) + timedelta(days=8))
    assert set(q["query_id"]) <= set(escalated)
    # the same subjects miss month12 too (its window closes on day 386): a deviation and query each
    later = record_missing_visits(copy, trial, datetime.now(timezone.utc) + timedelta(days=400))
    dev = read_table(copy, "deviations").set_index("deviation_id")
    assert len(later) == 2 and set(dev.loc[later, "session"]) == {"month12"}
    assert set(dev.loc[written, "session"]) == {"month06"}                  # month06's rows untouched
    assert len(read_table(copy, "queries").query("deviation_id in @later")) == 2
