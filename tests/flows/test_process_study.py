"""process_study end to end on real T1s: BIDS, the pinned anat pipeline, the QC gate, the tables."""

from __future__ import annotations

import hashlib
import json
import shutil
import tomllib
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.processing import resample_from_to

from data_contracts.qc_settings import QCSettings
from flows.cli.common import authenticated_user
from flows.process_study import process_study
from flows.receive_study import receive_study
from pipelines.registry import get_spec
from tasks.bids.deface import ROOT as DEFACE_ROOT
from tasks.bids.deface import derivative_paths as deface_paths
from tasks.lake.audit import read_events
from tasks.lake.export import export_biomarkers
from tasks.lake.storage import Lake
from tasks.lake.studies import read_study
from tasks.lake.tables import delete_rows, read_table, write_rows
from tasks.qc.gate import judge
from tasks.qc.measure import gate, measure_quality
from tasks.qc.overrides import OverrideError, override
from tasks.qc.record import biomarker_rows, qc_rows
from tasks.run.derivatives import PipelineRun, lake_outputs, run_on_image
from tasks.run.runner import environment_hash
from tests.data import REPO, shared_path
from tests.helpers import bids_validator, describe

pytestmark = pytest.mark.prefect
ANAT = get_spec("anat").version
T1_SITES = {"siemens-xa30": ("dcm_qa_xa30", "In"), "philips-ingenia": ("dcm_qa_philips_enh", "In")}


def locked_digest() -> str:
    return tomllib.loads((REPO / "containers" / "lock").read_text())["images"]["anat"]["digest"]


@pytest.fixture(scope="module")
def processed(prefect_harness, tmp_path_factory, trial):
    lake_dir = tmp_path_factory.mktemp("lake")
    results = {}
    for site, parts in T1_SITES.items():
        (o,) = receive_study(str(shared_path(*parts)), site, lake_url=str(lake_dir), trial=trial)
        results[site] = (o, process_study(o.study.study_key, site, lake_url=str(lake_dir), trial=trial))
    return Lake(str(lake_dir)), results


@pytest.fixture
def scratch(processed, tmp_path):
    """A copy of the processed lake for a test that changes it: the module's lake stays as made,
    so the tests reading it pass in any order."""
    lake, results = processed
    shutil.copytree(lake.root, tmp_path / "scratch")
    return Lake(str(tmp_path / "scratch")), results


def test_real_t1s_pass_and_become_biomarkers(processed):
    lake, results = processed
    for site, (_, done) in results.items():
        (sp,) = done
        assert sp.verdict.status == "PASS", (site, sp.verdict.reasons)
    bio = read_table(lake, "biomarkers")
    assert sorted(bio.site.unique()) == sorted(T1_SITES)
    assert set(bio.measure) == {"TIV", "GM", "WM", "CSF", "GM_fraction"}
    tiv = bio[bio.measure == "TIV"].set_index("site")["value"]
    assert all(1_100_000 < v < 2_000_000 for v in tiv)            # mm3
    assert set(bio.qc_status) == {"PASS"} and set(bio.pipeline_name) == {"anat"}


def test_every_biomarker_row_carries_its_provenance(processed):
    lake, _ = processed
    bio = read_table(lake, "biomarkers")
    # the local backend ran them: no image ran, so no image digest; the environment's hash instead
    assert set(bio.backend) == {"local"} and bio.container_digest.isna().all()
    qc = read_table(lake, "qc")
    assert set(qc.backend) == {"local"} and qc.container_digest.isna().all()
    for row in bio.drop_duplicates("series_uid").itertuples():
        sidecars = [p for p in lake.find("bids") if p.endswith(".json") and "_T1w" in p
                    and json.loads(lake.read_text(p)).get("SeriesInstanceUID") == row.series_uid]
        (sidecar,) = sidecars
        image = sidecar[: -len(".json")] + ".nii.gz"
        assert row.input_sha256 == hashlib.sha256(lake.read_bytes(image)).hexdigest()
    provenance = [json.loads(lake.read_text(p)) for p in lake.find("derivatives") if p.endswith("_provenance.json")]
    assert len(provenance) == 2 and all(p["ok"] and p["digest"] == "" and p["backend"] == "local"
                                        for p in provenance)
    assert {p["environment_sha256"] for p in provenance} == {environment_hash(provenance[0]["versions"])}
    assert set(bio.environment_sha256) == {provenance[0]["environment_sha256"]}
    assert provenance[0]["image"].endswith(locked_digest())       # the image it was checked against
    desc = json.loads(lake.read_text(f"derivatives/anat-{ANAT}/dataset_description.json"))
    assert desc["GeneratedBy"][0]["Name"] == "anat" and "Container" not in desc["GeneratedBy"][0]


