"""``corelab status`` and ``corelab report sites``: the trial's state without duckdb or a notebook."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from flows.cli.common import LakeOpt, TrialOpt, console, fail, lake_url, trial_path

report_app = typer.Typer(no_args_is_help=True, help="Pages for the people running the trial (HTML in the lake).")
queries_app = typer.Typer(no_args_is_help=True, help="Site queries: list, answer (for a site), resolve.")
AsOfOpt = typer.Option(None, "--as-of", help="the moment to report on (ISO date or time, UTC; default now)")


def _load(trial: Optional[Path], lake: Optional[str]):
    from data_contracts.trial import TrialConfigError, load_trial
    from tasks.lake.storage import open_lake

    try:
        config = load_trial(trial_path(trial))
    except TrialConfigError as exc:
        fail(str(exc))
    return config, open_lake(lake_url(lake))


def _as_of(text: Optional[str]) -> Optional[datetime]:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        fail(f"--as-of {text!r} is not an ISO date or time (e.g. 2027-03-01 or 2027-03-01T12:00)")


def _cell(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return str(x)


def status(trial: Optional[Path] = TrialOpt, lake: Optional[str] = LakeOpt,
           as_of: Optional[str] = AsOfOpt) -> None:
    """Per site: studies, visits received and missing, series by QC verdict, open queries, last upload."""
    from tasks.report.status import LakeTables, site_table, trial_totals, utc

    config, store = _load(trial, lake)
    sites = site_table(config, LakeTables.read(store, config.trial_id), utc(_as_of(as_of)))
    table = Table(title=f"{config.trial_id}: {store.url}", title_justify="left")
    for col in ("site", "studies", "visits recv/exp", "missing", "PASS", "WARN", "FAIL", "open queries",
                "overdue", "last upload"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for r in sites.to_dict("records"):
        last = "–" if r["last_upload"] is None or str(r["last_upload"]) == "NaT" else f"{r['last_upload']:%Y-%m-%d}"
        table.add_row(r["site"], str(r["studies"]), f"{r['received_visits']}/{r['expected_visits']}",
                      str(r["missing_visits"]), str(r["qc_pass"]), str(r["qc_warn"]), str(r["qc_fail"]),
                      str(r["open_queries"]), str(r["overdue_queries"]), last)
    totals = trial_totals(sites)
    if totals:
        table.add_row("trial", str(totals["studies"]), f"{totals['received_visits']}/{totals['expected_visits']}",
                      str(totals["missing_visits"]), str(totals["qc_pass"]), str(totals["qc_warn"]),
                      str(totals["qc_fail"]), str(totals["open_queries"]), str(totals["overdue_queries"]), "",
                      style="bold")
    console.print(table)


@report_app.command("sites")
def report_sites(trial: Optional[Path] = TrialOpt, lake: Optional[str] = LakeOpt,
                 as_of: Optional[str] = AsOfOpt) -> None:
    """Write the site dashboard (reports/sites.html in the lake) from the Parquet tables."""
    from tasks.lake.versions import corelab_version
    from tasks.report.sites_page import write_sites_page

    config, store = _load(trial, lake)
    rel = write_sites_page(store, config, _as_of(as_of), version=corelab_version())
    console.print(f"site dashboard: {store.uri(rel)}", highlight=False)


@report_app.command("qc")
def report_qc(series: Optional[str] = typer.Argument(
                  None, help="SeriesInstanceUID or a prefix of it (default: every processed series)"),
              lake: Optional[str] = LakeOpt) -> None:
    """Write the QC review page of a processed series (reports/qc/<series>.html in the lake)."""
    from tasks.lake.storage import open_lake
    from tasks.lake.versions import corelab_version
    from tasks.report.qc_page import QCPageError, write_qc_pages

    store = open_lake(lake_url(lake))
    try:
        pages = write_qc_pages(store, series, version=corelab_version())
    except QCPageError as exc:
        fail(str(exc))
    if not pages:
        console.print("no processed series in the qc table: nothing to review yet")
    for rel in pages:
        console.print(f"QC page: {store.uri(rel)}", highlight=False)


def studies(site: Optional[str] = typer.Option(None, "--site", help="only this site"),
            lake: Optional[str] = LakeOpt) -> None:
    """Every received study: site, subject, visit, when, its series, deviations and QC verdicts."""
    from tasks.lake.storage import open_lake
    from tasks.report.status import LakeTables, latest_verdicts

    tables = LakeTables.read(open_lake(lake_url(lake)))
    st = tables.studies if site is None else tables.studies[tables.studies["site"] == site]
    verdicts = latest_verdicts(tables.qc)
    table = Table(title=f"{len(st)} studies", title_justify="left")
    for col in ("site", "subject", "visit", "received", "series", "deviations", "QC", "study"):
        table.add_column(col)
    for r in st.sort_values(["site", "subject", "received_at"]).itertuples():
        v = verdicts[verdicts["study_key"] == r.study_key]["verdict"].value_counts()
        n_dev = int((tables.deviations["study_key"] == r.study_key).sum())
        table.add_row(r.site, r.subject, r.session, f"{r.received_at:%Y-%m-%d %H:%M}", str(r.n_series), str(n_dev),
                      " ".join(f"{k} {n}" for k, n in sorted(v.items())) or "–", r.study_key[:16])
    console.print(table)


def qc_list(site: Optional[str] = typer.Option(None, "--site", help="only this site"),
            verdict: Optional[str] = typer.Option(None, "--verdict", help="only PASS, WARN or FAIL"),
            lake: Optional[str] = LakeOpt) -> None:
    """Each processed series' latest verdict per pipeline, by the id `corelab qc override` takes."""
    from tasks.lake.storage import open_lake
    from tasks.lake.tables import read_table
    from tasks.report.status import VERDICTS, latest_verdicts

    if verdict is not None and verdict.upper() not in VERDICTS:
        fail(f"--verdict {verdict!r}: choose one of {', '.join(VERDICTS)}")
    qc = read_table(open_lake(lake_url(lake)), "qc")
    rows = latest_verdicts(qc)
    if site is not None:
        rows = rows[rows["site"] == site]
    if verdict is not None:
        rows = rows[rows["verdict"] == verdict.upper()]
    table = Table(title=f"{len(rows)} series", title_justify="left")
    for col in ("series (for qc override)", "site", "subject", "visit", "pipeline", "verdict", "why"):
        table.add_column(col, overflow="fold")
    for r in rows.sort_values(["site", "subject", "session"]).itertuples():
        why = qc[(qc["series_uid"] == r.series_uid) & (qc["pipeline_name"] == r.pipeline_name)
                 & (qc["flow_run_id"] == r.flow_run_id) & (qc["metric"] != "verdict") & (qc["status"] != "PASS")]
        reasons = "; ".join(f"{w.metric}: {w.reason or w.status}" for w in why.itertuples())
        if r.override_by is not None and str(r.override_by) not in ("", "nan", "None"):
            reasons = f"override by {r.override_by} ({r.automatic_verdict} -> {r.verdict}): {r.override_reason}"
        table.add_row(r.series_uid, r.site, r.subject, r.session, f"{r.pipeline_name} {r.pipeline_version}",
                      r.verdict, reasons or "–")
    console.print(table)


