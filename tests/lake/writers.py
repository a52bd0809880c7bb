"""Many writers of one table partition and of the audit log, each in a process of its own.

Shared by tests/lake/test_concurrency.py and bench/lake_concurrency.py. Each writer opens its
own Lake (its own s3fs client and caches, in its own process), so nothing in one process can
hide a race from another: what they share is the store, as writers on several machines would.
Processes come from a fork server that imports the lake once, so 20 writers start in well
under a second instead of paying the imports 20 times.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tasks.lake.audit import HEAD, append_event, read_events, verify_chain
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table, write_rows

TABLE, SITE = "queries", "site-a"


def moto_server():
    """moto's S3 server on 127.0.0.1 (a free port) and its storage options; stop it when done."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)    # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    return server, opts


def row(writer: int, n: int) -> dict[str, Any]:
    return dict(query_id=f"w{writer:02d}-{n:03d}", study_key=f"study-{writer}", status="open",
                message=f"row {n} of writer {writer}", created_at=datetime.now(timezone.utc))


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _writer(url: str, opts: dict[str, Any], ids: list[int], rows: int, events: int, start: Any,
            unlocked: bool, window: Any, out: Any) -> None:
    """The writers ``ids``, one after another: each ``rows`` upserts of one row and ``events``
    audit events, interleaved.

    ``unlocked`` replaces the lake's lock with nothing; ``window`` (a barrier, or None) then also
    holds every writer between its read and its write until all have read: the interleaving
    that loses writes when nothing serialises them, forced instead of hoped for.
    """
    for writer in ids:
        try:
            lake = Lake(url, opts)
            if unlocked:
                _unlock(window, writer)
            start.wait(timeout=120)
            for n in range(max(rows, events)):
                if n < rows:
                    write_rows(lake, TABLE, SITE, [row(writer, n)])
                if n < events:
                    append_event(lake, "concurrency-test", worker=writer, n=n)
            out.put(("ok", writer, ""))
        except BaseException:  # noqa: BLE001  (the parent reports it)
            out.put(("error", writer, traceback.format_exc()))


def _unlock(window: Any, writer: int) -> None:
    """In this writer's process only: Lake.lock does nothing, and reads wait at ``window`` (if any).

    After the barrier the writers write 30 ms apart (every one has read by then): moto answers
    simultaneous PUTs of one key with a 500 now and then, and botocore's retries of those take
    seconds.
    """
    import contextlib

    import tasks.lake.tables as tables

    Lake.lock = lambda self, name, **kw: contextlib.nullcontext()    # type: ignore[method-assign]
    if window is None:
        return
    read_partition, read_bytes = tables.read_partition, Lake.read_bytes

    def partition_then_wait(lake: Lake, table: str, site: str) -> Any:
        part = read_partition(lake, table, site)
        window.wait(timeout=60)
        time.sleep(0.03 * writer)
        return part

    def head_then_wait(self: Lake, rel: str) -> bytes:
        data = read_bytes(self, rel)
        if rel == HEAD:
            window.wait(timeout=60)
            time.sleep(0.03 * writer)
        return data

    tables.read_partition = partition_then_wait
    Lake.read_bytes = head_then_wait    # type: ignore[method-assign]


def _collect(out: Any, procs: list[Any], expected: int, timeout: float = 300) -> list[tuple[str, int, Any]]:
    """Every writer's report; a writer that died without one (or hangs) is reported as such."""
    import queue

    results: list[tuple[str, int, Any]] = []
    deadline = time.monotonic() + timeout
    while len(results) < expected and time.monotonic() < deadline:
        try:
            results.append(out.get(timeout=1))
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    missing = expected - len(results)
    results += [("error", -1, "a writer died or hung without a report")] * missing
    return results


@dataclass
class Outcome:
    """What the lake holds after the writers, against what they were asked to write."""

    writers: int
    seconds: float
    rows_expected: int
    rows: int
    rows_lost: int
    rows_duplicated: int
    events_expected: int
    events: int
    events_lost: int
    seqs_contiguous: bool
    chain_ok: bool
    problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)     # writers that failed, with their traceback

    @property
    def correct(self) -> bool:
        return (not self.errors and not self.rows_lost and not self.rows_duplicated and not self.events_lost
                and self.events == self.events_expected and self.seqs_contiguous and self.chain_ok)


def run_writers(url: str, opts: dict[str, Any], writers: int, rows: int, events: int,
                unlocked: bool = False, forced: bool = True, serial: bool = False) -> Outcome:
    """``writers`` writers at once, each in its own process; returns the count.

    With ``serial``, one process makes the same writes one after another: the reference. With
    ``unlocked``, Lake.lock does nothing in the writers, and with ``forced`` too every writer
    reads before any writes (see :func:`_writer`).

    Rows and events already in the lake are the baseline: only what the writers add is counted.
    A writer that fails is in ``errors`` (with its traceback), not raised.
    """
    assert not (serial and unlocked), "the forced interleaving needs the writers at once"
    lake = Lake(url, opts)
    before_rows = set(read_table(lake, TABLE, [SITE])["query_id"])
    before_events = read_events(lake)
    ctx = _context()
    start = ctx.Barrier(1 if serial else writers)
    window = ctx.Barrier(writers) if unlocked and forced else None
    out = ctx.Queue()
    t0 = time.perf_counter()
    if serial:     # the reference: one writer makes every write, one after another
        procs = [ctx.Process(target=_writer, args=(url, opts, list(range(writers)), rows, events, start,
                                                   unlocked, window, out))]
    else:
        procs = [ctx.Process(target=_writer, args=(url, opts, [w], rows, events, start, unlocked, window, out))
                 for w in range(writers)]
    for p in procs:
        p.start()
    results = _collect(out, procs, expected=writers)
    seconds = time.perf_counter() - t0
    errors = [f"writer {w}: {detail}" for status, w, detail in results if status == "error"]

    ids = [i for i in read_table(lake, TABLE, [SITE])["query_id"] if i not in before_rows]
    expected = {row(w, n)["query_id"] for w in range(writers) for n in range(rows)}
    all_events = read_events(lake)
    new = all_events[len(before_events):]
    tags = {(e["details"]["worker"], e["details"]["n"]) for e in new}
    seqs = [e["seq"] for e in all_events]
    chain = verify_chain(lake)
    return Outcome(writers=writers, seconds=seconds, rows_expected=len(expected), rows=len(ids),
                   rows_lost=len(expected - set(ids)), rows_duplicated=len(ids) - len(set(ids)),
                   events_expected=writers * events, events=len(new),
                   events_lost=len({(w, n) for w in range(writers) for n in range(events)} - tags),
                   seqs_contiguous=seqs == list(range(1, len(seqs) + 1)), chain_ok=chain.ok,
                   problems=chain.problems, errors=errors)