def test_the_official_validator_finds_no_error_in_the_raw_and_derivative_datasets(processed):
    lake, _ = processed
    root = f"derivatives/anat-{ANAT}"
    assert lake.read_text(f"{root}/.bidsignore").split() == sorted(
        {*get_spec("anat").bids_ignore, "*_provenance.json"})
    for dataset in ("bids", root, DEFACE_ROOT):
        errors, _ = bids_validator(lake.path(dataset))
        assert errors == [], (dataset, describe(errors))


def test_each_t1_has_a_defaced_copy_that_left_the_pipelines_brain_mask_whole(processed):
    lake, _ = processed
    images = [p for p in lake.find("bids") if p.endswith("_T1w.nii.gz")]
    assert len(images) == len(T1_SITES)
    for image in images:
        defaced, sidecar, mask = deface_paths(image)
        check = json.loads(lake.read_text(sidecar))["Defacing"]
        assert lake.exists(defaced) and check["FacePresent"] and check["ResidualFaceShare"] < 0.02
        brain = nib.load(lake.path(check["BrainMask"]))
        assert check["BrainMask"].startswith(f"derivatives/anat-{ANAT}/") and check["BrainVoxelsChanged"] == 0
        face = nib.load(lake.path(mask))
        brain = resample_from_to(brain, face, order=0)  # anat's masks are on the RAS-reoriented grid
        assert not ((np.asanyarray(face.dataobj) > 0) & (np.asanyarray(brain.dataobj) > 0)).any()


def test_duckdb_and_the_wide_export(processed, tmp_path):
    lake, _ = processed
    glob = lake.path("tables/biomarkers") + "/*/*.parquet"
    rows = duckdb.sql(f"SELECT site, measure, value FROM read_parquet('{glob}', hive_partitioning=true) "
                      "WHERE measure = 'TIV' ORDER BY site").fetchall()
    assert [r[0] for r in rows] == ["philips-ingenia", "siemens-xa30"]
    out = tmp_path / "wide.csv"
    assert export_biomarkers(lake, out, "csv", as_wide=True) == 2
    wide = pd.read_csv(out)
    assert {"anat_TIV", "anat_GM_fraction", "qc_status", "subject", "session"} <= set(wide.columns)


def test_qc_table_holds_every_metric_and_the_verdict(processed):
    lake, _ = processed
    qc = read_table(lake, "qc")
    per_series = qc.groupby("series_uid").metric.apply(set)
    for metrics in per_series:
        assert {"verdict", "snr_wm", "cnr", "cjv", "efc", "coverage", "fov_cut", "tiv_cm3"} <= metrics
    assert set(qc[qc.metric == "verdict"].status) == {"PASS"}


def test_rerun_changes_nothing(processed, trial):
    lake, results = processed
    before = {p: Path(lake.path(p)).read_bytes() for p in lake.find("tables")}
    o, _ = results["siemens-xa30"]
    assert process_study(o.study.study_key, "siemens-xa30", lake_url=lake.url, trial=trial) == []
    assert {p: Path(lake.path(p)).read_bytes() for p in lake.find("tables")} == before


