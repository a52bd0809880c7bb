"""What every ``corelab`` command shares: defaults, options, the consoles and the exit on error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err = Console(stderr=True)

TrialOpt = typer.Option(None, "--trial", help="trial YAML (default $CORELAB_TRIAL or ./trial.yaml)")
BackendOpt = typer.Option("local", "--backend", help="where pipelines run: local, podman, docker, apptainer")
OverrideOpt = typer.Option(False, "--allow-version-mismatch",
                           help="local backend only: run although the environment differs from the "
                                "image's lock (recorded in provenance)")
LakeOpt = typer.Option(None, "--lake", help="lake folder or URL (default $CORELAB_LAKE or ./corelab-lake)")
RunnerOpt = typer.Option("threads", "--runner", help="task runner the series are spread over: threads or dask")
DaskAddressOpt = typer.Option(None, "--dask-address",
                              help="scheduler of a running Dask cluster (default: a local one of 2 workers)")


def authenticated_user() -> str:
    """Who runs this command, as the operating system authenticated them: ``name@host``.

    The account of the effective user id (``pwd``), not the ``USER``/``LOGNAME`` variables
    (``getpass.getuser`` reads those first: anyone can set them). A human decision (a QC override,
    a model promotion) is recorded under this name; there is no free-text ``--by``. Each person
    reviews under an account of their own (on a shared server, ``sudo -u``/``ssh`` as themselves).
    """
    import pwd
    import socket

    try:
        name = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a container without a passwd entry for this uid
        name = f"uid{os.geteuid()}"
    return f"{name}@{socket.gethostname()}"


def trial_path(trial: Optional[Path]) -> Path:
    return Path(trial or os.environ.get("CORELAB_TRIAL") or "trial.yaml")


def lake_url(lake: Optional[str]) -> str:
    return lake or os.environ.get("CORELAB_LAKE") or "corelab-lake"


def fail(message: str, code: int = 2) -> NoReturn:
    """One line in red on stderr, then exit ``code`` (2: a bad command or input; 1: refused)."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
