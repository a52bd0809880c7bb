"""``kill -9`` of corelab at chosen moments, then a restart: nothing lost, nothing twice, all readable.

Each kill runs a real ``corelab`` command (``ingest``, ``process``, ``serve``) in a child process
through :mod:`tests.flows.killpoints`, which SIGKILLs it on the N-th call of a chosen function: in
de-identification, between a Parquet partition's temporary file and its rename, between an audit
event and its head or its anchor, while the pipeline subprocess runs, and in the service's DICOM
receiver between a study's series. The children talk to the session's Prefect server; the
audit log is keyed (``CORELAB_AUDIT_KEY``) and anchored outside the lake (``CORELAB_AUDIT_ANCHOR``).

After each restart (the same command again, as an operator or the nightly run would): every
Parquet file of ``tables/`` reads (one by one and as a hive dataset, so a temporary file left by
the kill breaks no reader), no table holds a primary key twice, the study has exactly one
``studies`` row and one ``study_received`` event, the rows equal those of a clean run of the same
input (a reference made once, all columns but times and run ids), and ``corelab audit verify
--require-anchor`` exits 0.

The receiver killed between the instances of a study it is receiving (nothing acknowledged lost,
the rest picked up after a restart) is tests/intake/test_receiver.py's
``test_a_receiver_killed_mid_study_loses_nothing_it_acknowledged``; here the whole service is
killed later, while it receives the study its receiver acknowledged.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from data_contracts.schemas import TABLES
from flows.process_study import process_study
from flows.receive_study import receive_study
from tasks.intake.receiver import RECEIVER_STATE
from tasks.lake.audit import read_events
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tests.data import REPO, shared_path
from tests.flows.killpoints import MARK
from tests.helpers import DEMO_TRIAL, dicom_files
from tests.intake.test_receiver import SI_STUDY, send

pytestmark = [pytest.mark.prefect, pytest.mark.pipeline]

T1 = ("dcm_qa_xa30", "In")          # the XA30 T1 (one Enhanced MR file) of site siemens-xa30
SITE = "siemens-xa30"
VOLATILE = ["received_at", "created_at", "flow_run_id"]   # differ between any two runs
RECEIVE_TABLES = ("studies", "series", "deviations", "queries")
PIPELINE_S = "3"                    # seconds into the pipeline subprocess the kill lands


# -- running corelab in a child and killing it -----------------------------------------------------

def _group(pgid: int) -> dict[int, str]:
    """pid -> command line of every live process in the process group ``pgid``."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out[int(entry)] = cmd.strip()
    return out


class Child:
    """``corelab <args>`` under :mod:`tests.flows.killpoints`, in a session (process group) of its own."""

    def __init__(self, env: dict[str, str], log: Path, point: str, n: int, *args: str) -> None:
        self.point, self.n, self.log = point, n, log
        with log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.flows.killpoints", point, str(n), "--", *args],
                                         cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.left: dict[int, str] = {}   # what of its process group outlived it
        STARTED.append(self)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """Wait for the child; then end what it left in its process group (recorded in ``left``)."""
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
            time.sleep(0.5)
            self.left = _group(self.proc.pid)
            if self.left:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
        return rc

    def killed(self, timeout: float = 300) -> "Child":
        """Wait until the kill point is reached (asserted: SIGKILL at the named point, nowhere else)."""
        rc = self.wait(timeout)
        assert rc == -signal.SIGKILL and f"{MARK} {self.point} {self.n}" in self.output(), \
            f"{self.point} {self.n}: exit {rc}, not killed there:\n{self.output()[-3000:]}"
        return self

    def stop(self) -> None:
        """End the child's whole process group, whatever state a failed test left it in."""
        if _group(self.proc.pid) or self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):   # gone meanwhile
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def succeeded(self, timeout: float = 300) -> "Child":
        rc = self.wait(timeout)
        assert rc == 0, f"exit {rc}:\n{self.output()[-3000:]}"
        return self


STARTED: list[Child] = []


@pytest.fixture(scope="module", autouse=True)
def _no_child_left():
    """Whatever a test does or fails to do, no child (nor what it left behind) outlives the module."""
    yield
    for child in STARTED:
        child.stop()


