"""`corelab serve` against a real `prefect server`: a site's series sent with dcmtk's storescu is received
and processed through the event chain, read back through the Prefect client.

Two ways a core lab runs it: the service serves the flows itself (``receive`` runs in the service's
process as soon as a study is complete; ``process`` fires on ``corelab.study.received``), or workers on
the work pools of ``deployments/prefect.yaml`` run them (the service only receives and announces
``corelab.upload.ready``). An upload dropped in ``uploads/<site>/`` with a READY marker goes the same
way. The series is GE's EPI (no pipeline takes it, so the process deployment's podman backend is
never needed). The last test puts a processing worker without any container engine on its own
server and sends a T1 (the anat pipeline's podman backend cannot start): a red run, no verdict.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tests.data import REPO, shared_path
from tests.flows.prefect_server import PrefectServer, prefect_server, wait_for
from tests.helpers import DEMO_TRIAL

pytestmark = pytest.mark.prefect
CORELAB = str(Path(sys.executable).parent / "corelab")
SERIES = ("dcm_qa_nih", "In", "20180918GE", "mr_0004")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if shutil.which("storescu") is None:
        pytest.fail("dcmtk's storescu is not installed: make services installs it")
    with prefect_server(tmp_path_factory.mktemp("prefect-serve")) as s:
        yield s


def _dicom_files() -> list[str]:
    folder = shared_path(*SERIES)
    return sorted(str(p) for p in folder.iterdir() if p.suffix == ".dcm")


def _storescu(port: int, aet: str = "GENIH") -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-aet", aet, "-aec", "CORELAB", "127.0.0.1", str(port), *_dicom_files()],
                          capture_output=True, text=True, timeout=120)


class Service:
    """A `corelab serve` subprocess, its output, and the address its receiver listens on."""

    def __init__(self, server: PrefectServer, tmp: Path, *args: str) -> None:
        self.log = tmp / "serve.log"
        env = server.env(CORELAB_STATE=str(tmp / "state"), COLUMNS="400")
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([CORELAB, "serve", "--dicom-port", "0", "--trial", str(DEMO_TRIAL),
                                          "--lake", str(tmp / "lake"), "--idle", "1", *args], cwd=tmp, env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
        found = wait_for(lambda: re.search(r"dicom CORELAB@[\d.]+:(\d+)", self.log.read_text())
                         or self.proc.poll() is not None, timeout=180)
        assert isinstance(found, re.Match), self.log.read_text()[-3000:]
        self.port = int(found.group(1))
        self.lake = Lake(str(tmp / "lake"))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(90)


def _runs(server: PrefectServer) -> dict[str, list[tuple[str, str | None]]]:
    """flow name -> [(state type, deployment name)] of every flow run the server holds."""
    out: dict[str, list[tuple[str, str | None]]] = {}
    with server.client() as client:
        deployments = {d.id: d.name for d in client.read_deployments()}
        for run in client.read_flow_runs():
            name = client.read_flow(run.flow_id).name
            out.setdefault(name, []).append((run.state_type.value, deployments.get(run.deployment_id)))
    return out


def _count(server: PrefectServer, flow: str, deployment: str | None = None) -> int:
    return sum(s == "COMPLETED" and (deployment is None or d == deployment) for s, d in _runs(server).get(flow, []))


def _completed(server: PrefectServer, *flows: str, before: dict[str, int] | None = None,
               timeout: float = 240) -> dict:
    """Wait until each of ``flows`` has more completed runs than ``before`` says it had."""
    before = before or {}

    def done():
        runs = _runs(server)
        return runs if all(sum(s == "COMPLETED" for s, _ in runs.get(f, [])) > before.get(f, 0)
                           for f in flows) else None

    runs = wait_for(done, timeout, every=2)
    assert runs, f"not all of {flows} completed: {_runs(server)}"
    return runs


def test_serve_receives_a_storescu_series_and_processes_it_by_its_event(server, tmp_path):
    service = Service(server, tmp_path)
    try:
        sent = _storescu(service.port)
        assert sent.returncode == 0, sent.stderr
        last = time.monotonic()
        studies = wait_for(lambda: len(read_table(service.lake, "studies")) or None, 60, every=0.2)
        verdict_s = time.monotonic() - last
        assert studies == 1, service.log.read_text()[-3000:]
        runs = _completed(server, "receive_study", "process_study")
        assert runs["process_study"][0][1] == "process"                # started by the deployment's trigger
        # an unlisted AE title is refused at association: nothing more is received
        refused = _storescu(service.port, aet="NOTASITE")
        assert refused.returncode != 0 and "Association Rejected" in refused.stderr + refused.stdout
        # the CLI on the same machine talks to the running service's server, not an ephemeral one
        before = len(_runs(server).get("receive_study", []))
        env = server.env(CORELAB_STATE=str(tmp_path / "state"))
        env.pop("PREFECT_API_URL")
        cli = subprocess.run([CORELAB, "ingest", str(shared_path(*SERIES)), "--site", "ge-nih", "--trial",
                              str(DEMO_TRIAL), "--lake", str(tmp_path / "lake"), "--no-process"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert len(_runs(server).get("receive_study", [])) == before + 1
        assert len(read_table(service.lake, "studies")) == 1            # the same study: received once
        print(f"seconds from the last instance to the studies row: {verdict_s:.1f}")
    finally:
        assert service.stop() in (0, 130)
    assert not (tmp_path / "state" / "server.json").exists()
    assert not [p for p in service.lake.find("inbox/ge-nih") if "/scp-" in p]   # custody taken: its copy is gone


def test_the_deployments_file_on_workers_receives_and_processes_what_the_service_announces(server, tmp_path):
    lake, uploads = tmp_path / "lake", tmp_path / "drop"
    (uploads / "uploads").mkdir(parents=True)
    covariates = tmp_path / "covariates.csv"
    covariates.write_text("subject,age\n")
    env = {"CORELAB_HOME": str(REPO), "CORELAB_TRIAL": str(DEMO_TRIAL), "CORELAB_LAKE": str(lake),
           "CORELAB_COVARIATES": str(covariates)}
    for pool in ("corelab-intake", "corelab-processing"):
        server.prefect("work-pool", "create", pool, "--type", "process", "--overwrite")
    server.prefect("deploy", "--all", "--prefect-file", "deployments/prefect.yaml", env=server.env(**env))
    with server.worker("corelab-intake", **env), server.worker("corelab-processing", **env):
        service = Service(server, tmp_path, "--receive", "event", "--no-serve-flows", "--uploads", str(uploads))
        try:
            before = {f: _count(server, f) for f in ("receive_study", "process_study")}
            assert _storescu(service.port).returncode == 0
            _completed(server, "receive_study", "process_study", before=before, timeout=300)
            assert len(read_table(service.lake, "studies")) == 1
            # a folder upload with its READY marker goes the same way (the same study: nothing new)
            drop = uploads / "uploads" / "ge-nih" / "visit1"
            shutil.copytree(shared_path(*SERIES), drop)
            (drop / "READY").write_text("")
            _completed(server, "receive_study", before={"receive_study": before["receive_study"] + 1})
        finally:
            assert service.stop() in (0, 130)
    assert os.path.isdir(lake / "deid")


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path.name}: none)"


def test_a_worker_without_the_container_engine_fails_the_run_and_asks_the_site_nothing(tmp_path):
    """The YAML's process deployment runs its pipelines in podman. On a worker where no container
    engine is on PATH, the Siemens XA30 T1 sent by storescu is received, and its process run fails
    (red, retryable by the nightly run) with no qc row, no qc_fail deviation and no site query."""
    with prefect_server(tmp_path / "prefect") as server:       # its own server: no deployment, run or
        _worker_without_engine(server, tmp_path)                # automation of another test is on it


def _worker_without_engine(server: PrefectServer, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    env = {"CORELAB_HOME": str(REPO), "CORELAB_TRIAL": str(DEMO_TRIAL), "CORELAB_LAKE": str(lake),
           "CORELAB_COVARIATES": str(tmp_path / "covariates.csv")}
    for pool in ("corelab-intake", "corelab-processing"):
        server.prefect("work-pool", "create", pool, "--type", "process", "--overwrite")
    server.prefect("deploy", "--all", "--prefect-file", "deployments/prefect.yaml", env=server.env(**env))
    bare = str(Path(sys.executable).parent)            # the venv's tools only: no podman, docker, apptainer
    assert not any(shutil.which(e, path=bare) for e in ("podman", "docker", "apptainer"))
    before = _runs(server)
    with server.worker("corelab-intake", **env), server.worker("corelab-processing", PATH=bare, **env):
        service = Service(server, tmp_path, "--receive", "event", "--no-serve-flows")
        try:
            folder = shared_path("dcm_qa_xa30", "In")
            files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and not p.name.startswith("README"))
            sent = subprocess.run(["storescu", "-aet", "PRISMA", "-aec", "CORELAB", "127.0.0.1", str(service.port),
                                   *files], capture_output=True, text=True, timeout=120)
            assert sent.returncode == 0, sent.stderr

            def failed():
                runs = _runs(server).get("process_study", [])
                return runs if len(runs) > len(before.get("process_study", [])) and any(
                    s in ("FAILED", "CRASHED") for s, _ in runs) else None

            assert wait_for(failed, 300, every=2), (
                f"runs: {_runs(server)}\nserve: {_tail(service.log)}\nintake worker: "
                f"{_tail(server.home / 'worker-corelab-intake.log')}\nprocessing worker: "
                f"{_tail(server.home / 'worker-corelab-processing.log')}\nserver errors: {server.errors()}")
        finally:
            assert service.stop() in (0, 130)
    store = Lake(str(lake))
    assert len(read_table(store, "studies")) == 1 and read_table(store, "qc").empty
    assert "qc_fail" not in set(read_table(store, "deviations").kind) and read_table(store, "queries").empty
    with server.client() as client:
        (run,) = [r for r in client.read_flow_runs() if r.state_type.value == "FAILED"
                  and "PipelinesNotRun" in (r.state.message or "")]
        assert "podman" in run.state.message
