"""Lake mode: QC-passed ``biomarkers`` rows in, ``biomarkers_harmonized`` rows out.

The lake is filled with ABIDE's real measures as the pipelines would write
them (one long row per subject, session, measure), plus a 12-month visit for
some subjects, one site whose scanner changed before that visit, WARN rows and
subjects without covariates.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from data_contracts.harmonization_settings import HarmonizationSettings
from flows.cli.harmonize import app
from harmonization import combat, model_store, service
from harmonization import lake as lake_io
from harmonization.abide import load_abide
from harmonization.inputs import from_wide_table
from tasks.lake.audit import read_events, verify_chain
from tasks.lake.storage import Lake
from tasks.lake.tables import partition_path, read_table, write_rows

COVS = ["AGE", "SEX", "DX"]
MEASURES = ["Left-Hippocampus", "Right-Hippocampus", "CSF", "Brain-Stem",
            "lh_MeanThickness_thickness", "rh_MeanThickness_thickness"]
SETTINGS = HarmonizationSettings(covariates=COVS)  # batch = site_epoch
CREATED = datetime(2026, 1, 1, tzinfo=timezone.utc)
TRIAL = """
trial_id: ABIDEH
sites:
  - id: abide
    name: ABIDE I sites
    scanners: [{manufacturer: various, model: various}]
protocol:
  series_types:
    - {name: T1w, datatype: anat, suffix: T1w, match: {description: ["*t1*"]}}
visits:
  - {id: baseline, day: 0}
  - {id: m12, day: 365, window_before: 30, window_after: 30}