@pytest.fixture(scope="module")
def env(prefect_harness, tmp_path_factory) -> dict[str, str]:
    """The children's environment: the session's Prefect server, an anchor outside every lake."""
    from prefect.settings import PREFECT_API_URL

    base = tmp_path_factory.mktemp("kill9-env")
    return dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), CORELAB_AUDIT_ANCHOR=str(base / "anchor"),
                CORELAB_STATE=str(base / "state"), CORELAB_TRIAL=str(DEMO_TRIAL), KILLPOINT_PIPELINE_S=PIPELINE_S,
                COLUMNS="200")


def corelab(env: dict[str, str], tmp: Path, point: str, n: int, *args: str) -> Child:
    name = f"{args[0]}-{point}-{n}-{len(list(tmp.glob('*.log')))}.log"
    return Child(env, tmp / name, point, n, *args)


# What is tested is the lake after a crash, not the environment against the image lock: the
# local runs are allowed to differ from the locked image (recorded in provenance, the same in the
# reference and in every run here).
LOCAL = ("--backend", "local", "--allow-version-mismatch")


def ingest(lake: Path, *extra: str) -> tuple[str, ...]:
    return ("ingest", str(shared_path(*T1)), "--site", SITE, "--lake", str(lake), *LOCAL, *extra)


def process(lake: Path, study_key: str) -> tuple[str, ...]:
    return ("process", study_key, "--site", SITE, "--lake", str(lake), *LOCAL)


# -- what must hold after a restart ----------------------------------------------------------------

def rows(lake: Lake, table: str) -> pd.DataFrame:
    """A table's rows without the columns that differ between any two runs, in key order."""
    df = read_table(lake, table)
    keys = ["site", *TABLES[table].primary_key]
    return df.drop(columns=[c for c in VOLATILE if c in df]).sort_values(keys).reset_index(drop=True)


def assert_same_rows(lake: Lake, ref: Lake, *tables: str) -> None:
    for table in tables:
        pd.testing.assert_frame_equal(rows(lake, table), rows(ref, table), obj=f"table {table}")


def assert_readable(lake: Lake) -> None:
    """Every Parquet file reads, every table reads as a dataset, and no table holds a key twice."""
    root = Path(lake.root) / "tables"
    for path in root.rglob("*.parquet"):
        pq.read_table(path)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        pads.dataset(folder, format="parquet", partitioning="hive").to_table()
        df = read_table(lake, folder.name)
        dup = df[df.duplicated(["site", *TABLES[folder.name].primary_key], keep=False)]
        assert dup.empty, f"table {folder.name}: a primary key twice:\n{dup}"


def assert_audit_verifies(lake: Lake, env: dict[str, str]) -> None:
    from flows.cli import app

    res = CliRunner().invoke(app, ["audit", "verify", "--lake", lake.url, "--anchor", env["CORELAB_AUDIT_ANCHOR"],
                                   "--require-anchor"])
    assert res.exit_code == 0, res.output


def received_events(lake: Lake, study_key: str) -> list[dict]:
    return [e for e in read_events(lake)
            if e["action"] == "study_received" and e["details"]["study_key"] == study_key]


def temp_files(lake: Lake) -> list[str]:
    return sorted(p.relative_to(lake.root).as_posix() for p in Path(lake.root).rglob(".tmp-*"))


# -- the clean reference ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(prefect_harness, tmp_path_factory, trial):
    """The T1 received (a snapshot of that lake) and processed once, without a kill."""
    base = tmp_path_factory.mktemp("kill9-ref")
    (o,) = receive_study(str(shared_path(*T1)), SITE, lake_url=str(base / "lake"), trial=trial)
    shutil.copytree(base / "lake", base / "received")
    (sq,) = process_study(o.study.study_key, SITE, lake_url=str(base / "lake"), backend="local",
                          allow_version_mismatch=True, trial=trial)
    assert sq.verdict.status == "PASS"
    return o.study.study_key, Lake(str(base / "received")), Lake(str(base / "lake"))


# -- kill points in receive ------------------------------------------------------------------------

RECEIVE_POINTS = [
    # the series partition written, the studies row not yet: the study must not pass for received
    ("table-written", 1),
    # the studies partition complete under its temporary name, not renamed (its event appended)
    ("table-rename", 2),
    # the study_received event written, the audit head not moved to it
    ("audit-event", 1),
    # the head moved, the anchor outside the lake not
    ("audit-head", 1),
]


