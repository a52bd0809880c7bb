"""Process-wide environment defaults, set before Prefect or nipype is imported.

Prefect 3.8's embedded server needs more than its 20 s default to start on a
fresh PREFECT_HOME on a 2-core machine, tries to send telemetry unless told
not to, and nipype looks up a remote host at import time. None of that may
depend on the caller remembering to export variables, so every package entry
point imports this module first. Explicit user settings always win.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "NIPYPE_NO_ET": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


apply_defaults()