def test_override_moves_biomarkers_both_ways(scratch):
    lake, results = scratch
    _, (sp,) = results["siemens-xa30"]
    n = len(read_table(lake, "biomarkers"))
    ev = override(lake, sp.run.series_uid[:30], "fail", "motion seen on review", "Dr Reviewer")
    assert ev["biomarkers_withdrawn"] == 5 and len(read_table(lake, "biomarkers")) == n - 5
    qc = read_table(lake, "qc")
    mine = qc[qc.series_uid == sp.run.series_uid]
    assert set(mine.verdict) == {"FAIL"} and set(mine.automatic_verdict) == {"PASS"}
    assert set(mine.override_by) == {"Dr Reviewer"} and set(mine.override_reason) == {"motion seen on review"}
    ev = override(lake, sp.run.series_uid, "pass", "second look: fine", "Dr Other")
    assert ev["biomarkers_added"] == 5 and len(read_table(lake, "biomarkers")) == n
    with pytest.raises(OverrideError, match="no processed series"):
        override(lake, "9.9.9", "pass", "x", "y")
    with pytest.raises(OverrideError, match="pass or fail"):
        override(lake, sp.run.series_uid, "maybe", "x", "y")


def _failed_as_not_a_head(lake: Lake, series_uid: str) -> str:
    """The real series' qc rows as the gate writes them for an object that is not a head (its
    template correlation below the limit), and its biomarkers withdrawn as a FAIL has none."""
    qc = read_table(lake, "qc")
    mine = qc[qc.series_uid == series_uid]
    site = mine.site.iloc[0]
    settings = QCSettings()
    (reason,) = judge({"template_correlation": 0.04}, settings.rules_for(site), {}, settings.robust_z).reasons
    rows = []
    for r in mine.drop(columns=["site"]).to_dict("records"):
        r |= {"verdict": "FAIL", "automatic_verdict": "FAIL"}
        if r["metric"] == "template_correlation":
            r |= {"value": 0.04, "status": "FAIL", "reason": reason, "reason_code": "not_a_head"}
        elif r["metric"] == "verdict":
            r |= {"status": "FAIL", "reason": reason, "reason_code": "not_a_head"}
        rows.append({k: (None if v is pd.NaT or (isinstance(v, float) and np.isnan(v)) else v) for k, v in r.items()})
    write_rows(lake, "qc", site, rows)
    delete_rows(lake, "biomarkers", site, {"series_uid": series_uid})
    return reason


def test_passing_a_series_failed_as_not_a_head_needs_the_reviewer_to_confirm_it(scratch):
    """Class 12: an override of the head check says so (the fruit became biomarkers by one override)."""
    from typer.testing import CliRunner

    from flows.cli import app

    lake, results = scratch
    _, (sp,) = results["siemens-xa30"]
    uid = sp.run.series_uid
    reason = _failed_as_not_a_head(lake, uid)
    before = {p: lake.read_bytes(p) for p in lake.find("tables")}
    with pytest.raises(OverrideError, match="failed the head check: .*--confirm-head"):
        override(lake, uid, "pass", "looks fine", "Dr Reviewer")
    res = CliRunner().invoke(app, ["qc", "override", uid, "--verdict", "pass", "--reason", "looks fine",
                                   "--lake", lake.url])
    assert res.exit_code == 2 and "--confirm-head" in res.output and "Traceback" not in res.output
    assert {p: lake.read_bytes(p) for p in lake.find("tables")} == before       # nothing was changed
    # Failing it again needs no confirmation.
    assert override(lake, uid, "fail", "agree: not a head", "Dr Reviewer")["overrides_not_a_head"] == []
    res = CliRunner().invoke(app, ["qc", "override", uid, "--verdict", "pass", "--reason", "a head, on review",
                                   "--confirm-head", "--lake", lake.url])
    assert res.exit_code == 0, res.output
    assert "biomarkers added 5" in res.output and "this overrides the head check (not_a_head)" in res.output
    qc = read_table(lake, "qc")
    assert set(qc[qc.series_uid == uid].override_reason) == {f"a head, on review [overrides not_a_head: {reason}]"}
    last = read_events(lake)[-1]
    assert last["action"] == "qc_override" and last["details"]["overrides_not_a_head"] == [reason]
    assert last["details"]["confirm_head"] is True


