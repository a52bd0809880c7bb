"""The tables ``corelab`` prints: an upload's intake verdicts and a study's QC verdicts."""

from __future__ import annotations

from rich.table import Table

from flows.cli.common import console


def print_outcomes(outcomes: list, site: str) -> None:
    """The short verdict table of one ingest."""
    for o in outcomes:
        study = o.study
        head = Table(show_header=False, box=None, pad_edge=False)
        head.add_row("study", study.study_key[:16], "site", site)
        head.add_row("subject", study.subject, "visit", f"{study.session} (day {study.days_from_baseline})")
        head.add_row("status", "already received, unchanged" if o.already_received else o.status,
                     "files", f"{o.n_files} ({o.n_quarantined} quarantined)")
        console.print(head)
        if o.already_received:
            continue
        t = Table("#", "series", "type", "verdict", "files")
        for s in o.series:
            t.add_row(str(s.series_number), s.description or "-", s.series_type or "-", s.verdict, str(s.n_files))
        console.print(t)
        findings = o.all_findings
        if findings:
            d = Table("severity", "kind", "deviation")
            for f in findings:
                d.add_row(f.severity, f.kind, f.message)
            console.print(d)
        for q in o.quarantined:
            console.print(f"[yellow]quarantined[/] {q.reason}", highlight=False)


def print_processing(study_key: str, done: list) -> None:
    """One row per series processed: pipeline, QC verdict and its reasons."""
    if not done:
        console.print(f"study {study_key[:16]}: nothing new to process")
        return
    t = Table("series", "pipeline", "QC", "reasons")
    for sq in done:
        status = sq.verdict.status if sq.verdict else "FAIL"
        reasons = "; ".join(sq.verdict.reasons) if sq.verdict else (sq.run.error or "")
        t.add_row(sq.run.series_uid[-12:], f"{sq.run.pipeline} {sq.run.version}", status, reasons or "-")
    console.print(t)
