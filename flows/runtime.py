"""Every process-wide setting of corelab, in one place.

Importing this module sets environment defaults (explicit user settings always win) and the
level of the ``corelab`` loggers. It must be imported before Prefect is: ``flows/__init__.py``
does, so the CLI, the flows a worker loads, the tests and the benchmarks all get it.

Environment defaults (:data:`DEFAULTS`)
    Prefect 3.8's embedded server needs more than its 20 s default to start on a fresh
    PREFECT_HOME on a 2-core machine, and tries to send telemetry unless told not to; nipype
    looks up a remote host at import time. ``PREFECT_LOGGING_EXTRA_LOGGERS=corelab`` attaches
    Prefect's API log handler to the ``corelab`` logger tree, so every decision a task logs
    (each ``dst <- src`` pairing, each "found X, skipping", each exact container command, each
    gate verdict) is in the flow run's log in the Prefect UI. Prefect's own run loggers log at
    INFO (``PREFECT_LOGGING_LEVEL``), so the flows' own lines reach the run too; the console
    shows warnings only unless the CLI is given ``-v`` (:func:`configure_console`).

Embedded runs (:func:`embedded_runs`)
    Two Prefect 3.8 defaults cost seconds per flow run when the flow runs in the caller's own
    process against the embedded (ephemeral, SQLite) server:

    * Every flow run gets a heartbeat thread that sleeps in one-second steps and is joined when
      the run ends: up to a second of waiting per run (measured here: 1.07 s for an empty flow,
      0.085 s without). Heartbeats let a server notice a crashed worker; in the caller's own
      process there is nobody else to notice.
    * The server's task-run recorder writes every task run from its events while the next flow
      run is being created. On SQLite the two transactions collide ("database is locked", a
      known Prefect issue with SQLite servers), the server answers 503 and the client waits
      about 2 s before it retries: measured here, 7 of 10 consecutive runs of an empty four-task
      flow took 1.8-2.5 s instead of 0.13-0.22 s. Without the recorder the task runs are not
      listed by ``prefect task-run ls`` of the embedded server; flow runs, their logs and events
      (task states included) still are, and corelab's own audit log records every step.

    Both are switched off only there, for embedded runs. Deployments served by workers against
    a real Prefect server keep both.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

LOGGER = "corelab"
DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "NIPYPE_NO_ET": "1",
    "PREFECT_LOGGING_LEVEL": "INFO",
    "PREFECT_LOGGING_EXTRA_LOGGERS": LOGGER,
    # the console shows warnings; the run log in Prefect gets everything at INFO
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    # corelab code called outside a flow run (unit tests, `corelab protocol infer`) logs
    # to its own handlers only, without a warning per line
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    logging.getLogger(LOGGER).setLevel(os.environ.get("CORELAB_LOG_LEVEL", "INFO").upper())
    if "prefect" in sys.modules:  # set up before us (a worker's flow-run process): attach now
        attach_run_logs()


def attach_run_logs() -> None:
    """Attach Prefect's API handler to the ``corelab`` loggers if Prefect was set up without it.

    A process that imported Prefect before this module (a worker's flow-run process, a user's
    script) configured its logging without our ``PREFECT_LOGGING_EXTRA_LOGGERS`` default.
    """
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        handler = APILogHandler()
        handler.addFilter(_in_a_run)  # Prefect read its settings before our defaults: not its warning
        logger.addHandler(handler)


def _in_a_run(record: logging.LogRecord) -> bool:
    """Only records logged inside a flow or task run go to the API (others have no run to go to)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class _NoTraceback(logging.Filter):
    """Console lines without their traceback (the run log in Prefect keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None  # the console is the last handler to see it
        return True


def configure_console(verbose: bool) -> None:
    """The CLI's console: warnings without tracebacks, or (``-v``) every INFO line with them.

    The Prefect API handler sees each record before the console does (the console handler sits
    on the root logger), so the flow run's log keeps every line and traceback either way.
    """
    if verbose:
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "INFO"  # read when Prefect sets up
    for handler in logging.getLogger().handlers:                     # or, if it already has
        if type(handler).__name__ == "PrefectConsoleHandler":
            if verbose:
                handler.setLevel(logging.INFO)
            elif not any(isinstance(f, _NoTraceback) for f in handler.filters):
                handler.addFilter(_NoTraceback())


def flow_run_id() -> str | None:
    """The id of the flow run this code runs in, or None outside a flow run."""
    from prefect.runtime import flow_run

    rid = flow_run.get_id()
    return str(rid) if rid else None


@contextmanager
def embedded_runs() -> Iterator[None]:
    """Settings for flows run in this process; enter it before the embedded server starts."""
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED,
        temporary_settings,
    )

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                                     PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED: False}):
        yield


def start_api() -> None:
    """Make sure the Prefect API this process reports to is up before flows run from several threads.

    Without a server (no ``PREFECT_API_URL``) Prefect starts a temporary one on the first flow, and
    two threads starting their first flows together each start one: the second replaces the first
    in Prefect's bookkeeping, and the first outlives the process (two flows in two threads of a
    fresh process left one ``uvicorn`` running after exit). Asking once here starts it once.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.api_healthcheck()


