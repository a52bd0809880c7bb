"""Logs reach the run: each decision corelab makes is in the flow run's log in Prefect, and on the
console with ``corelab -v``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flows.process_study import process_study
from flows.receive_study import receive_study
from pipelines.registry import get_spec
from tests.data import REPO, shared_path
from tests.helpers import DEMO_TRIAL, GE_SERIES, copy_upload

ANAT = get_spec("anat").version

pytestmark = pytest.mark.prefect


def run_log(flow_run_id) -> list[str]:
    """Every line of one flow run's log, as the Prefect API holds it (what its UI shows)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()   # logs travel to the API in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                sort=LogSort.TIMESTAMP_ASC)
    return [f"{log.name}: {log.message}" for log in logs]


def test_pairing_skip_command_and_verdict_lines_are_in_the_flow_run_log(prefect_harness, tmp_path, trial):
    lake = str(tmp_path / "lake")
    (o,) = receive_study(str(shared_path("dcm_qa_xa30", "In")), "siemens-xa30", lake_url=lake, trial=trial)
    first = process_study(o.study.study_key, "siemens-xa30", lake_url=lake, trial=trial, return_state=True)
    again = process_study(o.study.study_key, "siemens-xa30", lake_url=lake, trial=trial, return_state=True)
    log = run_log(first.state_details.flow_run_id)
    image = f"bids/sub-{o.study.subject}/ses-baseline/anat/sub-{o.study.subject}_ses-baseline_T1w.nii.gz"
    assert any(line.startswith("corelab.bids: run: ") and "dcm2niix -b y -ba y -z y" in line for line in log), log
    assert f"corelab.bids: {image} <- {o.series[0].deid_path}" in log
    command = [line for line in log if line.startswith(f"corelab.run: running anat {ANAT} on local: ")]
    assert len(command) == 1 and "-m pipelines.anat --input " in command[0] and image in command[0]
    assert any(line.startswith(f"corelab.qc: anat {ANAT} on series ") and line.endswith(": PASS") for line in log)
    skipped = run_log(again.state_details.flow_run_id)
    assert f"corelab.bids: found {image}, skipping conversion of series 5" in skipped
    assert any(line.startswith(f"corelab.qc: found a anat {ANAT} verdict for series ") and line.endswith("skipping")
               for line in skipped), skipped


def test_a_receive_run_logs_each_series_decision(prefect_harness, tmp_path, trial):
    up = copy_upload(tmp_path / "up", *GE_SERIES, limit=3)
    state = receive_study(str(up), "ge-nih", lake_url=str(tmp_path / "lake"), trial=trial, return_state=True)
    log = run_log(state.state_details.flow_run_id)
    # three slices of one volume of ten: short of the protocol's volumes, and incomplete
    assert any(line.startswith("corelab.receive: series 4 ") and line.endswith(
        ": incomplete as bold; major parameter n_volumes; major incomplete_series") for line in log), log


def test_corelab_v_shows_the_decisions_on_the_console(tmp_path):
    up = copy_upload(tmp_path / "up", *GE_SERIES, limit=3)
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    env.pop("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", None)
    def corelab(*flags: str, lake: str) -> subprocess.CompletedProcess:
        args = [*flags, "ingest", str(up), "--site", "ge-nih", "--trial", str(DEMO_TRIAL), "--lake", lake,
                "--no-process"]
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)

    quiet = corelab(lake=str(tmp_path / "lake1"))
    loud = corelab("-v", lake=str(tmp_path / "lake2"))
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    line = "corelab.receive - series 4 "
    assert line in loud.stderr and line not in quiet.stderr


def test_a_process_that_set_prefect_up_first_still_sends_corelab_logs_to_the_run():
    """A worker's flow-run process imports Prefect before loading our flow: the handler is attached then."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING")}
    code = ("import logging, prefect, flows.runtime; "
            "print(sorted(type(h).__name__ for h in logging.getLogger('corelab').handlers), "
            "logging.getLogger('corelab').level)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "['APILogHandler'] 20", out.stderr
