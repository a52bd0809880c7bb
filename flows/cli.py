"""The ``corelab`` command line.

Defaults come from the environment: CORELAB_TRIAL (else ./trial.yaml) and
CORELAB_LAKE (else ./corelab-lake). Exit codes: 0 when the study was accepted
(with or without deviations), 1 when nothing was accepted, 2 for a bad
command, trial file, site or path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from tasks import _env  # noqa: F401  (environment defaults before prefect loads)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="corelab: an imaging core lab in a box for multi-site MRI trials.")
protocol_app = typer.Typer(no_args_is_help=True, help="Protocol tools.")
audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit log.")
qc_app = typer.Typer(no_args_is_help=True, help="QC verdicts and reviewer overrides.")
export_app = typer.Typer(no_args_is_help=True, help="Tables for data managers and statisticians.")
app.add_typer(protocol_app, name="protocol")
app.add_typer(audit_app, name="audit")
app.add_typer(qc_app, name="qc")
app.add_typer(export_app, name="export")


def _mount_subcommands() -> None:
    from harmonization.cli import app as harmonize_app
    from pipelines.containers_cli import app as containers_app

    app.add_typer(harmonize_app, name="harmonize")
    app.add_typer(containers_app, name="containers")


_mount_subcommands()
console = Console()
err = Console(stderr=True)

TrialOpt = typer.Option(None, "--trial", help="trial YAML (default $CORELAB_TRIAL or ./trial.yaml)")
BackendOpt = typer.Option("local", "--backend", help="where pipelines run: local, podman, docker, apptainer")
OverrideOpt = typer.Option(False, "--allow-version-mismatch",
                           help="local backend only: run although the environment differs from the "
                                "image's lock (recorded in provenance)")
LakeOpt = typer.Option(None, "--lake", help="lake folder or URL (default $CORELAB_LAKE or ./corelab-lake)")


def _trial_path(trial: Optional[Path]) -> Path:
    return Path(trial or os.environ.get("CORELAB_TRIAL") or "trial.yaml")


def _lake_url(lake: Optional[str]) -> str:
    return lake or os.environ.get("CORELAB_LAKE") or "corelab-lake"


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_outcomes(outcomes: list, site: str) -> None:
    """The short verdict table of one ingest."""
    for o in outcomes:
        head = Table(show_header=False, box=None, pad_edge=False)
        head.add_row("study", o.study_key[:16], "site", site)
        head.add_row("subject", o.subject, "visit", f"{o.session} (day {o.days_from_baseline})")
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


@app.command()
def ingest(
    path: Path = typer.Argument(..., help="upload folder, file or zip"),
    site: str = typer.Option(..., "--site", help="site id from the trial file"),
    trial: Optional[Path] = TrialOpt,
    lake: Optional[str] = LakeOpt,
    backend: str = BackendOpt,
    allow_version_mismatch: bool = OverrideOpt,
    process: bool = typer.Option(True, "--process/--no-process",
                                 help="also convert to BIDS, run the pipelines and gate on QC"),
) -> None:
    """Receive a study (inventory, de-identify, verify, check the protocol) and process it."""
    from data_contracts.trial import MissingSecretError, TrialConfigError, UnknownSiteError, load_trial
    from flows.receive_study import receive_study

    if not path.exists():
        _fail(f"{path}: no such file or folder")
    try:
        cfg = load_trial(_trial_path(trial))
        cfg.site(site)
        cfg.secret(cfg.deidentification.secret_env)
        if cfg.subjects.mode == "pseudonym":
            cfg.secret(cfg.subjects.secret_env)
    except (TrialConfigError, UnknownSiteError, MissingSecretError) as exc:
        _fail(str(exc))
    outcomes = receive_study(str(path), site, lake_url=_lake_url(lake), trial=cfg)
    print_outcomes(outcomes, site)
    if not outcomes or all(o.status == "rejected" and not o.already_received for o in outcomes):
        _fail(f"{path}: nothing was accepted; see quarantine/{site}/ in the lake for the reasons", 1)
    if process:
        for o in outcomes:
            if o.status != "rejected":
                _process(o.study_key, site, cfg, _lake_url(lake), backend, allow_version_mismatch)


def _process(study_key: str, site: str, cfg, lake_url: str, backend: str, allow: bool) -> None:
    from flows.process_study import process_study

    done = process_study(study_key, site, lake_url=lake_url, backend=backend,
                         allow_version_mismatch=allow, trial=cfg)
    if not done:
        console.print(f"study {study_key[:16]}: nothing new to process")
        return
    t = Table("series", "pipeline", "QC", "reasons")
    for sp in done:
        status = sp.verdict.status if sp.verdict else "FAIL"
        reasons = "; ".join(sp.verdict.reasons) if sp.verdict else (sp.error or "")
        t.add_row(sp.series_uid[-12:], f"{sp.pipeline} {sp.version}", status, reasons or "-")
    console.print(t)


@app.command()
def process(
    study: str = typer.Argument(..., help="study key (or a unique prefix of it)"),
    site: str = typer.Option(..., "--site", help="site id"),
    trial: Optional[Path] = TrialOpt,
    lake: Optional[str] = LakeOpt,
    backend: str = BackendOpt,
    allow_version_mismatch: bool = OverrideOpt,
) -> None:
    """Process a received study again: BIDS, pinned pipelines, QC gate, biomarkers."""
    from data_contracts.trial import TrialConfigError, load_trial
    from tasks.study_processing import UnknownStudyError

    try:
        cfg = load_trial(_trial_path(trial))
        _process(study, site, cfg, _lake_url(lake), backend, allow_version_mismatch)
    except (TrialConfigError, UnknownStudyError) as exc:
        _fail(str(exc))


@qc_app.command("override")
def qc_override(
    series: str = typer.Argument(..., help="SeriesInstanceUID (or a unique prefix) of a processed series"),
    verdict: str = typer.Option(..., "--verdict", help="pass or fail"),
    reason: str = typer.Option(..., "--reason", help="why (kept with the decision)"),
    by: str = typer.Option(..., "--by", help="the reviewer's name"),
    lake: Optional[str] = LakeOpt,
) -> None:
    """Record a reviewer's verdict; the biomarkers table follows it."""
    from tasks.qc_records import OverrideError, override
    from tasks.storage import open_lake

    try:
        event = override(open_lake(_lake_url(lake)), series, verdict, reason, by)
    except OverrideError as exc:
        _fail(str(exc))
    console.print(f"series {event['series_uid'][-12:]}: {event['automatic_verdict']} -> {event['verdict']} "
                  f"by {by}; biomarkers added {event['biomarkers_added']}, "
                  f"withdrawn {event['biomarkers_withdrawn']}", highlight=False)


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
    from tasks.export import ExportError, export_biomarkers
    from tasks.storage import open_lake

    try:
        n = export_biomarkers(open_lake(_lake_url(lake)), out, fmt, wide_view, harmonized, version)
    except ExportError as exc:
        _fail(str(exc))
    console.print(f"{out}: {n} rows")


