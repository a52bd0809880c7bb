"""Run one ``corelab`` command in this process and ``kill -9`` it at a chosen moment.

``python -m tests.flows.killpoints POINT N -- <corelab arguments>`` installs the hook named POINT,
then runs the command as the ``corelab`` script does (:func:`flows.cli.main`). The hook counts the
calls of one function; on the N-th it prints ``KILLPOINT POINT N`` to stderr and sends SIGKILL to
this process (nothing is cleaned up, no ``finally`` runs: what a crash, the OOM killer or
``kill -9`` leaves). The test's driver, not production code, places the kill: no environment
variable or branch for it exists in corelab itself. ``POINT none`` runs the command unhooked.

Points (where the kill lands):

``deid-rename``
    Before the N-th rename of a de-identified file into ``deid/``: every file of the series
    is staged under a temporary name, the first N-1 renamed.
``deid-written``
    After the N-th series was written to ``deid/`` (before its fingerprint, the study's
    table rows and its ``studies`` row).
``table-rename``
    Before the N-th rename of a Parquet partition into ``tables/``: the new partition is
    complete under a temporary name beside the old one.
``table-written``
    Right after the N-th partition write (the next table not written yet).
``audit-event``
    After the N-th audit event file was written, before ``audit/head.json`` names it.
``audit-head``
    After the N-th head update, before the anchor outside the lake is moved to it.
``pipeline``
    While the N-th pipeline subprocess runs: once it has run ``$KILLPOINT_PIPELINE_S`` seconds
    (default 8). The pipeline process itself is left alone: this process alone is killed.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

MARK = "KILLPOINT"
RENAMES = {"deid-rename": "deid", "table-rename": "tables"}   # point -> the store renamed into


def die(point: str, n: int) -> None:
    """Say where, then SIGKILL this process."""
    os.write(2, f"\n{MARK} {point} {n}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)   # SIGKILL cannot be caught or ignored: this line is never reached


def _counting(point: str, n: int, fn: Callable[..., Any], after: bool,
              match: Callable[..., bool] = lambda *a, **k: True) -> Callable[..., Any]:
    calls = 0

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        if not match(*args, **kwargs):
            return fn(*args, **kwargs)
        calls += 1
        if calls == n and not after:
            die(point, n)
        out = fn(*args, **kwargs)
        if calls == n and after:
            die(point, n)
        return out

    return wrapper


def _rename_into(store: str) -> Callable[..., bool]:
    """Matches ``os.replace(tmp, target)`` of a lake temp file into ``<lake>/<store>/``."""
    def match(src: Any, dst: Any, *a: Any, **k: Any) -> bool:
        return os.path.basename(os.fspath(src)).startswith(".tmp-") and f"/{store}/" in os.fspath(dst)
    return match


def _children() -> list[int]:
    pids: list[int] = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{task}/children") as fh:
                pids += [int(p) for p in fh.read().split()]
        except OSError:
            pass
    return pids


def install(point: str, n: int) -> None:
    """Put the hook for ``point`` in place (see the module docstring)."""
    import flows.runtime  # noqa: F401  (corelab's environment defaults before Prefect loads)

    if point == "none":
        return
    if point in RENAMES:
        os.replace = _counting(point, n, os.replace, after=False,   # type: ignore[assignment]
                               match=_rename_into(RENAMES[point]))
    elif point == "deid-written":
        import tasks.receive.study as study

        study.write_series = _counting(point, n, study.write_series, after=True)
    elif point == "table-written":
        import tasks.lake.tables as tables

        tables._write_partition = _counting(point, n, tables._write_partition, after=True)
    elif point == "audit-event":
        import tasks.lake.audit as audit

        audit._write_new = _counting(point, n, audit._write_new, after=True,
                                     match=lambda lake, rel, data: rel.startswith(audit.EVENTS + "/"))
    elif point == "audit-head":
        import tasks.lake.audit as audit

        audit.FsspecAnchor.put = _counting(point, n, audit.FsspecAnchor.put, after=False)
    elif point == "pipeline":
        import tasks.run.runner as runner

        delay = float(os.environ.get("KILLPOINT_PIPELINE_S", "8"))
        calls = 0
        execute = runner.execute

        @functools.wraps(execute)
        def wrapper(record: Any, plan: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == n:
                before = set(_children())

                def watch() -> None:
                    while True:   # the pipeline's process, once it has run `delay` seconds
                        started = [p for p in _children() if p not in before]
                        if started:
                            time.sleep(delay)
                            if any(p in _children() for p in started):
                                os.write(2, f"\n{MARK}-PIPELINE-PIDS {' '.join(map(str, started))}\n".encode())
                                die(point, n)
                            return
                        time.sleep(0.05)

                threading.Thread(target=watch, daemon=True).start()
            return execute(record, plan, *args, **kwargs)

        runner.execute = wrapper
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def main(argv: list[str]) -> None:
    point, n, sep, *rest = argv
    if sep != "--":
        raise SystemExit("usage: python -m tests.flows.killpoints POINT N -- <corelab arguments>")
    install(point, int(n))
    from flows.cli import main as corelab

    sys.argv = ["corelab", *rest]
    corelab()


if __name__ == "__main__":
    main(sys.argv[1:])
