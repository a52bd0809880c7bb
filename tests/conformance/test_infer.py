"""`corelab protocol infer`: a drafted protocol that validates and that its own scan meets."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from data_contracts.trial import load_trial
from flows.cli import app
from tasks.intake.inventory import inventory_upload
from tasks.lake.storage import Lake
from tasks.receive.study import Upload, receive_one_study
from tests.data import shared_path
from tests.helpers import DEMO_TRIAL


def test_inferred_protocol_is_met_by_its_qualification_scan(tmp_path):
    scan = shared_path("dcm_qa_xa30", "In")
    res = CliRunner().invoke(app, ["protocol", "infer", str(scan)])
    assert res.exit_code == 0, res.output
    drafted = yaml.safe_load(res.output)
    (st,) = drafted["protocol"]["series_types"]
    assert st["datatype"] == "anat" and st["suffix"] == "T1w"
    tol = st["vendor_tolerances"]["siemens"]
    assert tol["repetition_time"]["value"] == 1800 and tol["inversion_time"]["value"] == 900
    # put the draft into a trial file and receive the same scan against it
    trial = yaml.safe_load(DEMO_TRIAL.read_text())
    trial["protocol"] = drafted["protocol"]
    p = tmp_path / "trial.yaml"
    p.write_text(yaml.safe_dump(trial))
    cfg = load_trial(p)
    files = inventory_upload(scan).accepted
    o = receive_one_study(Upload(cfg, "siemens-xa30", "u", Lake(str(tmp_path / "lake")).init()), files)
    assert [s.verdict for s in o.series] == ["conform"] and o.all_findings == []


def test_infer_on_a_folder_without_dicom_fails_clearly(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    res = CliRunner().invoke(app, ["protocol", "infer", str(tmp_path)])
    assert res.exit_code == 2 and "no readable DICOM series" in res.output
