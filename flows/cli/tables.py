"""``corelab qc override``, ``corelab export biomarkers`` and ``corelab audit verify``: the records."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli.common import LakeOpt, console, err, fail, lake_url

qc_app = typer.Typer(no_args_is_help=True, help="QC verdicts and reviewer overrides.")
export_app = typer.Typer(no_args_is_help=True, help="Tables for data managers and statisticians.")
audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit log.")


@qc_app.command("override")
def qc_override(
    series: str = typer.Argument(..., help="SeriesInstanceUID (or a unique prefix) of a processed series"),
    verdict: str = typer.Option(..., "--verdict", help="pass or fail"),
    reason: str = typer.Option(..., "--reason", help="why (kept with the decision)"),
    by: str = typer.Option(..., "--by", help="the reviewer's name"),
    confirm_head: bool = typer.Option(
        False, "--confirm-head",
        help="passing a series the gate failed as not a head: you looked, and the object is a head"),
    lake: Optional[str] = LakeOpt,
) -> None:
    """Record a reviewer's verdict; the biomarkers table follows it."""
    from tasks.lake.storage import open_lake
    from tasks.qc.overrides import OverrideError, override

    try:
        event = override(open_lake(lake_url(lake)), series, verdict, reason, by, confirm_head=confirm_head)
    except OverrideError as exc:
        fail(str(exc))
    console.print(f"series {event['series_uid'][-12:]}: {event['automatic_verdict']} -> {event['verdict']} "
                  f"by {by}; biomarkers added {event['biomarkers_added']}, "
                  f"withdrawn {event['biomarkers_withdrawn']}", highlight=False)
    if event["overrides_not_a_head"]:
        console.print("this overrides the head check (not_a_head): " + "; ".join(event["overrides_not_a_head"]),
                      highlight=False)
    elif confirm_head:
        console.print("--confirm-head had nothing to confirm: the head check did not fail this series "
                      "(the override is recorded as given)", highlight=False)


@export_app.command("biomarkers")
def export_biomarkers_cmd(
    out: Path = typer.Option(..., "--out", help="file to write"),
    fmt: str = typer.Option("parquet", "--format", help="parquet or csv"),
    wide_view: bool = typer.Option(False, "--wide", help="one row per subject and session"),
    harmonized: bool = typer.Option(False, "--harmonized", help="the ComBat-harmonized table"),
    version: Optional[str] = typer.Option(None, "--pipeline-version", help="default: newest per pipeline"),
    lake: Optional[str] = LakeOpt,
) -> None:
    """Write the biomarker table (long, or wide for direct loading)."""
    from tasks.lake.export import ExportError, export_biomarkers
    from tasks.lake.storage import open_lake

    try:
        n = export_biomarkers(open_lake(lake_url(lake)), out, fmt, wide_view, harmonized, version)
    except ExportError as exc:
        fail(str(exc))
    console.print(f"{out}: {n} rows")


@audit_app.command("verify")
def audit_verify(lake: Optional[str] = LakeOpt) -> None:
    """Recompute the audit log's hash chain; exit 1 on any break."""
    from tasks.lake.audit import verify_chain
    from tasks.lake.storage import open_lake

    report = verify_chain(open_lake(lake_url(lake)))
    if report.ok:
        console.print(f"audit log intact: {report.events} events")
        return
    for p in report.problems:
        err.print(p, highlight=False)
    fail(f"audit log broken: {len(report.problems)} problem(s) in {report.events} events", 1)
