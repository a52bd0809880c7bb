"""``corelab qc override``, ``corelab export biomarkers`` and ``corelab audit verify``: the records."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli.common import LakeOpt, authenticated_user, console, err, fail, lake_url

qc_app = typer.Typer(no_args_is_help=True, help="QC verdicts and reviewer overrides.")
export_app = typer.Typer(no_args_is_help=True, help="Tables for data managers and statisticians.")
audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit log.")


@qc_app.command("override")
def qc_override(
    series: str = typer.Argument(..., help="SeriesInstanceUID (or a unique prefix) of a processed series"),
    verdict: str = typer.Option(..., "--verdict", help="pass or fail"),
    reason: str = typer.Option(..., "--reason", help="why (kept with the decision)"),
    confirm_head: bool = typer.Option(
        False, "--confirm-head",
        help="passing a series the gate failed as not a head: you looked, and the object is a head"),
    pipeline: Optional[str] = typer.Option(None, "--pipeline",
                                           help="the pipeline whose verdict this is (when several judged it)"),
    lake: Optional[str] = LakeOpt,
) -> None:
    """Record a reviewer's verdict (as the authenticated user running it); the biomarkers table follows it."""
    from tasks.lake.storage import open_lake
    from tasks.qc.overrides import OverrideError, override

    try:
        by = authenticated_user()
        event = override(open_lake(lake_url(lake)), series, verdict, reason, by, confirm_head=confirm_head,
                         pipeline=pipeline)
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
def audit_verify(
    lake: Optional[str] = LakeOpt,
    anchor: Optional[str] = typer.Option(
        None, "--anchor", help="the audit anchor store, outside the lake (default $CORELAB_AUDIT_ANCHOR)"),
    require_anchor: bool = typer.Option(
        False, "--require-anchor", help="exit 1 also when the log is not keyed or not anchored"),
) -> None:
    """Recompute the audit log's hashes, links and HMACs and compare it with its anchor; exit 1 on any problem.

    The HMAC key is $CORELAB_AUDIT_KEY (never stored in the lake). Each problem is one line on stderr.
    """
    from tasks.errors import CorelabError
    from tasks.lake.audit import ANCHOR_ENV, FROM_ENV, KEY_ENV, open_anchor, verify_chain
    from tasks.lake.storage import open_lake

    try:
        opened = open_lake(lake_url(lake))
        store = open_anchor(opened, anchor) if anchor else FROM_ENV
        report = verify_chain(opened, anchor=store)
    except CorelabError as exc:
        fail(str(exc))
    if report.key_id is None:
        keyed = f"NOT keyed: {KEY_ENV} is not set, HMACs not checked (a forged event with a correct hash passes)"
    elif report.keyed:
        keyed = f"keyed: HMAC-SHA256, key id {report.key_id}"
    else:
        keyed = f"NOT keyed with key id {report.key_id} (see the problems)"
    if report.anchor is None:
        anchored = (f"NOT anchored: no anchor store ({ANCHOR_ENV} or --anchor), so a cut tail or a deleted "
                    "log cannot be detected")
    elif report.anchored:
        anchored = f"anchored: {report.anchor}, event {report.anchor_seq}"
    else:
        anchored = f"NOT anchored: {report.anchor} holds no record of this lake"
    for line in (keyed, anchored, *report.notes):
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    if report.ok:
        full = report.keyed and report.anchored
        console.print(f"audit log intact: {report.events} events" if full else
                      f"audit log intact as far as it can be checked: {report.events} events "
                      f"({'keyed' if report.keyed else 'not keyed'}, "
                      f"{'anchored' if report.anchored else 'not anchored'})", highlight=False)
        if require_anchor and not full:
            fail("--require-anchor: the audit log is not both keyed and anchored", 1)
        return
    for p in report.problems:
        err.print(p, highlight=False, soft_wrap=True, markup=False)
    fail(f"audit log broken: {len(report.problems)} problem(s) in {report.events} events", 1)