@pytest.mark.parametrize(("point", "n"), RECEIVE_POINTS, ids=[f"{p}-{n}" for p, n in RECEIVE_POINTS])
def test_a_receive_killed_and_run_again_is_the_clean_receive(point, n, env, reference, tmp_path):
    study_key, ref, _ = reference
    lake_dir = tmp_path / "lake"
    corelab(env, tmp_path, point, n, *ingest(lake_dir, "--no-process")).killed()
    lake = Lake(str(lake_dir))
    assert_readable(lake)
    assert read_table(lake, "studies").empty      # the studies row is the last thing written

    again = corelab(env, tmp_path, "none", 0, *ingest(lake_dir, "--no-process")).succeeded()
    assert "already received" not in again.output()
    assert_readable(lake)
    assert_same_rows(lake, ref, *RECEIVE_TABLES)
    assert lake.find("deid") == ref.find("deid")
    assert all(lake.read_bytes(p) == ref.read_bytes(p) for p in lake.find("deid"))
    assert len(received_events(lake, study_key)) == 1
    assert lake.find(f"inbox/{SITE}") == []                 # the raw copy released once verified
    assert_audit_verifies(lake, env)
    if point == "table-rename":   # the cut partition's temporary file stays, and no reader above saw it
        [temp] = temp_files(lake)
        assert temp.startswith(f"tables/studies/site={SITE}/.tmp-")


# -- kill points in de-identification, the pipeline and the QC record: one lake, killed four times --

@pytest.fixture(scope="module")
def killed_four_times(env, reference, tmp_path_factory):
    """The T1 ingested and processed through four kills, a copy of the lake after each kill kept.

    1. ``ingest --no-process`` killed before the de-identified file is renamed into ``deid/``;
    2. ``ingest`` again (receive, then process) killed while the pipeline subprocess runs;
    3. ``process`` again killed right after its first table write of the series' record (the
       biomarkers; the qc rows, which mark the series done, are written last);
    4. ``process`` again, to the end.
    """
    study_key, _, _ = reference
    tmp = tmp_path_factory.mktemp("kill9-chain")
    lake_dir = tmp / "lake"
    lake = Lake(str(lake_dir))
    states: dict[str, object] = {}

    def snapshot(name: str) -> None:
        assert_readable(lake)
        shutil.copytree(lake_dir, tmp / name, ignore=shutil.ignore_patterns(".locks"))
        states[name] = Lake(str(tmp / name))

    corelab(env, tmp, "deid-rename", 1, *ingest(lake_dir, "--no-process")).killed()
    states["deid_temps"] = temp_files(lake)
    snapshot("after_deid_kill")
    pipeline = corelab(env, tmp, "pipeline", 1, *ingest(lake_dir)).killed()
    states["pipeline_left"] = pipeline.left
    snapshot("after_pipeline_kill")
    corelab(env, tmp, "table-written", 1, *process(lake_dir, study_key)).killed()
    snapshot("after_qc_kill")
    corelab(env, tmp, "none", 0, *process(lake_dir, study_key)).succeeded()
    states["final"] = lake
    return states


def test_a_kill_in_deidentification_leaves_only_hidden_temporaries_and_the_restart_receives_cleanly(
        killed_four_times, reference, env):
    _, ref, _ = reference
    temps = killed_four_times["deid_temps"]
    assert temps and all(t.startswith(f"deid/{SITE}/") and Path(t).name.startswith(".tmp-") for t in temps)
    after = killed_four_times["after_deid_kill"]
    assert after.find("deid") == [] and read_table(after, "studies").empty
    lake = killed_four_times["final"]
    assert_same_rows(lake, ref, *RECEIVE_TABLES)   # the restart received it as a clean run does
    assert all(lake.read_bytes(p) == ref.read_bytes(p) for p in ref.find("deid"))


def test_a_pipeline_run_killed_and_run_again_gives_the_clean_verdicts(killed_four_times, reference):
    _, _, ref = reference
    killed = killed_four_times["after_pipeline_kill"]
    assert read_table(killed, "qc").empty and read_table(killed, "biomarkers").empty
    # the next run ran the pipeline again and was killed after its first write of the series' record:
    # the biomarkers are the clean run's, and no qc verdict marks the series done yet
    lake = killed_four_times["after_qc_kill"]
    assert_same_rows(lake, ref, "biomarkers")
    assert read_table(lake, "qc").empty
    assert_same_rows(killed_four_times["final"], ref, "qc", *RECEIVE_TABLES)