subjects: {mode: pseudonym}
harmonization: {batch: site_epoch, covariates: [AGE, SEX, DX]}
"""


def _rows(wide: pd.DataFrame, session: str, epoch: pd.Series, qc: pd.Series) -> list[dict]:
    out = []
    for i, r in wide.iterrows():
        subject = r["FILE_ID"].replace("_", "")
        for m in MEASURES:
            out.append({
                "site": r["SITE"], "trial_id": "ABIDEH", "subject": subject, "session": session,
                "acquisition_date": None, "scanner_epoch": epoch[i], "series_uid": f"2.25.{i}.{session}",
                "measure": m, "value": float(r[m]), "unit": "mm" if "thickness" in m else "mm3",
                "qc_status": qc[i], "pipeline_name": "freesurfer", "pipeline_version": "6.0.0",
                "container_digest": "sha256:" + "0" * 64,
                "input_sha256": hashlib.sha256(f"{subject}{session}".encode()).hexdigest(),
                "flow_run_id": "test", "created_at": CREATED})
    return out


@pytest.fixture(scope="module")
def source(abide_data):
    """Baseline rows of all 1035 ABIDE subjects and 12-month rows of 300 of them."""
    abide = load_abide(abide_data, text_labels=True)
    rng = np.random.default_rng(0)
    qc = pd.Series(np.where(rng.random(len(abide)) < 0.05, "WARN", "PASS"), index=abide.index)
    rows = _rows(abide, "baseline", pd.Series("e1", index=abide.index), qc)
    follow = abide.sample(300, random_state=1)
    # NYU's scanner changed before the 12-month visit: a new batch the model has not seen.
    epoch = pd.Series(np.where(follow["SITE"] == "NYU", "e2", "e1"), index=follow.index)
    rows += _rows(follow, "m12", epoch, pd.Series("PASS", index=follow.index))
    return pd.DataFrame(rows), abide, follow


@pytest.fixture
def world(source, tmp_path):
    """A fresh lake holding the source rows, a covariate file and a trial file."""
    frame, abide, follow = source
    lake = Lake(str(tmp_path / "lake")).init()
    for site, part in frame.groupby("site"):
        write_rows(lake, "biomarkers", site, part.drop(columns="site").to_dict("records"))
    covariates = abide.assign(subject=abide["FILE_ID"].str.replace("_", ""))[["subject", *COVS]]
    covariates = covariates.iloc[5:]  # five subjects whose covariates were never exported
    covariates.to_csv(tmp_path / "covariates.tsv", sep="\t", index=False)
    (tmp_path / "trial.yaml").write_text(TRIAL)
    return tmp_path, lake, abide, follow


def test_fit_on_reference_set_then_apply_to_every_qc_passed_scan(world):
    root, lake, abide, follow = world
    biomarkers = read_table(lake, "biomarkers")
    covariates = lake_io.read_covariates(str(root / "covariates.tsv"))
    rows = lake_io.select_rows(biomarkers, "ABIDEH", ["PASS", "WARN"])
    reference = lake_io.select_rows(rows, None, ["PASS"], ["baseline"])
    model, fitted = service.fit_lake(lake, reference, covariates, SETTINGS)
    n_ref = int(((biomarkers["session"] == "baseline") & (biomarkers["qc_status"] == "PASS")
                 & (biomarkers["measure"] == MEASURES[0])).sum())
    no_cov = set(abide["FILE_ID"].str.replace("_", "")[:5])
    assert fitted.rows == n_ref - len(no_cov & set(reference["subject"]))
    assert set(model.batches) == {f"{s}:e1" for s in abide["SITE"].unique()}
    assert any("have no covariates" in f.message for f in fitted.findings)
    assert lake.exists(fitted.outputs["report"]) and lake.exists(fitted.outputs["report_json"])

    applied = service.apply_lake(lake, model, fitted.model_id, rows, covariates, SETTINGS)
    nyu_m12 = int((follow["SITE"] == "NYU").sum())
    assert applied.harmonized == applied.rows - nyu_m12
    assert any("site 'NYU:e2' is not in model" in f.message for f in applied.findings)

    out = read_table(lake, "biomarkers_harmonized")
    assert len(out) == applied.harmonized * len(MEASURES)
    assert (out["harmonization_model_id"] == fitted.model_id).all()
    assert not ((out["session"] == "m12") & (out["site"] == "NYU")).any()
    joined = out.merge(biomarkers, on=["subject", "session", "measure"], suffixes=("", "_orig"))
    np.testing.assert_array_equal(joined["value_raw"], joined["value_orig"])
    assert (joined["created_at"] == joined["created_at_orig"]).all()  # provenance kept
    assert (joined["batch"] == joined["site"] + ":" + joined["scanner_epoch"]).all()

    # the same numbers a statistician gets from the wide table of the reference scans
    ref_subjects = set(reference["subject"]) - no_cov
    wide = abide[abide["FILE_ID"].str.replace("_", "").isin(ref_subjects)]
    table = combat.fit(from_wide_table(wide, "SITE", COVS, features=MEASURES), SETTINGS)
    base = out[out["session"] == "baseline"].pivot(index="subject", columns="measure", values="value")
    expected = table.harmonized.set_axis(wide["FILE_ID"].str.replace("_", ""), axis=0)
    np.testing.assert_allclose(base.loc[expected.index, MEASURES], expected, rtol=0, atol=1e-6)

    # nightly: nothing new but the scans waiting for a refit; nothing rewritten
    stamp = (root / "lake" / partition_path("biomarkers_harmonized", "CALTECH")).stat().st_mtime_ns
    again = service.apply_lake(lake, model_store.load_model(lake, fitted.model_id),
                               fitted.model_id, rows, covariates, SETTINGS)
    assert (again.rows, again.harmonized) == (nyu_m12, 0)
    assert (root / "lake" / partition_path("biomarkers_harmonized", "CALTECH")).stat().st_mtime_ns == stamp
    actions = [e["action"] for e in read_events(lake)]
    assert actions[-3:] == ["harmonization_model_fitted"] + ["harmonization_applied"] * 2
    assert verify_chain(lake).ok


def test_bids_participants_tsv_is_a_covariate_table(world):
    root, _, abide, _ = world
    cov = pd.read_csv(root / "covariates.tsv", sep="\t")
    bids = cov.assign(participant_id="sub-" + cov["subject"]).drop(columns="subject")
    bids.to_csv(root / "participants.tsv", sep="\t", index=False)
    read = lake_io.read_covariates(str(root / "participants.tsv"))
    assert read["subject"].tolist() == cov["subject"].tolist()
    assert read["subject"].iloc[0] == abide["FILE_ID"].iloc[5].replace("_", "")


@pytest.mark.prefect
def test_harmonize_flow_fit_then_nightly_apply(world, prefect_harness):
    from flows.harmonize import harmonize

    root, lake, _, follow = world
    fit = harmonize(lake_url=lake.url, trial_file=str(root / "trial.yaml"),
                    covariates_file=str(root / "covariates.tsv"), mode="fit")
    model_id = fit["fit"]["model_id"]
    assert model_id in model_store.list_models(lake)[-1]["model_id"]
    nightly = harmonize(lake_url=lake.url, trial_file=str(root / "trial.yaml"),
                        covariates_file=str(root / "covariates.tsv"), mode="apply",
                        model_id=model_id)
    # only the scans waiting for a refit are left; they are reported again, not failed on
    assert nightly["apply"]["harmonized"] == 0
    assert nightly["apply"]["rows"] == int((follow["SITE"] == "NYU").sum())
    redo = harmonize(lake_url=lake.url, trial_file=str(root / "trial.yaml"),
                     covariates_file=str(root / "covariates.tsv"), mode="apply",
                     model_id=model_id, only_new=False)
    assert redo["apply"]["harmonized"] == fit["apply"]["harmonized"]
    assert any("NYU:e2" in w for w in redo["apply"]["warnings"])
    # the same from the command line (lake mode runs the flow)
    res = CliRunner().invoke(app, ["apply", model_id, "--lake", lake.url, "--trial",
                                   str(root / "trial.yaml"), "--covariates-table",
                                   str(root / "covariates.tsv"), "--all"])
    assert res.exit_code == 0, res.output
    assert f"model `{model_id}`, {fit['apply']['harmonized']} of" in res.output
    bad = CliRunner().invoke(app, ["apply", "hm-0000000000000000", "--lake", lake.url, "--trial",
                                   str(root / "trial.yaml"), "--covariates-table",
                                   str(root / "covariates.tsv")])
    assert bad.exit_code == 2 and "no harmonization model hm-0000000000000000" in bad.output