@queries_app.command("list")
def queries_list(site: Optional[str] = typer.Option(None, "--site", help="only this site"),
                 every: bool = typer.Option(False, "--all", help="resolved and closed ones too"),
                 trial: Optional[Path] = TrialOpt, lake: Optional[str] = LakeOpt) -> None:
    """Queries, overdue and escalated first, by the id answer and resolve take."""
    from tasks.lake.tables import read_table
    from tasks.report.status import LakeTables, open_queries, utc

    config, store = _load(trial, lake)
    if every:
        rows = read_table(store, "queries").sort_values("created_at", ascending=False)
        rows = rows.assign(due=None, overdue=False, age_days=None)
    else:
        rows = open_queries(LakeTables.read(store, config.trial_id), utc(), config.query_due_working_days)
    if site is not None:
        rows = rows[rows["site"] == site]
    table = Table(title=f"{len(rows)} queries", title_justify="left")
    for col in ("query", "site", "subject", "visit", "status", "due", "question", "answer / resolution"):
        table.add_column(col, overflow="fold")
    for r in rows.to_dict("records"):
        due = "" if r.get("due") is None or str(r.get("due")) == "NaT" else f"{r['due']:%Y-%m-%d}"
        status = r["status"] + (" (overdue)" if r.get("overdue") and r["status"] != "escalated" else "")
        table.add_row(r["query_id"], r["site"], r["subject"], r["session"], status, due, r["message"],
                      _cell(r.get("resolution") if every and r.get("resolution") else r.get("answer")))
    console.print(table)


@queries_app.command("answer")
def queries_answer(query: str = typer.Argument(..., help="query id (or a unique prefix)"),
                   text: str = typer.Option(..., "--text", help="the site's answer"),
                   resent: bool = typer.Option(False, "--resent", help="the site sent the series again"),
                   lake: Optional[str] = LakeOpt) -> None:
    """Record a site's answer (as the authenticated user running it)."""
    from flows.cli.common import authenticated_user
    from tasks.lake.storage import open_lake
    from tasks.qc.queries import QueryError, answer

    try:
        row = answer(open_lake(lake_url(lake)), query, text, authenticated_user(), resent)
    except QueryError as exc:
        fail(str(exc))
    console.print(f"query {row['query_id']}: answered by {row['answered_by']}", highlight=False)


@queries_app.command("resolve")
def queries_resolve(query: str = typer.Argument(..., help="query id (or a unique prefix)"),
                    resolution: str = typer.Option(..., "--resolution", help="why the question is settled"),
                    lake: Optional[str] = LakeOpt) -> None:
    """Resolve a query (as the authenticated user running it)."""
    from flows.cli.common import authenticated_user
    from tasks.lake.storage import open_lake
    from tasks.qc.queries import QueryError, resolve

    try:
        row = resolve(open_lake(lake_url(lake)), query, resolution, authenticated_user())
    except QueryError as exc:
        fail(str(exc))
    console.print(f"query {row['query_id']}: resolved by {row['resolved_by']}", highlight=False)
