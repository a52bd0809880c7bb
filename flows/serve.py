"""``corelab serve``: the core lab as a long-running service on a Prefect server.

What runs, in one process:

1. **A Prefect API.** ``PREFECT_API_URL`` when it is set (a server the core lab runs, Prefect
   Cloud); otherwise a local ``prefect server start`` on 127.0.0.1 that this process starts, keeps
   running and stops on exit (its database under the service's state folder, so flow runs,
   schedules and logs outlive one process). Its address is written to ``server.json`` in the
   state folder, so ``corelab ingest``/``process``/... on the same machine talk to it instead of
   starting an ephemeral server of their own (:func:`running_api_url`).
2. **The DICOM receiver** (:class:`tasks.intake.receiver.DicomReceiver`). A complete study is
   received right here (``receive_study`` runs in this process, in about a second), or, with
   ``receive="event"``, announced as ``corelab.upload.ready`` for the ``receive`` deployment of
   ``deployments/prefect.yaml`` running on a work pool.
3. **The upload watcher** (:mod:`tasks.intake.watch`, when installed) over ``uploads/<site>/`` of a
   folder or S3 prefix: a ready upload is announced as ``corelab.upload.ready``.
4. **The flows as deployments** (``prefect.serve``, unless ``serve_flows=False`` because a worker
   runs them from ``deployments/prefect.yaml``): ``receive`` (event ``corelab.upload.ready``),
   ``process`` (event ``corelab.study.received``), ``nightly-reprocess`` (cron) and
   ``harmonize-nightly-apply`` (cron; it applies the promoted model, and does nothing without one).
   The same names, parameters, triggers and schedules as the YAML (a test compares them).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("corelab.serve")

UPLOAD_READY = "corelab.upload.ready"
STUDY_RECEIVED = "corelab.study.received"
NIGHTLY_CRON = "0 2 * * *"
HARMONIZE_CRON = "30 3 * * *"


def state_dir() -> Path:
    """Where the service keeps its Prefect server's home and ``server.json`` (``$CORELAB_STATE``)."""
    return Path(os.environ.get("CORELAB_STATE") or Path.home() / ".corelab")


def healthy(api_url: str, timeout: float = 1.0) -> bool:
    """True when the Prefect API at ``api_url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def running_api_url(state: Path | None = None) -> str | None:
    """The API of a ``corelab serve`` running on this machine, if one answers."""
    path = (state or state_dir()) / "server.json"
    try:
        url = json.loads(path.read_text())["api_url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if healthy(url, timeout=0.5) else None


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class LocalServer:
    """A ``prefect server start`` process this service started."""

    api_url: str
    process: subprocess.Popen

    def stop(self, grace: float = 20) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(grace)


def start_local_server(home: Path, host: str = "127.0.0.1", port: int = 0, timeout: float = 180) -> LocalServer:
    """Start ``prefect server start`` with its home (and SQLite database) under ``home``; wait until healthy."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or _free_port(host)
    api_url = f"http://{host}:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    logfile = open(home / "server.log", "ab")  # noqa: SIM115  (the server's own log, kept open while it runs)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host,
                             "--port", str(port)], env=env, stdout=logfile, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not healthy(api_url):
        if proc.poll() is not None or time.monotonic() > deadline:
            LocalServer(api_url, proc).stop()
            raise RuntimeError(f"the local Prefect server did not start (see {home / 'server.log'})")
        time.sleep(0.5)
    return LocalServer(api_url, proc)


def deployments(trial_file: str, lake_url: str, backend: str, covariates_file: str | None = None) -> list[Any]:
    """The flows as deployments served by this process: what ``deployments/prefect.yaml`` declares."""
    from prefect.events import DeploymentEventTrigger

    from flows.harmonize import harmonize
    from flows.nightly import nightly_reprocess
    from flows.process_study import process_study
    from flows.receive_study import receive_study

    common = {"trial_file": trial_file, "lake_url": lake_url}
    out = [
        receive_study.to_deployment(
            name="receive", parameters=common, tags=["intake", "event-driven"],
            triggers=[DeploymentEventTrigger(
                expect={UPLOAD_READY}, match={"prefect.resource.id": "corelab.upload.*"},
                parameters={"upload": "{{ event.payload.upload }}", "site": "{{ event.payload.site }}"})]),
        process_study.to_deployment(
            name="process", parameters=common | {"backend": backend}, tags=["processing"],
            triggers=[DeploymentEventTrigger(
                expect={STUDY_RECEIVED}, match={"prefect.resource.id": "corelab.study.*"},
                parameters={"study_key": "{{ event.payload.study_key }}", "site": "{{ event.payload.site }}"})]),
        nightly_reprocess.to_deployment(name="nightly-reprocess", cron=NIGHTLY_CRON,
                                        parameters=common | {"backend": backend}, tags=["processing", "scheduled"]),
    ]
    if covariates_file:
        out.append(harmonize.to_deployment(
            name="harmonize-nightly-apply", cron=HARMONIZE_CRON, tags=["harmonization", "scheduled"],
            parameters=common | {"covariates_file": covariates_file, "mode": "apply", "only_new": True}))
    return out


def announce_upload(site: str, upload: str) -> None:
    """Emit ``corelab.upload.ready`` for a local upload folder: the ``receive`` deployment's trigger."""
    from prefect.events import emit_event

    name = posixpath.basename(upload.rstrip("/"))
    emit_event(UPLOAD_READY, resource={"prefect.resource.id": f"corelab.upload.{site}.{name}"},
               payload={"upload": upload, "site": site})


