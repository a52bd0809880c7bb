"""Test set-up shared by every test module.

Real data comes from ``../shared/data`` (see its MANIFEST.md) through the
``shared_data`` fixture. When CI=true a missing folder is a failure, not a skip.
Prefect gets its own PREFECT_HOME per test session, so tests never touch a
user's ~/.prefect.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = tempfile.mkdtemp(prefix="corelab-test-prefect-")
os.environ["PREFECT_HOME"] = _HOME
os.environ.pop("PREFECT_API_URL", None)  # never talk to a real server from tests
os.environ.setdefault("CORELAB_DEID_KEY", "test-deid-key-not-secret")
os.environ.setdefault("CORELAB_PSEUDONYM_KEY", "test-pseudonym-key-not-secret")

import flows.runtime  # noqa: E402,F401  (environment defaults before Prefect loads)

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CORELAB_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """A path inside ../shared/data; skip (or fail under CI=true) when absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        msg = f"real test data missing: {p}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return p


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_path()


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