apply_defaults()


RUNNERS = ("threads", "dask")


def task_runner(kind: str = "threads", address: str | None = None, workers: int = 2) -> Any:
    """The task runner flows submit their series and studies to.

    ``threads``: Prefect's ThreadPoolTaskRunner (one process; the pipelines are subprocesses, so
    they run side by side). ``dask``: prefect-dask's DaskTaskRunner, on the cluster at ``address``
    (a SLURM cluster from dask-jobqueue, a Kubernetes one, ...) or, without one, a LocalCluster of
    ``workers`` processes with one thread each.
    """
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    raise ValueError(f"unknown task runner {kind!r}; choose one of {RUNNERS}")


#: Secrets a worker may need: the trial's keys, the audit key, S3 credentials.
SECRET_ENVS = ("CORELAB_DEID_KEY", "CORELAB_PSEUDONYM_KEY", "CORELAB_AUDIT_KEY", "AWS_ACCESS_KEY_ID",
               "AWS_SECRET_ACCESS_KEY")


def secret_block_name(env: str) -> str:
    """The Prefect Secret block a secret is read from when its variable is not set: ``corelab-deid-key``."""
    return env.lower().replace("_", "-")


def trial_secrets(trial: Any, lake_url: str | None) -> tuple[str, ...]:
    """The secrets a run of ``trial`` on ``lake_url`` needs (S3 credentials only for an S3 lake)."""
    names = [trial.deidentification.secret_env, "CORELAB_AUDIT_KEY"]
    if trial.subjects.mode == "pseudonym":
        names.append(trial.subjects.secret_env)
    if (lake_url or os.environ.get("CORELAB_LAKE") or "").startswith("s3://"):
        names += ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    return tuple(dict.fromkeys(names))


def load_secrets(names: tuple[str, ...] = SECRET_ENVS) -> list[str]:
    """Put each secret that the environment lacks into it, from the Prefect Secret block of its name.

    Secrets reach a worker either in its environment or as Prefect Secret blocks (``prefect block
    create secret``, or ``Secret(value=...).save("corelab-deid-key")``), never as flow parameters,
    which the server stores and shows. Only this process's environment is set; nothing is logged but
    the names. Returns the names read from blocks.
    """
    from prefect.blocks.system import Secret

    loaded = []
    for env in names:
        if os.environ.get(env):
            continue
        try:
            value = Secret.load(secret_block_name(env)).get()
        except (ValueError, RuntimeError):  # no such block, or no API to ask
            continue
        if value:
            os.environ[env] = str(value)
            loaded.append(env)
    if loaded:
        logging.getLogger(LOGGER).info("secrets read from Prefect Secret blocks: %s", ", ".join(loaded))
    return loaded
