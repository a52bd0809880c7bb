"""The virtual trial end to end (``corelab demo``'s default), and the three pages a person reads from it.

One run of the smallest trial the truths allow (4 subjects a site, 2 visits: 23 T1s, one visit
never acquired) through the real flows into a lake. Every planted truth must hold, each check
must be able to fail (a truth checked against a plan that planted it elsewhere is broken), and
headless Chromium must show the dashboard with the planted failures, a FAIL series' QC page and
the harmonization report with their images drawn; screenshots land under the lake's reports/.
The dashboard's figures are the same questions asked of the Parquet files with duckdb.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import duckdb
import pytest
from rich.console import Console

from data_contracts import example_path
from data_contracts.trial import load_trial
from flows.virtual import truths
from flows.virtual.plan import CUT_SITE, CUT_SLICES, MISSING_SITE, TRIAL_FILE
from flows.virtual.trial import run_virtual_trial
from tasks.lake.storage import open_lake
from tasks.report.sites_page import PAGE
from tests.browser import chromium, images, ink_rows, table
from tests.data import SHARED, shared_path

pytestmark = [pytest.mark.prefect, pytest.mark.pipeline]


@pytest.fixture(scope="module")
def virtual(prefect_harness, tmp_path_factory):
    shared_path("niivue-images", "chris_t1.nii.gz")
    root = tmp_path_factory.mktemp("virtual")
    console = Console(record=True, width=200)
    ok, made = run_virtual_trial(SHARED, str(root / "lake"), console, subjects=4, visits=2, work=root / "scans")
    return ok, made, root / "lake", console.export_text()


def test_every_planted_truth_holds_and_the_table_says_so(virtual):
    ok, made, _lake, printed = virtual
    for t in made["truths"]:
        assert t.holds, f"{t.name}: {t.evidence}"
    assert ok and len(made["truths"]) == 6
    assert "planted truths" in printed and printed.count("holds") == 6 and "broken" not in printed
    assert made["counts"]["studies_due"] == 23 and made["counts"]["series_processed"] == 23
    assert made["counts"]["missing_visits"] == 1


def test_a_truth_checked_where_it_was_not_planted_is_broken(virtual, monkeypatch):
    """The checks can fail: the same lake judged against plans that put the deviation, the missing
    visit and the cut slabs on other scans, and against an age slope planted twice as steep."""
    _ok, made, lake, _ = virtual
    plan, trial = made["plan"], load_trial(example_path(TRIAL_FILE))
    other = next(s.key for s in plan.scans if s.site == MISSING_SITE and s.visit == plan.visits[-1]
                 and s.key != plan.deviation)
    uncut = [replace(s, scanner=replace(s.scanner, slices_kept=None if s.scanner.slices_kept else CUT_SLICES))
             if s.site == CUT_SITE else s for s in plan.scans]         # the baselines "cut", the follow-ups not
    moved = replace(plan, deviation=other, missing=other, scans=uncut)
    monkeypatch.setattr(truths, "AGE_VOLUME_SLOPE", 2 * truths.AGE_VOLUME_SLOPE)
    judged = {t.name.split()[1]: t for t in truths.check_truths(moved, trial, str(lake), made["harmonization"],
                                                                 made["as_of"])}
    assert not judged["series"].holds and not judged["visit"].holds and not judged["cut"].holds
    assert not judged["planted"].holds, judged["planted"].evidence
    assert judged["software"].holds and judged["sites'"].holds        # untouched by the moves


def _duck(lake: Path, name: str) -> str:
    return f"read_parquet('{lake / 'tables' / name / '*' / '*.parquet'}', union_by_name=true)"


def test_the_dashboard_equals_duckdb_and_chromium_shows_the_planted_failures(virtual):
    _ok, made, lake, _ = virtual
    page = lake / PAGE
    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    header, *rows = table(dom.stdout, "sites")
    sites = {r[0]: dict(zip(header, r)) for r in rows}
    con = duckdb.connect()
    fails = dict(con.sql(f"select site, count(distinct series_uid) from {_duck(lake, 'qc')} "
                         "where metric = 'verdict' and verdict = 'FAIL' group by site").fetchall())
    studies = dict(con.sql(f"select site, count(*) from {_duck(lake, 'studies')} group by site").fetchall())
    epochs = dict(con.sql(f"select site, count(distinct scanner_epoch) from {_duck(lake, 'series')} "
                          "group by site").fetchall())
    assert fails == {CUT_SITE: 4} and epochs == {"site-a": 1, "site-b": 2, "site-c": 1}
    for site in ("site-a", "site-b", "site-c"):
        assert sites[site]["studies"] == str(studies[site])
        assert sites[site]["QC FAIL"].endswith(f"({fails.get(site, 0)})")
        assert sites[site]["missing visits"] == ("1" if site == MISSING_SITE else "0")
    assert [(r[0], r[2]) for r in table(dom.stdout, "missing")[1:]] == [(MISSING_SITE, "month06")]
    assert sum(r[0] == "site-b" for r in table(dom.stdout, "epochs")[1:]) == 2
    queries = table(dom.stdout, "queries")[1:]
    assert {r[0] for r in queries} == {MISSING_SITE, CUT_SITE} and {r[3] for r in queries} == {"escalated"}
    assert any("was not received" in r[6] for r in queries)
    shot = lake / "reports" / "screenshots" / "sites.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert chromium("--window-size=1400,1800", f"--screenshot={shot}", page.as_uri()).returncode == 0
    assert ink_rows(shot) > 0.2


def test_chromium_shows_a_failed_series_qc_page_and_the_harmonization_report(virtual):
    _ok, made, lake, _ = virtual
    store = open_lake(str(lake))
    qc_pages = sorted((lake / "reports" / "qc").glob("*.html"))
    assert len(qc_pages) == 23
    failed = duckdb.connect().sql(f"select series_uid from {_duck(lake, 'qc')} where metric = 'verdict' "
                                  f"and verdict = 'FAIL' and site = '{CUT_SITE}' limit 1").fetchall()[0][0]
    page = lake / "reports" / "qc" / f"{failed}.html"
    html = chromium("--dump-dom", page.as_uri()).stdout
    assert 'id="verdict-anat">FAIL<' in html and "fov_cut" in html
    pics = images(html)
    assert len(pics) == 4 and all(p.shape[0] > 100 and p.std() > 20 for p in pics), "a blank image"
    report = Path(store.path(made["harmonization"]["fit"]["outputs"]["report"]))
    dom = chromium("--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    pics = images(dom.stdout)
    assert len(pics) >= 4, "the harmonization report lacks its figures"
    for p in pics:
        assert p.shape[0] > 100 and p.std() > 10, "an empty plot in the harmonization report"
    assert "site-b:" in dom.stdout                      # the upgraded site's two batches are named
    for name, url in (("qc.png", page.as_uri()), ("harmonization.png", report.as_uri())):
        shot = lake / "reports" / "screenshots" / name
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert chromium("--window-size=1300,2600", f"--screenshot={shot}", url).returncode == 0
        assert ink_rows(shot) > 0.2, name
