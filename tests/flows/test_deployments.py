"""Deployments: every entry of deployments/prefect.yaml names a real flow with real parameters;
the nightly flow retries runs that never started."""

from __future__ import annotations

import importlib
import inspect

import pytest
import yaml

from data_contracts.trial import load_trial
from flows.nightly import nightly_reprocess
from flows.process_study import process_study
from tasks.intake.inventory import inventory_upload
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
def test_nightly_retries_a_run_that_never_started(prefect_harness, tmp_path):
    trial = load_trial(DEMO_TRIAL)
    lake = Lake(str(tmp_path / "lake")).init()
    o = receive_one_study(Upload(trial, "siemens-xa30", "u", lake),
                          inventory_upload(shared_path("dcm_qa_xa30", "In")).accepted)
    record_study(lake, o, o.matcher)
    (sp,) = process_study(o.study.study_key, "siemens-xa30", lake_url=lake.url, backend="apptainer", trial=trial)
    assert sp.verdict.status == "FAIL" and "not run:" in sp.verdict.reasons[0]
    assert sp.verdict.reason_code == "engine_missing"           # no apptainer on this machine
    verdict = read_table(lake, "qc").query("metric == 'verdict'").iloc[0]
    assert verdict.reason_code == "engine_missing"
    (deviation,) = read_table(lake, "deviations").query("kind == 'qc_fail'").itertuples()
    assert deviation.reason_code == "engine_missing"
    trial_file = tmp_path / "trial.yaml"
    trial_file.write_text(DEMO_TRIAL.read_text())
    counts = nightly_reprocess(lake.url, str(trial_file), backend="local")
    assert counts == {"studies": 1, "series_processed": 1, "retried": 1}
    verdicts = read_table(lake, "qc").query("metric == 'verdict'")
    assert verdicts.verdict.tolist() == ["PASS"]
    assert nightly_reprocess(lake.url, str(trial_file), backend="local")["series_processed"] == 0


@pytest.mark.prefect
def test_nightly_goes_on_after_a_study_fails_and_ends_red(prefect_harness, tmp_path, monkeypatch):
    from prefect import task

    import flows.process_study as process_flow

    trial = load_trial(DEMO_TRIAL)
    lake = Lake(str(tmp_path / "lake")).init()
    for site, parts in (("siemens-xa30", ("dcm_qa_xa30", "In")), ("ge-nih", ("dcm_qa_nih", "In", "20180918GE"))):
        o = receive_one_study(Upload(trial, site, "u", lake), inventory_upload(shared_path(*parts)).accepted)
        record_study(lake, o, o.matcher)

    @task(name="run-pipeline")
    def broken(*args, **kwargs):
        raise RuntimeError("the pipeline task crashed")

    monkeypatch.setattr(process_flow, "run_on_image_task", broken)   # only the XA30 study has a T1
    trial_file = tmp_path / "trial.yaml"
    trial_file.write_text(DEMO_TRIAL.read_text())
    state = nightly_reprocess(lake.url, str(trial_file), backend="local", return_state=True)
    assert state.is_failed() and "1 of 2 studies failed to process" in state.message
    ge = read_table(lake, "studies").query("site == 'ge-nih'").iloc[0]
    assert lake.find(f"bids/sub-{ge.subject}/ses-baseline/func")          # the other study was processed
    assert read_table(lake, "qc").empty                                   # and the crash left no verdict
