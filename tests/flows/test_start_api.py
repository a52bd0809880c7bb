"""Flows started from two threads of a fresh process leave no Prefect server behind (flows/runtime.start_api).

Without a server, Prefect starts a temporary one on a process's first flow; two threads starting
their first flows together each started one, and one outlived the process (`corelab demo`, whose
sites' uploads arrive side by side, left a `uvicorn` running after every run). Each case runs in
a fresh interpreter with a PREFECT_HOME of its own, and finds the servers it left by that home.
The race itself is not asserted: without the start, one or two servers outlived the process in
three runs and none in a fourth (CI, loaded), so a test of it could not be relied on either way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.data import REPO

pytestmark = pytest.mark.prefect
SCRIPT = """
import sys, threading
import flows.runtime
from prefect import flow

@flow
def tiny(n: int) -> int:
    return n

flows.runtime.start_api()
threads = [threading.Thread(target=tiny, args=(i,)) for i in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
"""


def _servers_of(home: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"uvicorn" in (proc / "cmdline").read_bytes() and \
                    f"PREFECT_HOME={home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:   # gone, or not ours to read
            continue
    return found


def _run(home: Path, mode: str) -> list[int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(home)
    # into a file, not a pipe: a server left behind keeps its end open, and reading a pipe would wait for it
    log = home.with_suffix(".log")
    home.mkdir(parents=True)
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, env=env, stdout=out, stderr=out,
                              timeout=300)
    assert done.returncode == 0, log.read_text()[-2000:]
    time.sleep(2)                      # a server being stopped at exit has gone by now
    return _servers_of(home)


def test_two_threads_first_flows_leave_no_server_once_the_api_is_started(tmp_path):
    assert _run(tmp_path / "started", "start_api") == []
