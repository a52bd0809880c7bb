"""Running flows inside this process (the CLI, a receiver service, tests, benchmarks).

Prefect 3.8 gives every flow run a heartbeat thread that sleeps in one-second
steps and is joined when the run ends, so each run costs up to a second of
waiting (measured here: 1.07 s for an empty flow, 0.085 s without). Heartbeats
let a server notice a crashed worker; when the flow runs in the caller's own
process there is nobody else to notice, so embedded runs switch them off.
Deployments served by workers keep them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tasks import _env  # noqa: F401


@contextmanager
def embedded_runs() -> Iterator[None]:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
