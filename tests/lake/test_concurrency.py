"""20 concurrent writers of one table partition and of the audit log, on moto's S3 server and on disk.

Each writer is a process with its own Lake (tests/lake/writers.py). The count afterwards: every
row there once, every audit event there once, sequence numbers 1..K without a gap, the chain
verifies. The same count fails, as it must, when the lock is taken away on S3 (what Lake.lock did
on object stores before: nothing). Then the lease itself: a writer killed -9 while holding it, a
live holder, a holder whose lease was broken.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from tasks.lake.audit import append_event
from tasks.lake.storage import Lake, LockLost, LockTimeout
from tasks.lake.tables import read_table, write_rows
from tests.lake.writers import SITE, TABLE, _context, moto_server, row, run_writers

WRITERS, ROWS, EVENTS = 20, 3, 3


@pytest.fixture(scope="module")
def s3():
    server, opts = moto_server()
    yield opts
    server.stop()


def _s3_lake(opts, bucket):
    lake = Lake(f"s3://{bucket}/trial1", opts)
    lake.fs.mkdir(bucket)
    return lake


@pytest.mark.parametrize("where", ["local", "s3"])
def test_twenty_writers_lose_and_duplicate_nothing(where, s3, tmp_path):
    lake = Lake(str(tmp_path / "lake")).init() if where == "local" else _s3_lake(s3, "writers")
    out = run_writers(lake.url, lake.storage_options, WRITERS, ROWS, EVENTS)
    assert not out.errors, "\n".join(out.errors)
    assert (out.rows, out.rows_lost, out.rows_duplicated) == (WRITERS * ROWS, 0, 0), out
    assert (out.events, out.events_lost) == (WRITERS * EVENTS, 0), out
    assert out.seqs_contiguous and out.chain_ok, out.problems
    if where == "s3":   # every lease was given back
        assert not lake.fs.find(lake.path(".locks")), lake.fs.find(lake.path(".locks"))


def test_without_the_lock_on_s3_writes_are_lost(s3):
    """The count above can fail: with Lake.lock a no-op (what it was on object stores), writers
    that all read the partition before any writes (forced with a barrier) overwrite one another:
    one row of the 20 survives, though every writer was told its row was written.

    (The audit log is not counted here: it writes each event create-only with Lake.write_new and
    moves on to the next sequence number when one is taken, so what it does without the lock is
    its own module's business.)"""
    lake = _s3_lake(s3, "unlocked")
    write_rows(lake, TABLE, SITE, [row(99, 0)])          # a partition and an audit head to read
    append_event(lake, "seed")
    out = run_writers(lake.url, lake.storage_options, WRITERS, 1, 1, unlocked=True)
    assert not out.correct
    assert (out.rows, out.rows_lost, out.rows_duplicated) == (1, WRITERS - 1, 0), out
    assert not [e for e in out.errors if "write_rows" in e], out.errors   # every writer thought it wrote
    assert row(99, 0)["query_id"] in set(read_table(lake, TABLE, [SITE])["query_id"])


def _hold_then_sleep(url, opts, name, ttl, ready):
    lake = Lake(url, opts)
    with lake.lock(name, ttl=ttl):          # never left: the process is killed holding it
        ready.set()
        time.sleep(600)


def test_a_writer_killed_holding_the_lease_is_broken_after_its_ttl(s3):
    lake = _s3_lake(s3, "killed")
    name, ttl = f"table-{TABLE}-{SITE}", 2.0
    ctx = _context()
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_then_sleep, args=(lake.url, s3, name, ttl, ready))
    holder.start()
    assert ready.wait(60)
    lease = json.loads(lake.read_bytes(f".locks/{name}.lock"))
    assert lease["pid"] == holder.pid
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    t0 = time.monotonic()
    write_rows(lake, TABLE, SITE, [row(1, 0)])          # waits out the lease, breaks it, writes
    waited = time.monotonic() - t0
    assert read_table(lake, TABLE, [SITE])["query_id"].tolist() == [row(1, 0)["query_id"]]
    assert waited < ttl + 10, waited
    assert not lake.exists(f".locks/{name}.lock")


def test_a_live_lease_is_renewed_and_not_broken(s3):
    """A holder that keeps its lease three times its ttl: a waiter times out rather than break it."""
    lake = _s3_lake(s3, "live")
    other = Lake(lake.url, dict(s3, skip_instance_cache=True))   # another client, as another machine
    ttl, held = 1.5, threading.Event()
    release = threading.Event()

    def holder():
        with other.lock("audit", ttl=ttl):
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(30)
        t0 = time.monotonic()
        with pytest.raises(LockTimeout) as err:
            with lake.lock("audit", timeout=3 * ttl):
                pass
        assert time.monotonic() - t0 >= 3 * ttl
        assert err.value.retryable and err.value.reason.category == "infrastructure"
    finally:
        release.set()
        t.join()
    with lake.lock("audit", timeout=5):                  # given back: had at once
        pass


def test_release_deletes_only_its_own_lease(s3):
    """A lease broken while held (here: replaced under the holder) stays; the holder hears LockLost."""
    lake = _s3_lake(s3, "lost")
    rel = ".locks/audit.lock"
    with pytest.raises(LockLost) as err:
        with lake.lock("audit"):
            lake.fs.pipe_file(lake.path(rel), json.dumps({"owner": "someone else",
                                                          "expires": time.time() + 60}).encode())
    assert err.value.retryable and err.value.reason.category == "infrastructure"
    assert json.loads(lake.read_bytes(rel))["owner"] == "someone else"


def test_a_create_whose_answer_was_lost_is_recognised_as_ours(s3):
    """botocore retries a PUT whose answer it lost; the retry gets 412 from our own lease, which
    the waiter must recognise by its token instead of waiting out its own ttl."""
    from tasks.lake.storage import _Lease

    lake = _s3_lake(s3, "ours")
    lease = _Lease(lake, "audit", ttl=30)
    lake.fs.pipe_file(lake.path(lease.rel), lease._body())          # the create that landed
    t0 = time.monotonic()
    lease.acquire(timeout=5)
    assert time.monotonic() - t0 < 2
    lease.release(raise_if_lost=True)
    assert not lake.exists(lease.rel)


def test_a_renewal_whose_answer_was_lost_does_not_lose_the_lock(s3):
    lake = _s3_lake(s3, "renewed")
    rel = ".locks/audit.lock"
    with lake.lock("audit"):
        lease = json.loads(lake.read_bytes(rel))
        lake.fs.pipe_file(lake.path(rel), json.dumps(dict(lease, expires=time.time() + 99)).encode())
    assert not lake.exists(rel)          # still ours: deleted, and no LockLost
