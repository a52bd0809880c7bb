"""``corelab ingest``, ``corelab process`` and ``corelab protocol infer``: studies coming in."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli.common import (
    BackendOpt,
    DaskAddressOpt,
    LakeOpt,
    OverrideOpt,
    RunnerOpt,
    TrialOpt,
    fail,
    lake_url,
    trial_path,
)
from flows.cli.display import print_outcomes, print_processing

protocol_app = typer.Typer(no_args_is_help=True, help="Protocol tools.")


def ingest(
    path: Path = typer.Argument(..., help="upload folder, file or zip"),
    site: str = typer.Option(..., "--site", help="site id from the trial file"),
    trial: Optional[Path] = TrialOpt,
    lake: Optional[str] = LakeOpt,
    backend: str = BackendOpt,
    allow_version_mismatch: bool = OverrideOpt,
    process: bool = typer.Option(True, "--process/--no-process",
                                 help="also convert to BIDS, run the pipelines and gate on QC"),
    runner: str = RunnerOpt,
    dask_address: Optional[str] = DaskAddressOpt,
) -> None:
    """Receive a study (inventory, de-identify, verify, check the protocol) and process it."""
    from data_contracts.trial import MissingSecretError, TrialConfigError, UnknownSiteError, load_trial
    from flows.receive_study import receive_study

    if not path.exists():
        fail(f"{path}: no such file or folder")
    try:
        cfg = load_trial(trial_path(trial))
        cfg.site(site)
        cfg.secret(cfg.deidentification.secret_env)
        if cfg.subjects.mode == "pseudonym":
            cfg.secret(cfg.subjects.secret_env)
    except (TrialConfigError, UnknownSiteError, MissingSecretError) as exc:
        fail(str(exc))
    outcomes = receive_study(str(path), site, lake_url=lake_url(lake), trial=cfg)
    print_outcomes(outcomes, site)
    if not outcomes or all(o.status == "rejected" and not o.already_received for o in outcomes):
        fail(f"{path}: nothing was accepted; see quarantine/{site}/ in the lake for the reasons", 1)
    if not process:
        return
    failed = []
    for o in outcomes:
        # a study received before is processed again: what failed then is tried again now
        if o.status != "rejected" or o.already_received:
            failed += run_processing(o.study.study_key, site, cfg, lake_url(lake), backend, allow_version_mismatch,
                                     runner, dask_address)
    if failed:
        fail(f"{path}: {len(failed)} series failed after intake (see the deviations and qc tables): "
             + "; ".join(failed), 1)


def run_processing(study_key: str, site: str, cfg, lake: str, backend: str, allow: bool,
                   runner: str = "threads", dask_address: str | None = None) -> list[str]:
    """process_study on one study, then its QC table; returns what of the study is failed now.

    A pipeline that could not start (no engine on this machine, a refused image) fails the command
    with its reason; nothing about the data was recorded.
    """
    from flows.process_study import process_study
    from flows.runtime import task_runner
    from tasks.lake.storage import open_lake
    from tasks.lake.studies import read_study
    from tasks.qc.record import PipelinesNotRun, failures_after_intake

    if runner not in ("threads", "dask"):
        fail(f"--runner {runner!r}: choose threads or dask")
    flow = process_study.with_options(task_runner=task_runner(runner, dask_address))
    try:
        done = flow(study_key, site, lake_url=lake, backend=backend, allow_version_mismatch=allow, trial=cfg)
    except PipelinesNotRun as exc:
        fail(f"study {study_key[:16]}: {exc}. No verdict was recorded; fix the worker or choose another "
             "--backend, then run `corelab process` again (the nightly run also tries again).", 1)
    print_processing(study_key, done)
    store = open_lake(lake)
    return failures_after_intake(store, cfg, read_study(store, site, study_key))


def process(
    study: str = typer.Argument(..., help="study key (or a unique prefix of it)"),
    site: str = typer.Option(..., "--site", help="site id"),
    trial: Optional[Path] = TrialOpt,
    lake: Optional[str] = LakeOpt,
    backend: str = BackendOpt,
    allow_version_mismatch: bool = OverrideOpt,
    runner: str = RunnerOpt,
    dask_address: Optional[str] = DaskAddressOpt,
) -> None:
    """Process a received study again: BIDS, pinned pipelines, QC gate, biomarkers."""
    from data_contracts.trial import TrialConfigError, load_trial
    from tasks.lake.studies import UnknownStudyError

    try:
        cfg = load_trial(trial_path(trial))
        failed = run_processing(study, site, cfg, lake_url(lake), backend, allow_version_mismatch, runner,
                                dask_address)
    except (TrialConfigError, UnknownStudyError) as exc:
        fail(str(exc))
    if failed:
        fail(f"study {study[:16]}: {len(failed)} series failed (see the deviations and qc tables): "
             + "; ".join(failed), 1)


@protocol_app.command("infer")
def protocol_infer(path: Path = typer.Argument(..., help="a site's qualification scan"),
                   visit: str = typer.Option("baseline", help="visit the series are required at")) -> None:
    """Draft the protocol section of a trial file from a qualification scan."""
    from tasks.conformance.infer import dump_protocol, infer_protocol

    if not path.exists():
        fail(f"{path}: no such file or folder")
    try:
        typer.echo(dump_protocol(infer_protocol(path, visit)), nl=False)
    except ValueError as exc:
        fail(str(exc))
