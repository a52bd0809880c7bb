"""DICOM to BIDS on every accepted series of ../shared/data: names, images, sidecars, tables."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from bids_validator import BIDSValidator

from data_contracts.trial import load_trial
from flows.cli.demo import DEMO_UPLOADS
from tasks.bids.convert import ConversionError, bids_stem, convert_series, plan_session
from tasks.bids.dataset import write_dataset_description, write_participants, write_scans, write_sessions
from tasks.deid.fingerprint import Fingerprint, load_fingerprints
from tasks.deid.verify import Identifier, Matcher
from tasks.intake.inventory import inventory_upload
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tasks.receive.record import record_study
from tasks.receive.study import Upload, receive_one_study
from tests.data import shared_path
from tests.helpers import DEMO_TRIAL, bids_validator, describe

REF_KEYS = ("SliceTiming", "PhaseEncodingDirection", "EffectiveEchoSpacing", "TotalReadoutTime",
            "RepetitionTime", "EchoTime", "FlipAngle", "InversionTime", "ImageOrientationPatientDICOM")
# series number -> upstream Ref NIfTI (relative to ../shared/data)
REFS = {
    ("ge-nih", 4): "dcm_qa_nih/Ref/DCM2NIIX_regression_test_4.nii",
    ("ge-nih", 7): "dcm_qa_nih/Ref/DCM2NIIX_regression_test_7.nii",
    ("siemens-nih", 3): "dcm_qa_nih/Ref/EPI_PE=AP_3.nii",
    ("siemens-nih", 6): "dcm_qa_nih/Ref/EPI_PE=LR_6.nii",
    ("siemens-trio", 6): "dcm_qa/Ref/ax_asc_35sl_6.nii",
    ("philips-achieva", 201): "dcm_qa_philips/Ref/EPI_asc_CLEAR_201.nii",
    ("siemens-xa30", 5): "dcm_qa_xa30/Ref/5_anat-T1w_acq-tfl.nii",
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    trial = load_trial(DEMO_TRIAL)
    lake = Lake(str(tmp_path_factory.mktemp("lake"))).init()
    for site, rel in DEMO_UPLOADS.items():
        o = receive_one_study(Upload(trial, site, "u", lake), inventory_upload(shared_path(rel)).accepted)
        record_study(lake, o, o.matcher)
    series, images = read_table(lake, "series"), {}
    write_dataset_description(lake, trial)
    for st in read_table(lake, "studies").itertuples():
        fps = load_fingerprints(lake, trial, st.site, st.subject, st.session)
        for s in plan_session(series[series.study_key == st.study_key], trial):
            images[(st.site, s.series_number)] = convert_series(lake, s, st.subject, st.session, fps)
        write_scans(lake, st.subject, st.session, str(st.acquisition_date))
        write_sessions(lake, st.subject)
    write_participants(lake, trial)
    return lake, images


def test_every_series_becomes_one_valid_bids_image(converted):
    lake, images = converted
    assert len(images) == 13
    validator = BIDSValidator()
    files = lake.find("bids")
    for rel in files:
        assert validator.is_bids("/" + rel.removeprefix("bids/")), rel
    kinds = sorted(c.image.split("/")[3] for c in images.values())
    assert kinds == ["anat"] * 2 + ["dwi"] + ["fmap"] * 4 + ["func"] * 6
    dwi = images[("philips-dwi", 701)]
    assert dwi.image.endswith("_dwi.nii.gz") and {rel.rsplit(".", 1)[-1] for rel in dwi.files} >= {"bval", "bvec"}
    assert images[("siemens-nih", 3)].image.endswith("_dir-AP_run-1_epi.nii.gz")
    assert images[("ge-nih", 6)].image.endswith("_task-rest_run-3_bold.nii.gz")


@pytest.mark.parametrize("key", sorted(REFS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_image_equals_the_upstream_reference(converted, key):
    lake, images = converted
    c = images[key]
    ours = nib.load(lake.path(c.image))
    ref_path = shared_path(*REFS[key].split("/"))
    ref = nib.load(ref_path)
    assert ours.shape == ref.shape
    assert np.allclose(ours.affine, ref.affine, atol=1e-4)
    assert np.array_equal(np.asanyarray(ours.dataobj), np.asanyarray(ref.dataobj))
    ref_json = json.loads(ref_path.with_suffix(".json").read_text())
    for k in REF_KEYS:
        if k in ref_json:
            assert c.sidecar.get(k) == ref_json[k], k


def test_enhanced_and_gzipped_dicom_convert(converted):
    lake, images = converted
    xa = nib.load(lake.path(images[("siemens-xa30", 5)].image))
    ph = nib.load(lake.path(images[("philips-ingenia", 1301)].image))
    assert xa.shape == (96, 128, 128)
    assert ph.shape == (170, 256, 256) and np.allclose(ph.header.get_zooms(), (1, 1, 1))


def test_the_official_validator_finds_no_error_in_the_raw_dataset(converted):
    lake, images = converted
    errors, warnings = bids_validator(lake.path("bids"))
    assert errors == [], describe(errors)
    # TaskName was missing on every bold sidecar, acq_time was a bare date
    codes = {(w["code"], w.get("subCode")) for w in warnings}
    assert ("SIDECAR_KEY_RECOMMENDED", "TaskName") not in codes and ("README_FILE_MISSING", None) not in codes


def test_dataset_tables(converted):
    lake, images = converted
    desc = json.loads(lake.read_text("bids/dataset_description.json"))
    assert desc["DatasetType"] == "raw" and {g["Name"] for g in desc["GeneratedBy"]} == {"corelab", "dcm2niix"}
    parts = pd.read_csv(lake.path("bids/participants.tsv"), sep="\t")
    assert len(parts) == len(DEMO_UPLOADS) == 7
    xa = parts[parts.site == "siemens-xa30"].iloc[0]
    assert (xa.age, xa.sex) == (31, "M")               # DICOM PatientAge 031Y, retained
    assert parts[parts.site == "ge-nih"].iloc[0].age != parts[parts.site == "ge-nih"].iloc[0].age  # "000Y": n/a
    sub = xa.participant_id
    sessions = pd.read_csv(lake.path(f"bids/{sub}/{sub}_sessions.tsv"), sep="\t")
    assert sessions.session_id.tolist() == ["ses-baseline"]
    scans = pd.read_csv(lake.path(f"bids/{sub}/ses-baseline/{sub}_ses-baseline_scans.tsv"), sep="\t")
    assert scans.filename.tolist() == [images[("siemens-xa30", 5)].image.split("ses-baseline/")[1]]
    assert scans.acq_time[0].startswith(sessions.acq_time[0]) and "T" in scans.acq_time[0]


def test_sidecars_hold_no_identifier(converted):
    lake, images = converted
    for c in images.values():
        text = json.dumps(c.sidecar).lower()
        for banned in ("regression", "phantom", "xatest", "hucheng", "d2n_philips", "stc_test", "leibniz"):
            assert banned not in text


def test_fingerprint_refuses_a_sidecar_with_an_identifier(converted, monkeypatch):
    lake, _ = converted
    trial = load_trial(DEMO_TRIAL)
    study = read_table(lake, "studies").query("site == 'siemens-xa30'").iloc[0]
    series = read_table(lake, "series")
    (todo,) = plan_session(series[series.study_key == study.study_key], trial)
    bad = Fingerprint.from_matcher(Matcher([Identifier("PatientName", "Prisma")]), b"k")  # in the sidecar
    with pytest.raises(ConversionError, match="identifying value in the output .PatientName."):
        convert_series(lake, todo, "OTHER", "baseline", [bad])
    assert not lake.find("bids/sub-OTHER")


def test_bids_stem_orders_entities():
    assert bids_stem("S1", "v1", {"run": "2", "task": "rest", "acq": "fast"}, "bold") == \
        "sub-S1_ses-v1_task-rest_acq-fast_run-2_bold"
    with pytest.raises(ValueError, match="unknown BIDS entities"):
        bids_stem("S1", "v1", {"colour": "red"}, "T1w")