@protocol_app.command("infer")
def protocol_infer(path: Path = typer.Argument(..., help="a site's qualification scan"),
                   visit: str = typer.Option("baseline", help="visit the series are required at")) -> None:
    """Draft the protocol section of a trial file from a qualification scan."""
    from tasks.protocol_infer import dump_protocol, infer_protocol

    if not path.exists():
        _fail(f"{path}: no such file or folder")
    try:
        typer.echo(dump_protocol(infer_protocol(path, visit)), nl=False)
    except ValueError as exc:
        _fail(str(exc))


@audit_app.command("verify")
def audit_verify(lake: Optional[str] = LakeOpt) -> None:
    """Recompute the audit log's hash chain; exit 1 on any break."""
    from tasks.audit import verify_chain
    from tasks.storage import open_lake

    report = verify_chain(open_lake(_lake_url(lake)))
    if report.ok:
        console.print(f"audit log intact: {report.events} events")
        return
    for p in report.problems:
        err.print(p, highlight=False)
    _fail(f"audit log broken: {len(report.problems)} problem(s) in {report.events} events", 1)


@app.command()
def demo(data: Path = typer.Option(Path("../shared/data"), help="the shared real data"),
         lake: Optional[str] = LakeOpt,
         trial: Optional[Path] = TrialOpt) -> None:
    """Run corelab end to end on the bundled default (the shared real data)."""
    from flows.demo import run_demo

    if not data.exists():
        _fail(f"{data}: the shared data folder is missing")
    run_demo(data, _lake_url(lake), trial, console)


def main() -> None:
    from flows.embedded import embedded_runs

    try:
        with embedded_runs():
            app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
