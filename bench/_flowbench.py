"""Shared set-up of the benchmarks that run flows: paths, a private PREFECT_HOME, bench-only keys."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CORELAB_SHARED_DATA", REPO.parent / "shared" / "data"))
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="corelab-bench-prefect-"))
os.environ.setdefault("CORELAB_DEID_KEY", "bench-only-key")
os.environ.setdefault("CORELAB_PSEUDONYM_KEY", "bench-only-key-2")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
