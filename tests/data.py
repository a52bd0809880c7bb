"""The one way tests reach the real data in ../shared/data (see its MANIFEST.md).

Every file a test is handed is first checked against its sha256 in ``tests/shared_data.sha256``
(as pydicom checks its downloaded test files against ``hashes.json``), so a test never passes or
fails on data that silently changed. A path that is absent skips the test, or fails it when
CI=true. A file that is not in the manifest, or whose bytes differ, fails the test and says which.

When new data arrives in ../shared/data, regenerate the manifest::

    .venv/bin/python -m tests.data --write
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

from pipelines.images import sha256_file

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CORELAB_SHARED_DATA", REPO.parent / "shared" / "data"))
MANIFEST = Path(__file__).with_name("shared_data.sha256")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def shared_path(*parts: str) -> Path:
    """A file or folder inside ../shared/data, every file of it verified against the manifest."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        msg = f"real test data missing: {p}"
        if _in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        problem = _check(f.relative_to(SHARED).as_posix())
        if problem:
            pytest.fail(f"../shared/data/{f.relative_to(SHARED).as_posix()}: {problem}")
    return p


@functools.lru_cache(maxsize=None)
def _check(rel: str) -> str | None:
    """None when ``rel`` has the sha256 the manifest records, else what is wrong."""
    expected = _manifest().get(rel)
    if expected is None:
        return "not in tests/shared_data.sha256 (new data? run `python -m tests.data --write`)"
    actual = sha256_file(SHARED / rel)
    if actual != expected:
        return f"sha256 {actual[:16]}... differs from the manifest's {expected[:16]}... (the data changed)"
    return None


@functools.lru_cache(maxsize=1)
def _manifest() -> dict[str, str]:
    out = {}
    for line in MANIFEST.read_text().splitlines():
        if line and not line.startswith("#"):
            digest, rel = line.split("  ", 1)
            out[rel] = digest
    return out


def write_manifest() -> int:
    rows = [f"{sha256_file(p)}  {p.relative_to(SHARED).as_posix()}"
            for p in sorted(SHARED.rglob("*")) if p.is_file()]
    MANIFEST.write_text("# sha256 of every file of ../shared/data (python -m tests.data --write)\n"
                        + "\n".join(rows) + "\n")
    return len(rows)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        print(f"{write_manifest()} files -> {MANIFEST}")
    else:
        sys.exit("usage: python -m tests.data --write")
