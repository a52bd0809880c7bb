"""The Philips DWI of ../shared/data through the whole path (issue 13): received as the trial's dwi,
converted with its gradient table, processed by the pinned dwi pipeline, judged, and its white-matter
FA/MD in `biomarkers` with provenance. Two faults planted in the DICOM files a site would send
(a gradient axis with the wrong sign in every header; signal dropout in DW slices) each FAIL the
gate with their reason and raise a site query, and add no biomarker.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pydicom
import pytest

from flows.process_study import process_study
from flows.receive_study import receive_study
from tasks.lake.storage import open_lake
from tasks.lake.tables import read_table
from tests.data import shared_path
from tests.helpers import bids_validator, describe

pytestmark = [pytest.mark.prefect, pytest.mark.pipeline]
SITE = "philips-dwi"


def _upload(tmp: Path, plant=None) -> Path:
    """The site's series as plain DICOM files, each passed through ``plant`` first."""
    out = tmp / "upload"
    out.mkdir(parents=True)
    for f in sorted(shared_path("dcm_qa_philips_dwi", "In", "cl", "DICOM").glob("IM_*.gz")):
        ds = pydicom.dcmread(io.BytesIO(gzip.decompress(f.read_bytes())))
        if plant is not None:
            plant(ds)
        ds.save_as(out / f"{f.name.removesuffix('.gz')}.dcm")
    return out


def _run(tmp: Path, trial, plant=None):
    lake = str(tmp / "lake")
    (o,) = receive_study(str(_upload(tmp, plant)), SITE, lake_url=lake, trial=trial)
    assert o.status == "accepted" and [(s.series_type, s.verdict) for s in o.series] == [("dwi", "conform")]
    (sp,) = process_study(o.study.study_key, SITE, lake_url=lake, trial=trial)
    return open_lake(lake), sp


def test_the_philips_dwi_becomes_white_matter_fa_and_md_with_provenance(prefect_harness, trial, tmp_path):
    lake, sp = _run(tmp_path, trial)
    assert sp.verdict.status == "PASS", sp.verdict.reasons
    bio = read_table(lake, "biomarkers").set_index("measure")
    assert set(bio.index) == {"FA_WM", "MD_WM", "AD_WM", "RD_WM", "WM_volume"}
    assert 0.35 <= bio.loc["FA_WM", "value"] <= 0.55 and bio.loc["FA_WM", "unit"] == "1"
    assert 0.6 <= bio.loc["MD_WM", "value"] <= 0.9 and bio.loc["MD_WM", "unit"] == "um2/ms"
    assert set(bio["pipeline_name"]) == {"dwi"} and set(bio["qc_status"]) == {"PASS"}
    assert bio["input_sha256"].str.len().eq(64).all() and bio["container_digest"].str.startswith("sha256:").all()
    root = Path(lake.root)
    raw = sorted(p.name.split("_", 2)[-1] for p in (root / "bids").rglob("*_dwi.*"))
    assert raw == ["dwi.bval", "dwi.bvec", "dwi.json", "dwi.nii.gz"]
    for dataset in [root / "bids", *(root / "derivatives").iterdir()]:
        errors, _ = bids_validator(dataset)
        assert errors == [], (dataset, describe(errors))


def _flip_ap(ds) -> None:
    """The AP component of the gradient negated, in the standard element and Philips' own."""
    if "DiffusionGradientOrientation" in ds:
        g = list(ds.DiffusionGradientOrientation)
        ds.DiffusionGradientOrientation = [g[0], -g[1], g[2]]
    if (0x2005, 0x10B1) in ds:
        ds[0x2005, 0x10B1].value = -float(ds[0x2005, 0x10B1].value)


def _dropout(ds) -> None:
    """Six mid-brain slices of two b=1000 volumes at a fifth of their signal (a table vibration)."""
    b = float(ds[0x0018, 0x9087].value)
    direction = int(ds[0x2005, 0x1413].value)          # Philips' gradient index (1412: the b index)
    if b > 500 and direction in (3, 9) and -84 <= float(ds.SliceLocation) <= -72:   # slices 13-18 of 32
        pixels = ds.pixel_array
        ds.PixelData = (pixels * 0.2).astype(pixels.dtype).tobytes()


