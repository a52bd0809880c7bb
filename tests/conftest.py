"""Test set-up shared by every test module.

Real data comes from ``../shared/data`` (see its MANIFEST.md) through
:func:`tests.data.shared_path` only, which checks each file against its sha256; when CI=true a
missing folder is a failure, not a skip. Prefect gets its own PREFECT_HOME per test session, so
tests never touch a user's ~/.prefect.

``tests/`` mirrors the code: one folder per stage of ``tasks/`` (lake, intake, deid, ...), and
folders for flows, pipelines, harmonization and data_contracts. Markers: ``prefect`` (the
embedded Prefect server), ``pipeline`` (runs a real pipeline), ``containers`` (podman);
``make test-fast`` leaves the three out.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = tempfile.mkdtemp(prefix="corelab-test-prefect-")
os.environ["PREFECT_HOME"] = _HOME
os.environ.pop("PREFECT_API_URL", None)  # never talk to a real server from tests
# pytest-xdist workers start with COLUMNS=80, and a rich Console fixes its width from COLUMNS when it
# is made (the CLI's, at import): tests that read a wide table give COLUMNS to that command instead
os.environ.pop("COLUMNS", None)
os.environ.setdefault("CORELAB_DEID_KEY", "test-deid-key-not-secret")
os.environ.setdefault("CORELAB_PSEUDONYM_KEY", "test-pseudonym-key-not-secret")
os.environ.setdefault("CORELAB_AUDIT_KEY", "test-audit-key-not-secret")

import flows.runtime  # noqa: E402,F401  (environment defaults before Prefect loads)
from tests.data import SHARED, shared_path  # noqa: E402


@pytest.fixture(scope="session")
def abide_data() -> Path:
    """../shared/data, with the ABIDE tables harmonization tests read verified."""
    from harmonization.abide import FS_DIR, PHENO, TABLES

    for name in TABLES.values():
        shared_path(*FS_DIR, name)
    shared_path(*PHENO)
    return SHARED


@pytest.fixture(scope="module")
def trial():
    """The demo trial (data_contracts/examples/shared_data_trial.yaml), one per module."""
    from data_contracts.trial import load_trial
    from tests.helpers import DEMO_TRIAL

    return load_trial(DEMO_TRIAL)


@pytest.fixture(scope="session")
def prefect_harness():
    """One embedded Prefect server for the whole session (20-30 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.runtime import embedded_runs

    with embedded_runs(), prefect_test_harness(server_startup_timeout=180):  # settings reach its server
        yield