def test_override_from_the_cli_and_for_a_pipeline_not_registered_here(scratch, monkeypatch):
    from typer.testing import CliRunner

    import pipelines.registry as reg
    from flows.cli import app

    lake, results = scratch
    _, (sp,) = results["siemens-xa30"]
    uid = sp.run.series_uid
    res = CliRunner().invoke(app, ["qc", "override", uid, "--verdict", "fail", "--reason", "artefact",
                                   "--lake", lake.url])
    me = authenticated_user()   # the OS account running the command is the reviewer, never free text
    assert res.exit_code == 0 and f"PASS -> FAIL by {me}; biomarkers added 0, withdrawn 5" in res.output
    assert set(read_table(lake, "qc").query("series_uid == @uid").override_by) == {me}
    assert read_events(lake)[-1]["actor"] == me
    assert CliRunner().invoke(app, ["qc", "override", uid, "--verdict", "fail", "--reason", "x", "--by", "Dr R",
                                    "--lake", lake.url]).exit_code == 2          # no free-text reviewer
    before = {p: lake.read_bytes(p) for p in lake.find("tables")}
    monkeypatch.setattr(reg, "BUILTIN", {})       # a process where anat is not registered
    res = CliRunner().invoke(app, ["qc", "override", uid, "--verdict", "pass", "--reason", "fine",
                                   "--lake", lake.url])
    assert res.exit_code == 2 and "pipeline 'anat' is not registered here" in res.output
    assert {p: lake.read_bytes(p) for p in lake.find("tables")} == before     # nothing was changed


def test_a_new_pipeline_version_adds_rows_and_keeps_the_old(scratch, trial, monkeypatch):
    lake, results = scratch
    o, _ = results["siemens-xa30"]
    from dataclasses import replace

    import pipelines.registry as reg

    newer = replace(reg.anat_spec(), version="0.2.0")
    monkeypatch.setitem(reg.BUILTIN, "anat", lambda: newer)
    _, (old,) = results["siemens-xa30"]
    state = process_study(o.study.study_key, "siemens-xa30", lake_url=lake.url, trial=trial, return_state=True)
    # no image was built for 0.2.0: the runner refuses; that is a failed run (no verdict), not a FAIL
    assert state.is_failed() and "stale_lock" not in read_table(lake, "qc").reason_code.dropna().tolist()
    assert "anat 0.2.0 not run" in state.message and "rebuild" in state.message
    qc = read_table(lake, "qc")
    assert set(qc[qc.series_uid == old.run.series_uid].pipeline_version) == {ANAT}   # the old rows stay
    bio = read_table(lake, "biomarkers")
    assert set(bio[bio.series_uid == old.run.series_uid].pipeline_version) == {ANAT}


# -- bad and degraded inputs: the gate, without Prefect ----------------------------------------
def _stage(lake: Lake, study, data: np.ndarray, affine: np.ndarray, name: str) -> str:
    rel = f"bids/sub-{study.subject}/ses-{study.session}/anat/sub-{study.subject}_ses-{study.session}_{name}_T1w.nii.gz"
    path = Path(lake.path(rel))
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return rel


@pytest.fixture(scope="module")
def xa30(processed):
    """The XA30 study, and its reference T1 (dcm2niix's own conversion) to degrade."""
    lake, results = processed
    o, _ = results["siemens-xa30"]
    study = read_study(lake, "siemens-xa30", o.study.study_key)
    ref = nib.as_closest_canonical(nib.load(str(shared_path("dcm_qa_xa30", "Ref", "5_anat-T1w_acq-tfl.nii"))))
    return study, np.asanyarray(ref.dataobj, dtype=np.float32), ref.affine


def _judge(lake, trial, study, rel):
    """Run, measure, gate and record one staged image as if it were a series of the study."""
    uid = "2.25.9" + str(abs(hash(rel)))[:12]
    spec = get_spec("anat")
    run = run_on_image(lake, spec, rel, study.subject, study.session, uid, "local")
    sq = measure_quality(lake, spec, run)
    gate(trial, study.site, sq, {})
    now = datetime.now(timezone.utc)
    write_rows(lake, "qc", study.site, qc_rows(sq, study, None, now))
    bio = biomarker_rows(run, study, "E0", sq.verdict.status, None, now)
    if bio:
        write_rows(lake, "biomarkers", study.site, bio)
    return sq