@pytest.mark.parametrize("plant, metric", [(_flip_ap, "dwi_gradient_flip_gain"), (_dropout, "dwi_dropout_slices")])
def test_a_planted_fault_fails_the_gate_with_its_reason_and_a_site_query(prefect_harness, trial, tmp_path,
                                                                         plant, metric):
    lake, sp = _run(tmp_path, trial, plant)
    assert sp.verdict.status == "FAIL" and any(r.startswith(metric) for r in sp.verdict.reasons), sp.verdict.reasons
    assert read_table(lake, "biomarkers").empty
    queries = read_table(lake, "queries")
    assert len(queries) == 1 and queries["status"].iloc[0] == "open" and metric in queries["message"].iloc[0]


# --- the same session's T1: the anat pipeline first, its white matter in the dwi pipeline ---------

SESSION_TAGS = ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
                "StudyTime", "AccessionNumber", "StudyID", "DeviceSerialNumber", "SoftwareVersions",
                "StationName", "InstitutionName")


def _with_t1(upload: Path) -> None:
    """The Philips MPRAGE of ../shared/data (same scanner model) sent in the DWI's study: the
    study, patient and scanner elements of the DWI's first file written into every T1 file."""
    first = pydicom.dcmread(sorted(upload.glob("*.dcm"))[0], stop_before_pixels=True)
    for f in sorted(shared_path("dcm_qa_philips_enh", "In", "cl").glob("*.dcm.gz")):
        ds = pydicom.dcmread(io.BytesIO(gzip.decompress(f.read_bytes())))
        for tag in SESSION_TAGS:
            if tag in first:
                setattr(ds, tag, first.data_element(tag).value)
            elif tag in ds:
                delattr(ds, tag)
        ds.save_as(upload / f"T1_{f.name.removesuffix('.gz')}")


@pytest.fixture(scope="module")
def t1_site_trial(tmp_path_factory):
    """The demo trial with T1w series also accepted from the DWI site."""
    from data_contracts.trial import load_trial
    from tests.helpers import DEMO_TRIAL

    text = Path(DEMO_TRIAL).read_text()
    line = "      sites: [philips-ingenia, siemens-xa30]\n"
    assert text.count(line) == 1
    path = tmp_path_factory.mktemp("trial") / "trial.yaml"
    path.write_text(text.replace(line, "      sites: [philips-ingenia, siemens-xa30, philips-dwi]\n"))
    return load_trial(path)


def test_a_t1_of_the_same_session_gives_the_dwi_its_white_matter(prefect_harness, t1_site_trial, tmp_path):
    lake_url = str(tmp_path / "lake")
    upload = _upload(tmp_path)
    _with_t1(upload)
    (o,) = receive_study(str(upload), SITE, lake_url=lake_url, trial=t1_site_trial)
    assert o.status == "accepted"
    assert sorted((s.series_type, s.verdict) for s in o.series) == [("T1w", "conform"), ("dwi", "conform")]
    done = process_study(o.study.study_key, SITE, lake_url=lake_url, trial=t1_site_trial, pipelines=["dwi", "anat"])
    by = {sq.run.pipeline: sq for sq in done}
    assert by["anat"].verdict.status in ("PASS", "WARN"), by["anat"].verdict.reasons
    dwi = by["dwi"]
    assert dwi.verdict.status == "PASS", dwi.verdict.reasons
    # the dwi run took the anat run's T1 and labels: in its command and, hashed, in its inputs
    anat_out = by["anat"].run.outputs
    lake = open_lake(lake_url)
    inputs = {Path(p).name for p in dwi.run.record["inputs"]}
    assert {Path(anat_out["preproc"]).name, Path(anat_out["dseg"]).name} <= inputs
    command = dwi.run.record["command"]
    assert command[command.index("--t1w") + 1] == lake.path(anat_out["preproc"])
    assert command[command.index("--t1w-dseg") + 1] == lake.path(anat_out["dseg"])
    assert dwi.metrics["dwi_t1w_rejected"] == 0
    bio = read_table(lake, "biomarkers")
    dwi_rows = bio[bio.pipeline_name == "dwi"].set_index("measure")
    assert {"FA_T1WM", "MD_T1WM", "AD_T1WM", "RD_T1WM", "T1WM_volume"} <= set(dwi_rows.index)
    assert 0.35 <= dwi_rows.loc["FA_T1WM", "value"] <= 0.55 and 0.6 <= dwi_rows.loc["MD_T1WM", "value"] <= 0.9
    root = Path(lake.root)
    assert len(list(root.glob("derivatives/dwi-*/sub-*/ses-*/dwi/*_label-WM_desc-T1w_mask.nii.gz"))) == 1
    for dataset in (root / "derivatives").iterdir():
        errors, _ = bids_validator(dataset)
        assert errors == [], (dataset, describe(errors))
