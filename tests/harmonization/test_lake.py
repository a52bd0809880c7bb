"""Lake mode: QC-passed ``biomarkers`` rows in, ``biomarkers_harmonized`` rows out.

The lake is filled with ABIDE's real measures as the pipelines would write
them (one long row per subject, session, measure), plus a 12-month visit for
some subjects, one site whose scanner changed before that visit, WARN rows and
subjects without covariates.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli.harmonize import app
from harmonization import combat, model_store, service
from harmonization import lake as lake_io
from harmonization.abide import load_abide
from harmonization.errors import NoRowsToHarmonize
from harmonization.inputs import from_wide_table
from tasks.lake.audit import read_events, verify_chain
from tasks.lake.storage import Lake
from tasks.lake.tables import partition_path, read_table
from tests.harmonization.lake_world import (
    COVS,
    MEASURES,
    SETTINGS,
    TRIAL,
    biomarker_rows,
    write_biomarkers,
)


@pytest.fixture(scope="module")
def source(abide_data):
    """Baseline rows of all 1035 ABIDE subjects and 12-month rows of 300 of them."""
    abide = load_abide(abide_data, text_labels=True)
    rng = np.random.default_rng(0)
    qc = pd.Series(np.where(rng.random(len(abide)) < 0.05, "WARN", "PASS"), index=abide.index)
    rows = biomarker_rows(abide, "baseline", pd.Series("e1", index=abide.index), qc)
    follow = abide.sample(300, random_state=1)
    # NYU's scanner changed before the 12-month visit: a new batch the model has not seen.
    epoch = pd.Series(np.where(follow["SITE"] == "NYU", "e2", "e1"), index=follow.index)
    rows += biomarker_rows(follow, "m12", epoch, pd.Series("PASS", index=follow.index))
    return pd.DataFrame(rows), abide, follow


@pytest.fixture
def world(source, tmp_path):
    """A fresh lake holding the source rows, a covariate file and a trial file."""
    frame, abide, follow = source
    lake = Lake(str(tmp_path / "lake")).init()
    write_biomarkers(lake, frame)
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


def test_covariates_that_match_no_subject_are_a_named_refusal_for_fit_and_apply(world):
    root, lake, _, _ = world
    rows = lake_io.select_rows(read_table(lake, "biomarkers"), "ABIDEH", ["PASS", "WARN"])
    baseline = lake_io.select_rows(read_table(lake, "biomarkers"), "ABIDEH", ["PASS", "WARN"], ["baseline"])
    data, _ = lake_io.to_wide(baseline, lake_io.read_covariates(str(root / "covariates.tsv")), SETTINGS)
    model = combat.fit(data, SETTINGS).model      # one scan per subject, as the flow fits (reference visits)
    # another study's export of the same people, under its own subject ids
    cov = pd.read_csv(root / "covariates.tsv", sep="\t")
    other = root / "other_study.tsv"
    cov.assign(subject="ABIDE-" + cov["subject"]).to_csv(other, sep="\t", index=False)
    covariates = lake_io.read_covariates(str(other))
    before = {p: lake.read_bytes(p) for p in lake.find()}
    for run in (lambda: service.fit_lake(lake, rows, covariates, SETTINGS),
                lambda: service.apply_lake(lake, model, model.model_id, rows, covariates, SETTINGS,
                                           only_new=False)):
        with pytest.raises(NoRowsToHarmonize) as info:
            run()
        msg = str(info.value)
        assert [f.code for f in info.value.findings] == ["no_covariate_match"]
        assert "no biomarker row matched a covariates row" in msg and str(other) in msg
        lake_side, file_side = msg.split("subject of the biomarkers: ")[1].split(f"; of {other}: ")
        shown = [s for s in lake_side.split(" ... ")[0].split(", ")]
        assert len(shown) == 5 and set(shown) <= set(rows["subject"])
        assert f"({rows['subject'].nunique()} in all)" in lake_side
        listed = file_side.split(" ... ")[0].split(", ")
        assert len(listed) == 5 and set(listed) <= set("ABIDE-" + cov["subject"])
        assert f"({len(cov)} in all)" in file_side
    assert {p: lake.read_bytes(p) for p in lake.find()} == before  # nothing written, nothing audited
    # subjects that match, but not one with a value: no rows left, and why
    cov.assign(AGE=np.nan).to_csv(root / "no_age.tsv", sep="\t", index=False)
    with pytest.raises(NoRowsToHarmonize, match=rf"no rows to fit: {len(set(rows['subject']))} "
                                                r"scan\(s\) have no covariates and are left out"):
        service.fit_lake(lake, lake_io.select_rows(rows, None, ["PASS", "WARN"], ["baseline"]),
                         lake_io.read_covariates(str(root / "no_age.tsv")), SETTINGS)
    # a session column read as numbers is compared as text, not a crash of the join
    cov.assign(session=1).to_csv(root / "by_session.csv", index=False)
    with pytest.raises(NoRowsToHarmonize, match=r"has its subject/session in .*by_session\.csv"):
        lake_io.to_wide(rows, lake_io.read_covariates(str(root / "by_session.csv")), SETTINGS)


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


def test_missing_measures_are_harmonized_around_or_counted_by_site_and_measure(world):
    """By default a scan without one measure keeps the others (available-case ComBat): its CSF stays
    missing and every other measure is harmonized. Asked for complete scans, it is left out, and
    how many, where and which are said."""
    root, lake, _, _ = world
    rows = lake_io.select_rows(read_table(lake, "biomarkers"), "ABIDEH", ["PASS", "WARN"], ["baseline"])
    nyu = rows.index[(rows["site"] == "NYU") & (rows["measure"] == "CSF")][:40]
    lost = rows.drop(index=nyu)
    covariates = lake_io.read_covariates(str(root / "covariates.tsv"))
    data, findings = lake_io.to_wide(lost, covariates, SETTINGS)
    assert not [f for f in findings if f.code == "missingness"]
    assert data.n == lake_io.to_wide(rows, covariates, SETTINGS)[0].n   # the 40 scans are kept
    fit = combat.fit(data, SETTINGS)
    assert int(fit.harmonized["CSF"].isna().sum()) == 40 and fit.harmonized.drop(columns="CSF").notna().all().all()
    written = lake_io.harmonized_rows(lost, fit.harmonized, fit.batch, "hm-test")
    records = [r for site in written.values() for r in site]   # no row for a measure that was not measured
    assert len(records) == int(fit.harmonized.notna().sum().sum()) and all(r["value"] is not None for r in records)
    complete = SETTINGS.model_copy(update={"missing": "complete_scans"})
    _, findings = lake_io.to_wide(lost, covariates, complete)
    (miss,) = [f for f in findings if f.code == "missingness"]
    n_nyu = int(((rows["site"] == "NYU") & (rows["measure"] == "CSF")).sum())
    (nyu_batch,) = [b for b in miss.where["by_batch"] if b.startswith("NYU")]       # batch = site:epoch
    assert miss.where["by_measure"] == {"CSF": 40} and miss.where["by_batch"][nyu_batch] == [40, n_nyu]
    assert f"{nyu_batch} 40 of {n_nyu}" in miss.message and "CSF (40)" in miss.message


@pytest.mark.prefect
def test_the_nightly_extends_a_new_scanner_epoch_and_changes_nothing_harmonized(world, prefect_harness):
    """NYU's scanner changed before the 12-month visit: the nightly estimates NYU:e2 against the promoted
    model, promotes the child, harmonizes those scans, and every row harmonized before stays as it was."""
    from flows.harmonize import harmonize

    root, lake, _, follow = world
    covariates = lake_io.read_covariates(str(root / "covariates.tsv"))
    baseline = lake_io.select_rows(read_table(lake, "biomarkers"), "ABIDEH", ["PASS"], ["baseline"])
    model, fitted = service.fit_lake(lake, baseline, covariates, SETTINGS)
    model_store.promote(lake, fitted.model_id, "ABIDEH", "dr-stat")
    args = dict(lake_url=lake.url, trial_file=str(root / "trial.yaml"), covariates_file=str(root / "covariates.tsv"),
                mode="apply")
    first = harmonize(**args)
    before = read_table(lake, "biomarkers_harmonized")
    assert first["extend"]["harmonized"] >= 20
    child = model_store.current(lake, "ABIDEH")
    assert child.model_id != fitted.model_id and child.previous == fitted.model_id
    stored = model_store.load_model(lake, child.model_id)
    assert stored.metadata["parent"] == fitted.model_id and list(stored.metadata["extended_batches"]) == ["NYU:e2"]
    nyu_m12 = int((follow["SITE"] == "NYU").sum())
    assert first["apply"]["harmonized"] == first["apply"]["rows"]           # NYU's 12-month scans included
    assert ((before["session"] == "m12") & (before["site"] == "NYU")).sum() == nyu_m12 * len(MEASURES)
    # a later night with nothing new: no extension, nothing rewritten
    second = harmonize(**args)
    assert "extend" not in second and second["apply"]["harmonized"] == 0
    after = read_table(lake, "biomarkers_harmonized")
    key = ["site", "subject", "session", "measure"]
    pd.testing.assert_frame_equal(before.sort_values(key).reset_index(drop=True)[key + ["value"]],
                                  after.sort_values(key).reset_index(drop=True)[key + ["value"]])