def test_after_four_kills_the_lake_reads_and_its_audit_verifies(killed_four_times, reference, env):
    study_key, _, _ = reference
    lake = killed_four_times["final"]
    assert_readable(lake)
    assert len(read_table(lake, "studies")) == 1 and len(received_events(lake, study_key)) == 1
    assert_audit_verifies(lake, env)


def test_no_pipeline_process_outlives_the_flow_killed_while_it_ran(killed_four_times):
    left = killed_four_times["pipeline_left"]
    assert not [cmd for cmd in left.values() if "pipelines.anat" in cmd], left


def test_a_kill_between_the_qc_and_biomarker_writes_loses_no_biomarker(killed_four_times, reference):
    _, _, ref = reference
    lake = killed_four_times["final"]
    assert_same_rows(lake, ref, "qc", "biomarkers")
    processed = [e for e in read_events(lake) if e["action"] == "series_processed"]
    assert len(processed) == 1


# -- the service killed while it receives a study its receiver acknowledged --------------------------

def _serving_port(child: Child, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"dicom\s+CORELAB@[\d.]+:(\d+)", child.output())
        if found:
            return int(found.group(1))
        assert child.proc.poll() is None, child.output()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"corelab serve did not listen within {timeout} s:\n{child.output()[-3000:]}")


def test_the_service_killed_between_a_studys_series_loses_no_acknowledged_instance(env, trial, tmp_path):
    """``corelab serve`` receives a study by DICOM and is killed once two of its four series are in
    ``deid/``; restarted, its receiver hands the study over again and it is received whole, once."""
    files = dicom_files(*SI_STUDY)
    site, lake_dir = "siemens-nih", tmp_path / "lake"
    serve = ("serve", "--dicom-port", "0", "--no-serve-flows", "--idle", "0.5", "--lake", str(lake_dir))
    first = corelab(env, tmp_path, "deid-written", 2, *serve)
    statuses, _ = send(_serving_port(first), "SINIH", files)
    assert statuses == [0] * len(files)                          # every instance acknowledged
    first.killed(timeout=120)
    lake = Lake(str(lake_dir))
    assert_readable(lake)
    assert read_table(lake, "studies").empty and len(lake.find("deid")) > 0
    [upload] = [name for name in lake.listdir(f"inbox/{site}") if name.startswith("scp-")]
    assert len(lake.find(f"inbox/{site}/{upload}")) == len(files)

    second = corelab(env, tmp_path, "none", 0, *serve)
    try:
        _serving_port(second)
        deadline = time.monotonic() + 120
        while not lake.exists(f"{RECEIVER_STATE}/{site}/{upload}.json") and time.monotonic() < deadline:
            assert second.proc.poll() is None, second.output()[-3000:]
            time.sleep(0.5)
    finally:
        second.proc.send_signal(signal.SIGTERM)
        assert second.wait(90) in (0, 130), second.output()[-3000:]
    assert lake.exists(f"{RECEIVER_STATE}/{site}/{upload}.json"), second.output()[-3000:]

    clean, upload_dir = tmp_path / "clean", tmp_path / "upload"   # the same files, received from a folder
    upload_dir.mkdir()
    for f in files:
        shutil.copy(f, upload_dir / f.name)
    receive_study(str(upload_dir), site, lake_url=str(clean), trial=trial)
    ref = Lake(str(clean))
    assert_readable(lake)
    assert_same_rows(lake, ref, *RECEIVE_TABLES)
    assert int(read_table(lake, "series").n_files.sum()) == len(files)
    assert len([p for p in lake.find("deid") if p.endswith(".dcm")]) == len(files)
    assert all(lake.read_bytes(p) == ref.read_bytes(p) for p in ref.find("deid"))
    (study_key,) = read_table(lake, "studies").study_key
    assert len(received_events(lake, study_key)) == 1
    assert lake.find(f"inbox/{site}") == []                      # handed over, received, released
    assert_audit_verifies(lake, env)
