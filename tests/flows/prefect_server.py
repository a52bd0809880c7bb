"""A real Prefect server for tests: ``prefect server start`` on 127.0.0.1, as a user runs it.

:func:`prefect_server` starts the server as a subprocess on a free port with its own PREFECT_HOME
and SQLite database in a folder the caller gives, waits for ``/api/health``, and stops it (and
every worker it started) on exit. The test process keeps its embedded harness settings
(tests/conftest.py pops PREFECT_API_URL): the server's URL reaches the Prefect client only inside
:meth:`PrefectServer.settings` / :meth:`PrefectServer.client`, and subprocesses only through the
environment :meth:`PrefectServer.env` builds, so other tests of the same session are untouched.

``tick`` is the smallest flow a worker can run from this file (entrypoint :data:`TICK`); this
module imports nothing but the standard library and Prefect, so a worker's flow-run process
loads it in a fraction of a second.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from prefect import flow, get_run_logger

REPO = Path(__file__).resolve().parents[2]
TICK = "tests/flows/prefect_server.py:tick"      # entrypoint, relative to the repository root
TICK_LINE = "tick {n}"                           # what a tick run logs
PREFECT = [sys.executable, "-m", "prefect"]
T = TypeVar("T")


@flow(name="corelab-test-tick")
def tick(n: int = 1) -> int:
    """Log one line and return ``n + 1``: proof that a worker ran this code."""
    get_run_logger().info(TICK_LINE.format(n=n))
    return n + 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(probe: Callable[[], T], timeout: float, every: float = 1.0) -> T | None:
    """Call ``probe`` until it returns something truthy or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def _stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the process group we started (the process and its children), SIGKILL after ``grace``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(grace)


@dataclass
class PrefectServer:
    """A running ``prefect server start`` process and the ways to talk to it."""

    api_url: str
    home: Path
    log: Path
    process: subprocess.Popen
    _workers: list[subprocess.Popen] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client subprocess (CLI, worker) of this server."""
        env = dict(os.environ)
        env.update(PREFECT_API_URL=self.api_url, PREFECT_HOME=str(self.home / "client"))
        env.update(extra)
        return env

    def prefect(self, *args: str, env: dict[str, str] | None = None, timeout: float = 180,
                cwd: Path = REPO) -> str:
        """Run the ``prefect`` CLI against this server; its output, or an AssertionError with it."""
        done = subprocess.run([*PREFECT, "--no-prompt", *args], cwd=cwd, env=env or self.env(),
                              capture_output=True, text=True, timeout=timeout)
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}:\n{out[-4000:]}"
        return out

    @contextmanager
    def settings(self) -> Iterator[None]:
        """Prefect settings of this process pointed at this server, for the block's duration."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            yield

    @contextmanager
    def client(self) -> Iterator[object]:
        """A synchronous Prefect client of this server."""
        from prefect import get_client

        with self.settings(), get_client(sync_client=True) as client:
            yield client

    @contextmanager
    def worker(self, pool: str, **extra_env: str) -> Iterator[subprocess.Popen]:
        """A ``prefect worker start --pool POOL`` process, polling every 2 s, stopped on exit."""
        log = self.home / f"worker-{pool}.log"
        env = self.env(PREFECT_WORKER_QUERY_SECONDS="2", **extra_env)
        with log.open("ab") as out:
            proc = subprocess.Popen([*PREFECT, "worker", "start", "--pool", pool], cwd=REPO, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._workers.append(proc)
        try:
            yield proc
        finally:
            _stop(proc)

    def errors(self) -> list[str]:
        """The distinct exception lines (``pkg.Error: message``) the server has logged so far."""
        text = self.log.read_text(errors="replace")
        found = re.findall(r"^([A-Za-z_][\w.]*(?:Error|Exception): .*)$", text, flags=re.M)
        return list(dict.fromkeys(found))


@contextmanager
def prefect_server(home: Path, startup_timeout: float = 180, **settings: str) -> Iterator[PrefectServer]:
    """Start ``prefect server start`` on 127.0.0.1 with PREFECT_HOME and a SQLite db in ``home``.

    ``settings`` are extra PREFECT_* environment variables of the server (e.g. a faster
    scheduler loop). Stops the server, and the workers started through it, on exit.
    """
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_UI_ENABLED="false",
    )
    env.update(settings)
    log = home / "server.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = PrefectServer(api_url=f"http://127.0.0.1:{port}/api", home=home, log=log, process=proc)
    try:
        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{server.api_url}/health", timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False

        if not wait_for(healthy, startup_timeout, every=0.5):
            raise RuntimeError(f"prefect server not healthy after {startup_timeout} s:\n{log.read_text()[-4000:]}")
        yield server
    finally:
        for worker in server._workers:
            _stop(worker)
        _stop(proc)
