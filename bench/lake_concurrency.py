"""Benchmark of concurrent lake writers: 20 processes writing one table partition and the audit log.

Prints, on a local folder and on moto's S3 server (127.0.0.1), for 20 writers each making
ROWS one-row upserts into one partition of the ``queries`` table and EVENTS audit events:
  * 20 writers at once, serialised by Lake.lock (flock locally, a conditional-PUT lease on S3),
  * the reference: one writer making the same writes one after another,
  * on S3, 20 writers at once with Lake.lock a no-op (what it was on object stores): the rows lost,
and for each the rows and events found afterwards against those written, whether the audit
chain verifies, seconds, and the ratio of the reference's seconds to the row's.

Run: .venv/bin/python bench/lake_concurrency.py [ROWS EVENTS]   (or make bench)
"""

from __future__ import annotations

import sys
import tempfile

from _flowbench import REPO  # noqa: F401  (paths, PREFECT_HOME, bench keys)

from tasks.lake.storage import Lake  # noqa: E402
from tests.lake.writers import moto_server, run_writers  # noqa: E402

WRITERS = 20


def main() -> None:
    rows, events = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (5, 5)
    server, opts = moto_server()
    lines = []
    try:
        with tempfile.TemporaryDirectory(prefix="corelab-bench-lake-") as tmp:
            for where in ("local", "s3"):
                runs = [("1 writer, serial (reference)", dict(serial=True)),
                        (f"{WRITERS} writers, locked", {})]
                if where == "s3":
                    runs.append((f"{WRITERS} writers, no lock", dict(unlocked=True, forced=False)))
                ref = None
                for i, (what, kw) in enumerate(runs):
                    if where == "local":
                        lake = Lake(f"{tmp}/lake-{i}").init()
                    else:
                        lake = Lake(f"s3://bench-{i}/trial1", opts)
                        lake.fs.mkdir(f"bench-{i}")
                    out = run_writers(lake.url, lake.storage_options, WRITERS, rows, events, **kw)
                    ref = out.seconds if ref is None else ref
                    lines.append((where, what, out, ref / out.seconds))
    finally:
        server.stop()
    print(f"\n{WRITERS} writers x ({rows} one-row upserts into one partition + {events} audit events)\n")
    print(f"{'lake':6} {'mode':30} {'rows':>9} {'events':>9} {'chain':>6} {'errors':>6} {'seconds':>8} "
          f"{'ops/s':>6} {'x ref':>6}")
    for where, what, out, ratio in lines:
        ops = out.rows_expected + out.events_expected
        print(f"{where:6} {what:30} {out.rows:>4}/{out.rows_expected:<4} {out.events:>4}/{out.events_expected:<4} "
              f"{'ok' if out.chain_ok else 'BROKEN':>6} {len(out.errors):>6} {out.seconds:8.2f} "
              f"{ops / out.seconds:6.1f} {ratio:6.2f}")
    print("\nrows: distinct rows found / written (lost = written - found); events: the same for audit events;\n"
          "x ref: seconds of the serial reference / seconds of the row (above 1 = faster than one writer).")


if __name__ == "__main__":
    main()
