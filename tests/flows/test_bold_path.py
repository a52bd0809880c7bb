"""BOLD series of ../shared/data through the whole path (issue 13): received as the trial's bold,
converted with their sidecars, QC'd by the pinned bold pipeline, judged.

- The Siemens XA61 multiband BOLD phantom (one series of the folder) passes, and its FD and tSNR
  reach ``biomarkers`` with provenance; raw and derivatives pass the official BIDS validator.
- The GE EPI, its volunteer moving throughout, fails the gate on realignment and tSNR and raises
  one site query; it adds no biomarker.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.process_study import process_study
from flows.receive_study import receive_study
from tasks.lake.storage import open_lake
from tasks.lake.tables import read_table
from tests.data import shared_path
from tests.helpers import bids_validator, describe
from tests.pipelines.bold_data import SERIES, XA_SERIES
from tests.receive.test_completeness import _series_files

pytestmark = [pytest.mark.prefect, pytest.mark.pipeline]


def _run(tmp: Path, trial, site: str, files: list[Path]):
    up = tmp / "upload"
    up.mkdir(parents=True)
    for f in files:
        shutil.copy(f, up / f.name)
    lake = str(tmp / "lake")
    (o,) = receive_study(str(up), site, lake_url=lake, trial=trial)
    assert [(s.series_type, s.verdict) for s in o.series] == [("bold", "conform")], [f.message for f in o.findings]
    (sp,) = process_study(o.study.study_key, site, lake_url=lake, trial=trial)
    return open_lake(lake), sp


def test_the_xa61_multiband_bold_passes_with_its_measures_and_provenance(prefect_harness, trial, tmp_path):
    lake, sp = _run(tmp_path, trial, "siemens-xa61", _series_files(SERIES["xa61"], int(XA_SERIES["xa61"])))
    assert sp.verdict.status == "PASS", sp.verdict.reasons
    bio = read_table(lake, "biomarkers").set_index("measure")
    assert set(bio.index) == {"FD_mean", "FD_perc", "tSNR"}
    assert bio.loc["FD_mean", "unit"] == "mm" and bio.loc["FD_mean", "value"] < 0.2
    assert bio.loc["tSNR", "value"] > 20 and bio.loc["FD_perc", "unit"] == "%"
    assert set(bio["pipeline_name"]) == {"bold"} and set(bio["qc_status"]) == {"PASS"}
    assert bio["container_digest"].str.startswith("sha256:").all() and bio["input_sha256"].str.len().eq(64).all()
    qc = read_table(lake, "qc")
    assert {"bold_fd_mean", "bold_tsnr", "bold_slice_timing_errors"} <= set(qc["metric"])
    root = Path(lake.root)
    for dataset in [root / "bids", *(root / "derivatives").iterdir()]:
        errors, _ = bids_validator(dataset)
        assert errors == [], (dataset, describe(errors))


def test_the_moving_ge_volunteer_fails_and_the_site_is_asked(prefect_harness, trial, tmp_path):
    files = [f for f in sorted(shared_path(*SERIES["ge"]).iterdir()) if not f.name.startswith("README")]
    lake, sp = _run(tmp_path, trial, "ge-nih", files)
    assert sp.verdict.status == "FAIL"
    failed = {m.metric for m in sp.verdict.metrics if m.status == "FAIL"}
    assert {"bold_realign_failed", "bold_tsnr"} <= failed, sp.verdict.reasons
    assert read_table(lake, "biomarkers").empty
    queries = read_table(lake, "queries")
    assert len(queries) == 1 and "bold_realign_failed" in queries["message"].iloc[0]