def on_api(api_url: str, fn: Callable[[str, str], None]) -> Callable[[str, str], None]:
    """``fn`` run with Prefect's settings pointing at ``api_url``, whatever thread calls it.

    Prefect's settings context does not follow a new thread (the receiver's and the watcher's
    callbacks run in theirs): without this, their flow runs and events would go to an ephemeral
    server of their own, and no trigger would ever see them.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def call(site: str, path: str) -> None:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            fn(site, path)

    return call


def receive_here(trial: Any, lake_url: str) -> Callable[[str, str], None]:
    """The receiver's callback: ``receive_study`` on a complete upload, in this process.

    The receiver's folder is removed once ``receive_study`` has taken custody of every file (a
    copy in the inbox, quarantine or ``deid/``); a failure raises, so the receiver keeps the folder
    and tries again later.
    """
    from flows.receive_study import receive_study
    from tasks.lake.storage import open_lake

    lake = open_lake(lake_url)

    def callback(site: str, folder: str) -> None:
        with tempfile.TemporaryDirectory(prefix="corelab-scp-") as tmp:
            local = lake.local_folder(folder, tmp)
            state = receive_study(local, site, lake_url=lake_url, trial=trial, return_state=True)
            if not state.is_completed():
                raise RuntimeError(f"receive_study of {folder} ended {state.type.value}: {state.message}")
        lake.remove(folder, recursive=True)

    return callback


def announce_here(lake_url: str) -> Callable[[str, str], None]:
    """The receiver's callback when a worker receives: announce the (local) folder as an upload."""
    from tasks.lake.storage import open_lake

    lake = open_lake(lake_url)
    if not lake.is_local:
        raise ValueError("receive='event' needs a local lake (a worker reads the upload folder by path)")
    return lambda site, folder: announce_upload(site, lake.path(folder))


def serve(trial_file: str, lake_url: str, *, dicom_port: int | None = 11112, host: str = "127.0.0.1",
          ae_title: str = "CORELAB", idle_s: float = 2.0, backend: str = "local", receive: str = "here",
          serve_flows: bool = True, covariates_file: str | None = None, uploads: str | None = None,
          ready: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Run the service until interrupted (see module docstring); ``ready`` is told where it listens."""
    from data_contracts.trial import load_trial

    trial = load_trial(trial_file)
    # SIGTERM (a service manager, `kill`) stops the service as Ctrl-C does: receiver, watcher and
    # the local server it started are stopped on the way out.
    signal.signal(signal.SIGTERM, _terminate)
    with ExitStack() as stack:
        api_url = os.environ.get("PREFECT_API_URL")
        if not api_url:
            server = start_local_server(state_dir() / "prefect")
            stack.callback(server.stop)
            api_url = server.api_url
            os.environ["PREFECT_API_URL"] = api_url
        (state_dir()).mkdir(parents=True, exist_ok=True)
        (state_dir() / "server.json").write_text(json.dumps({"api_url": api_url, "pid": os.getpid()}))
        stack.callback(lambda: (state_dir() / "server.json").unlink(missing_ok=True))
        from prefect.settings import PREFECT_API_URL, temporary_settings

        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url}))
        info: dict[str, Any] = {"api_url": api_url}
        if dicom_port is not None:
            from tasks.intake.receiver import DicomReceiver
            from tasks.lake.storage import open_lake

            callback = on_api(api_url, receive_here(trial, lake_url) if receive == "here" else announce_here(lake_url))
            receiver = DicomReceiver(trial, open_lake(lake_url), ae_title=ae_title, host=host, port=dicom_port,
                                     idle_s=idle_s, on_study_complete=callback).start()
            stack.callback(receiver.stop)
            info["dicom"] = f"{ae_title}@{host}:{receiver.port}"
        if uploads:
            info["uploads"] = _watch(stack, trial, lake_url, uploads, api_url)
        log.info("corelab service: %s", info)
        if ready:
            ready(info)
        if serve_flows:
            _serve_flows(stack, deployments(trial_file, lake_url, backend, covariates_file))
        while True:  # until SIGTERM or Ctrl-C; the ExitStack stops everything on the way out
            time.sleep(3600)


def _serve_flows(stack: ExitStack, served: list[Any]) -> None:
    """Serve ``served`` with a Prefect Runner in a thread of its own.

    Not ``prefect.serve``: it takes the main thread and installs a SIGTERM handler that, in Prefect
    3.8.8, leaves the process hanging (``Runner.astop`` never awaited); here the main thread keeps
    the signals and stops the runner, then the receiver and the local server.
    """
    import asyncio
    import threading

    from prefect.runner import Runner

    runner = Runner(name="corelab-serve", pause_on_shutdown=True)
    for deployment in served:
        runner.add_deployment(deployment)
    thread = threading.Thread(target=lambda: asyncio.run(runner.start()), name="prefect-runner", daemon=True)
    thread.start()

    def stop() -> None:
        try:
            runner.stop()
        except Exception:  # already stopped, or its loop is gone
            log.debug("stopping the Prefect runner", exc_info=True)
        thread.join(timeout=5)

    stack.callback(stop)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _watch(stack: ExitStack, trial: Any, lake_url: str, uploads: str, api_url: str) -> str:
    """Start the upload watcher over ``uploads`` (announcing each ready upload)."""
    from tasks.intake.watch import DropWatcher
    from tasks.lake.storage import open_lake

    watcher = DropWatcher(trial, open_lake(lake_url), uploads,
                          on_upload_ready=on_api(api_url, announce_upload)).start()
    stack.callback(watcher.stop)
    return uploads


def clean_state() -> None:
    """Forget a service's state (its local server's database included)."""
    shutil.rmtree(state_dir(), ignore_errors=True)
