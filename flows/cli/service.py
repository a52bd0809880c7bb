"""``corelab serve``: the receiver, the upload watcher and the flows, on a Prefect server."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli.common import BackendOpt, LakeOpt, TrialOpt, console, fail, lake_url, trial_path


def serve(
    dicom_port: int = typer.Option(11112, "--dicom-port", help="DICOM port of the receiver (0: any free port)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address the receiver listens on"),
    trial: Optional[Path] = TrialOpt,
    lake: Optional[str] = LakeOpt,
    backend: str = BackendOpt,
    ae_title: str = typer.Option("CORELAB", "--ae-title", help="the receiver's own AE title"),
    idle: float = typer.Option(2.0, "--idle", help="seconds without an instance after which a study is complete"),
    uploads: Optional[str] = typer.Option(None, "--uploads",
                                          help="folder or s3:// prefix whose uploads/<site>/ is watched"),
    covariates: Optional[str] = typer.Option(None, "--covariates",
                                             help="covariates file of the nightly harmonization apply"),
    receive: str = typer.Option("here", "--receive",
                                help="here: receive each complete study in this process; event: announce it "
                                     "as corelab.upload.ready for the receive deployment on a work pool"),
    flows: bool = typer.Option(True, "--serve-flows/--no-serve-flows",
                               help="serve the flows as deployments here (off when workers run "
                                    "deployments/prefect.yaml)"),
) -> None:
    """Run the core lab as a service: DICOM receiver, upload watcher, flows on a Prefect server.

    Against $PREFECT_API_URL when set, else a local `prefect server` this command starts and keeps
    running (its database under $CORELAB_STATE, default .corelab in the home folder). Stop with Ctrl-C.
    """
    from data_contracts.trial import TrialConfigError, load_trial
    from flows.serve import serve as run_service

    if receive not in ("here", "event"):
        fail(f"--receive {receive!r}: choose here or event")
    path = trial_path(trial)
    try:
        load_trial(path)
    except TrialConfigError as exc:
        fail(str(exc))

    def ready(info: dict) -> None:
        console.print("corelab is serving: " + ", ".join(f"{k} {v}" for k, v in info.items()), highlight=False)

    run_service(str(path.resolve()), lake_url(lake), dicom_port=dicom_port, host=host, ae_title=ae_title,
                idle_s=idle, backend=backend, receive=receive, serve_flows=flows, covariates_file=covariates,
                uploads=uploads, ready=ready)
