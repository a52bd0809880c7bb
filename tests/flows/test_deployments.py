"""Deployments: every entry of deployments/prefect.yaml names a real flow with real parameters;
the nightly flow retries runs that never started."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from data_contracts.trial import load_trial
from flows.nightly import nightly_reprocess
from flows.process_study import process_study
from tasks.intake.inventory import inventory_upload
from tasks.lake.audit import read_events
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tasks.receive.record import record_study
from tasks.receive.study import Upload, receive_one_study
from tests.data import REPO, shared_path
from tests.helpers import DEMO_TRIAL

SPEC = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())


@pytest.mark.parametrize("entry", SPEC["deployments"], ids=lambda e: e["name"])
def test_entry_points_at_a_flow_and_its_parameters(entry):
    path, name = entry["entrypoint"].split(":")
    flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
    params = inspect.signature(flow.fn).parameters
    given = set(entry.get("parameters", {})) | {p for t in entry.get("triggers", [])
                                                 for p in t.get("parameters", {})}
    assert given <= set(params), given - set(params)
    required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
    assert required <= given, required - given
    for sched in entry.get("schedules", []):
        dep = flow.to_deployment(name=entry["name"], cron=sched["cron"])
        assert dep.schedules[0].schedule.cron == sched["cron"]


def test_the_three_kinds_of_deployment_exist():
    names = {e["name"]: e for e in SPEC["deployments"]}
    assert names["receive"]["triggers"][0]["expect"] == ["corelab.upload.ready"]
    assert names["nightly-reprocess"]["schedules"][0]["cron"] == "0 2 * * *"
    assert "schedules" not in names["harmonize"] and "triggers" not in names["harmonize"]


@pytest.mark.prefect
def test_a_worker_without_its_engine_fails_the_run_and_the_nightly_retries_it(prefect_harness, tmp_path):
    """No container engine on the worker (apptainer is not installed here): the run fails, red and
    retryable, and writes no qc row, no deviation, no site query; the nightly run then processes it."""
    trial = load_trial(DEMO_TRIAL)
    lake = Lake(str(tmp_path / "lake")).init()
    o = receive_one_study(Upload(trial, "siemens-xa30", "u", lake),
                          inventory_upload(shared_path("dcm_qa_xa30", "In")).accepted)
    record_study(lake, o, o.matcher)
    deviations_before = read_table(lake, "deviations")
    state = process_study(o.study.study_key, "siemens-xa30", lake_url=lake.url, backend="apptainer", trial=trial,
                          return_state=True)
    assert state.is_failed() and "PipelinesNotRun" in state.message and "apptainer" in state.message
    assert read_table(lake, "qc").empty and read_table(lake, "biomarkers").empty
    assert read_table(lake, "deviations").equals(deviations_before)       # no qc_fail deviation
    assert read_table(lake, "queries").empty                              # no site is asked anything
    (event,) = [e for e in read_events(lake) if e["action"] == "pipeline_not_run"]
    assert event["details"]["reason_code"] == "engine_missing" and event["details"]["backend"] == "apptainer"
    trial_file = tmp_path / "trial.yaml"
    trial_file.write_text(DEMO_TRIAL.read_text())
    counts = nightly_reprocess(lake.url, str(trial_file), backend="local")
    assert counts == {"studies_due": 1, "series_processed": 1, "retried": 0, "failed": 0, "missing_visits": 0}
    page = Path(lake.path("reports/sites.html")).read_text()      # the night refreshed the dashboard
    assert "100 % (1)" in page.split('data-site="siemens-xa30"')[1].split("</tr>")[0]   # its PASS
    (verdict,) = read_table(lake, "qc").query("metric == 'verdict'").itertuples()
    assert verdict.verdict == "PASS" and verdict.backend == "local" and verdict.container_digest is None
    assert len(verdict.environment_sha256) == 64
    assert nightly_reprocess(lake.url, str(trial_file), backend="local")["studies_due"] == 0


@pytest.mark.prefect
def test_nightly_goes_on_after_a_study_fails_and_ends_red(prefect_harness, tmp_path, monkeypatch):
    from prefect import task

    import flows.process_study as process_flow

    trial = load_trial(DEMO_TRIAL)
    lake = Lake(str(tmp_path / "lake")).init()
    for site, parts in (("siemens-xa30", ("dcm_qa_xa30", "In")),
                        ("ge-nih", ("dcm_qa_nih", "In", "20180918GE", "mr_0004"))):
        o = receive_one_study(Upload(trial, site, "u", lake), inventory_upload(shared_path(*parts)).accepted)
        record_study(lake, o, o.matcher)
    real = process_flow.run_on_image_task

    @task(name="run-pipeline")
    def broken(lake, spec, *args, **kwargs):
        if spec.name == "anat":                  # only the XA30 study has a T1
            raise RuntimeError("the pipeline task crashed")
        return real.fn(lake, spec, *args, **kwargs)

    monkeypatch.setattr(process_flow, "run_on_image_task", broken)
    trial_file = tmp_path / "trial.yaml"
    trial_file.write_text(DEMO_TRIAL.read_text())
    state = nightly_reprocess(lake.url, str(trial_file), backend="local", return_state=True)
    assert state.is_failed() and "1 of 2 due studies failed to process" in state.message
    ge = read_table(lake, "studies").query("site == 'ge-nih'").iloc[0]
    assert lake.find(f"bids/sub-{ge.subject}/ses-baseline/func")          # the other study was processed
    qc = read_table(lake, "qc")
    assert set(qc["pipeline_name"]) == {"bold"}                           # and the crash left no verdict


@pytest.mark.prefect
def test_the_nightly_run_spreads_its_studies_over_dask(prefect_harness, tmp_path):
    """Each due study is a process_study subflow in a task: on a Dask worker (a separate process) the task
    arrives pickled and must still find the flow and its parameter types."""
    from flows.runtime import task_runner

    trial = load_trial(DEMO_TRIAL)
    lake = Lake(str(tmp_path / "lake")).init()
    for site, parts in (("ge-nih", ("dcm_qa_nih", "In", "20180918GE", "mr_0004")),
                        ("siemens-nih", ("dcm_qa_nih", "In", "20180918Si", "mr_0003"))):
        o = receive_one_study(Upload(trial, site, "u", lake), inventory_upload(shared_path(*parts)).accepted)
        record_study(lake, o, o.matcher)
    trial_file = tmp_path / "trial.yaml"
    trial_file.write_text(DEMO_TRIAL.read_text())
    nightly = nightly_reprocess.with_options(task_runner=task_runner("dask", workers=2))
    counts = nightly(lake.url, str(trial_file), backend="local")
    # the GE bold goes to the bold pipeline on a worker; no pipeline takes the Siemens EPI field map
    assert counts == {"studies_due": 2, "series_processed": 1, "retried": 0, "failed": 0, "missing_visits": 0}
    assert {p.split("/")[1] for p in lake.find("bids") if p.endswith(".nii.gz")} == \
        set(read_table(lake, "studies").subject.map("sub-{}".format))