def _recorded(lake, sp):
    qc = read_table(lake, "qc")
    verdict = qc[(qc.series_uid == sp.run.series_uid) & (qc.metric == "verdict")].iloc[0]
    bio = read_table(lake, "biomarkers")
    return verdict, bio[bio.series_uid == sp.run.series_uid]


def test_top_30_percent_removed_fails_on_coverage(xa30, scratch, trial):
    (lake, _), (study, data, affine) = scratch, xa30
    cut = data[:, :, : int(data.shape[2] * 0.7)]
    sp = _judge(lake, trial, study, _stage(lake, study, cut, affine, "acq-cut"))
    assert sp.verdict.status == "FAIL"
    assert any(r.startswith("fov_cut") for r in sp.verdict.reasons), sp.verdict.reasons
    verdict, bio = _recorded(lake, sp)
    assert verdict.status == "FAIL" and "fov_cut" in verdict.reason and bio.empty


def test_heavy_noise_fails_or_warns_on_snr_cnr(xa30, scratch, trial):
    (lake, _), (study, data, affine) = scratch, xa30
    rng = np.random.default_rng(1)
    sigma = 0.25 * float(np.percentile(data, 99))
    noisy = np.sqrt((data + rng.normal(0, sigma, data.shape)) ** 2 + rng.normal(0, sigma, data.shape) ** 2)
    sp = _judge(lake, trial, study, _stage(lake, study, noisy, affine, "acq-noisy"))
    assert sp.verdict.status in ("FAIL", "WARN")
    flagged = {m.metric for m in sp.verdict.metrics if m.status != "PASS"}
    assert flagged & {"snr_wm", "snr_gm", "cnr"}, sp.verdict.reasons
    verdict, bio = _recorded(lake, sp)
    assert "snr_wm" in verdict.reason or "cnr" in verdict.reason
    assert bio.empty or sp.verdict.status == "WARN"   # a WARN is kept, flagged
    assert set(bio.qc_status) <= {"WARN"}


def test_no_segmentation_output_is_a_named_fail(xa30, scratch, trial):
    (lake, _), (study, _, _) = scratch, xa30
    rel = _stage(lake, study, np.zeros((64, 64, 1)), np.eye(4), "acq-flat")   # a 2D slice: anat refuses it
    sp = _judge(lake, trial, study, rel)
    assert sp.verdict.status == "FAIL"
    assert sp.verdict.reasons[0].startswith(f"outputs could not be computed: anat {ANAT} failed")
    verdict, bio = _recorded(lake, sp)
    assert f"anat {ANAT} failed" in verdict.reason and bio.empty
    assert not [p for p in lake.find("derivatives") if "acq-flat" in p and not p.endswith("_provenance.json")]


def test_nan_metric_is_a_named_fail(processed, trial, tmp_path):
    lake, results = processed
    o, (done,) = results["siemens-xa30"]
    study = read_study(lake, "siemens-xa30", o.study.study_key)
    copy = Lake(str(tmp_path / "copy"))
    for p in lake.find("bids") + lake.find("derivatives"):
        copy.write_bytes(p, lake.read_bytes(p))
    wm = copy.path(next(p for p in copy.find("derivatives")
                        if p.endswith(f"sub-{study.subject}_ses-{study.session}_label-WM_probseg.nii.gz")))
    img = nib.load(wm)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), wm)   # no white matter at all
    run = PipelineRun(done.run.series_uid, done.run.bids_image, done.run.input_sha256, "anat", ANAT)
    run.outputs = lake_outputs(get_spec("anat"), study.subject, study.session, {})
    sq = measure_quality(copy, get_spec("anat"), run)
    gate(trial, study.site, sq, {})
    assert sq.verdict.status == "FAIL"
    assert "snr_wm could not be computed: is NaN" in sq.verdict.reasons
