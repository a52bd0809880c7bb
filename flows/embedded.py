"""Running flows inside this process (the CLI, a receiver service, tests, benchmarks).

Two Prefect 3.8 defaults cost seconds per flow run when the flow runs in the
caller's own process against the embedded (ephemeral, SQLite) server:

* Every flow run gets a heartbeat thread that sleeps in one-second steps and
  is joined when the run ends: up to a second of waiting per run (measured
  here: 1.07 s for an empty flow, 0.085 s without). Heartbeats let a server
  notice a crashed worker; in the caller's own process there is nobody else
  to notice.
* The server's task-run recorder writes every task run from its events while
  the next flow run is being created. On SQLite the two transactions collide
  ("database is locked", a known Prefect issue with SQLite servers), the
  server answers 503 and the client waits about 2 s before it retries:
  measured here, 7 of 10 consecutive runs of an empty four-task flow took
  1.8-2.5 s instead of 0.13-0.22 s. Without the recorder the task runs are
  not listed by ``prefect task-run ls`` of the embedded server; flow runs,
  their logs and events (task states included) still are, and corelab's own
  audit log records every step.

Both are switched off only here, for embedded runs. Deployments served by
workers against a real Prefect server keep both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tasks import _env  # noqa: F401


@contextmanager
def embedded_runs() -> Iterator[None]:
    """Settings for flows run in this process; enter it before the embedded server starts."""
    from prefect.settings import (PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
                                  PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED, temporary_settings)

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                                     PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED: False}):
        yield
