"""The trial's promoted model: ``corelab harmonize promote``, and the nightly apply that uses it.

The lake holds four ABIDE sites' real measures as trial ``ABIDEH`` (tests/harmonization/
lake_world.py). ``harmonize-nightly-apply`` (deployments/prefect.yaml) runs the flow in mode
``apply`` without a model id: it must apply the promoted model exactly as an explicit model id
would, and do nothing, successfully, when no model is promoted.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli.common import authenticated_user
from flows.cli.harmonize import app
from harmonization import combat, model_store, service
from harmonization import lake as lake_io
from harmonization.abide import load_abide
from harmonization.errors import ModelTrialError
from harmonization.inputs import from_wide_table
from tasks.lake.audit import read_events, verify_chain
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tests.harmonization.lake_world import (
    COVS,
    MEASURES,
    SETTINGS,
    TRIAL,
    biomarker_rows,
    write_biomarkers,
    write_covariates,
)

SITES = ["YALE", "PITT", "KKI", "TRINITY"]
runner = CliRunner()


@pytest.fixture(scope="module")
def abide(abide_data) -> pd.DataFrame:
    df = load_abide(abide_data, text_labels=True)
    return df[df["SITE"].isin(SITES)].reset_index(drop=True)


@pytest.fixture
def world(abide, tmp_path):
    """A lake of trial ABIDEH's baseline biomarkers, its covariate file and its trial file."""
    lake = Lake(str(tmp_path / "lake")).init()
    rows = biomarker_rows(abide, "baseline", pd.Series("e1", index=abide.index),
                          pd.Series("PASS", index=abide.index))
    write_biomarkers(lake, pd.DataFrame(rows))
    write_covariates(abide, tmp_path / "covariates.tsv")
    (tmp_path / "trial.yaml").write_text(TRIAL)
    return tmp_path, lake


def _rows(lake: Lake) -> pd.DataFrame:
    return lake_io.select_rows(read_table(lake, "biomarkers"), "ABIDEH", ["PASS", "WARN"])


def _fit(root, lake: Lake) -> str:
    covariates = lake_io.read_covariates(str(root / "covariates.tsv"))
    _, fitted = service.fit_lake(lake, _rows(lake), covariates, SETTINGS)
    return fitted.model_id


def _stored(root, lake: Lake, trial_id: str, settings=SETTINGS) -> str:
    """A model of ``trial_id`` as fit_lake stores it, without its report (seconds of figures)."""
    covariates = lake_io.read_covariates(str(root / "covariates.tsv"))
    data, _ = lake_io.to_wide(_rows(lake), covariates, settings)
    model = combat.fit(data, settings).model
    model.metadata["trial_id"] = trial_id
    return model_store.save_model(lake, model)


def _cli(*args: str):
    return runner.invoke(app, list(args))


def _snapshot(lake: Lake) -> dict[str, bytes]:
    return {p: lake.read_bytes(p) for p in lake.find()}


def test_promote_show_and_refuse(world, abide):
    root, lake = world
    where = ["--trial", str(root / "trial.yaml"), "--lake", lake.url]
    first = _fit(root, lake)
    assert model_store.load_model(lake, first).metadata["trial_id"] == "ABIDEH"

    shown = _cli("current", *where)
    assert shown.exit_code == 0, shown.output
    assert "no harmonization model is promoted for trial ABIDEH" in shown.output
    assert first in shown.output  # what could be promoted

    me = authenticated_user()                      # the OS account running the command, never free text
    res = _cli("promote", first, *where)
    assert res.exit_code == 0, res.output
    pointer = json.loads(lake.read_text("models/harmonization/current/ABIDEH.json"))
    assert {k: pointer[k] for k in ("model_id", "trial_id", "actor", "previous")} == \
        {"model_id": first, "trial_id": "ABIDEH", "actor": me, "previous": None}
    age = datetime.now(timezone.utc) - datetime.fromisoformat(pointer["promoted_at"])
    assert timedelta(0) <= age < timedelta(minutes=5)
    event = read_events(lake)[-1]
    assert (event["action"], event["actor"]) == ("model_promoted", me)
    assert event["details"]["model_id"] == first and event["details"]["trial_id"] == "ABIDEH"
    assert verify_chain(lake).ok
    for command in (["current"], ["promote", "--show"]):
        res = _cli(*command, *where)
        assert res.exit_code == 0 and first in res.output and f"by {me}" in res.output, res.output

    # the same model again: nothing rewritten, nothing audited
    before = _snapshot(lake)
    res = _cli("promote", first, *where)
    assert res.exit_code == 0 and "already promoted, nothing changed" in res.output
    assert _snapshot(lake) == before

    # refused: an unknown id, a name that is no model id, another trial's model, a table's model
    other = _stored(root, lake, "OTHER")
    table_model = model_store.save_model(lake, combat.fit(from_wide_table(
        abide, "SITE", COVS, features=MEASURES), SETTINGS).model)
    before = _snapshot(lake)
    for model_id, why in [("hm-0000000000000000", "no harmonization model hm-0000000000000000"),
                          ("latest", "'latest' is not a harmonization model id"),
                          (other, f"model {other} belongs to trial OTHER, not to trial ABIDEH"),
                          (table_model, f"model {table_model} records no trial")]:
        res = _cli("promote", model_id, *where)
        assert res.exit_code == 2, res.output
        assert f"not promoted: {why}" in " ".join(res.output.split())
        assert "Traceback" not in res.output and res.exception.__class__ is SystemExit
    assert _snapshot(lake) == before
    assert model_store.current(lake, "ABIDEH").model_id == first

    # a second model of the trial replaces the first; the pointer and the audit say which
    second = _stored(root, lake, "ABIDEH", SETTINGS.model_copy(update={"covariates": ["AGE", "SEX"]}))
    res = _cli("promote", second, *where)
    assert res.exit_code == 0 and f"(replacing {first})" in res.output
    assert model_store.current(lake, "ABIDEH").previous == first
    assert read_events(lake)[-1]["details"]["previous"] == first
    listed = _cli("models", "--lake", lake.url)
    assert f"{other}  OTHER" in listed.output and f"{table_model}  (table)" in listed.output


def test_a_damaged_pointer_is_named_not_a_traceback(world):
    root, lake = world
    lake.write_text("models/harmonization/current/ABIDEH.json", '{"model_id": "hm-1"')
    res = _cli("current", "--trial", str(root / "trial.yaml"), "--lake", lake.url)
    assert res.exit_code == 2 and "current/ABIDEH.json: not a promotion record" in res.output
    assert "Traceback" not in res.output


@pytest.mark.prefect
def test_nightly_apply_uses_the_promoted_model_as_its_id_would(world, prefect_harness, tmp_path):
    from flows.harmonize import harmonize

    root, lake = world
    model_id = _fit(root, lake)
    twin = Lake(str(shutil.copytree(root / "lake", tmp_path / "twin")))
    args = dict(trial_file=str(root / "trial.yaml"), covariates_file=str(root / "covariates.tsv"),
                mode="apply")
    explicit = harmonize(lake_url=lake.url, model_id=model_id, **args)
    model_store.promote(twin, model_id, "ABIDEH", "dr-stat")
    nightly = harmonize(lake_url=twin.url, **args)  # what harmonize-nightly-apply runs
    assert nightly["apply"]["model_id"] == model_id
    assert nightly["apply"]["promoted"]["actor"] == "dr-stat"
    assert nightly["apply"]["harmonized"] == explicit["apply"]["harmonized"] == len(_rows(lake)) // 6
    key = ["site", "subject", "session", "measure"]
    a = read_table(lake, "biomarkers_harmonized").sort_values(key).reset_index(drop=True)
    b = read_table(twin, "biomarkers_harmonized").sort_values(key).reset_index(drop=True)
    assert len(a) == len(_rows(lake))
    pd.testing.assert_frame_equal(a[key + ["value", "value_raw", "batch", "harmonization_model_id"]],
                                  b[key + ["value", "value_raw", "batch", "harmonization_model_id"]])
    assert not np.allclose(a["value"], a["value_raw"])  # something was harmonized
    assert [e["details"]["model_id"] for e in read_events(twin)
            if e["action"] == "harmonization_applied"] == [model_id]
    # an explicit model id of another trial is refused, as promoting it would be
    other = _stored(root, lake, "OTHER")
    with pytest.raises(ModelTrialError, match=f"model {other} belongs to trial OTHER"):
        harmonize(lake_url=lake.url, model_id=other, **args)


@pytest.mark.prefect
def test_nightly_apply_with_no_promoted_model_completes_and_writes_nothing(world, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    from flows.harmonize import ARTIFACT, harmonize

    root, lake = world
    model_id = _fit(root, lake)  # stored, never promoted
    before = _snapshot(lake)
    state = harmonize(lake_url=lake.url, trial_file=str(root / "trial.yaml"),
                      covariates_file=str(root / "covariates.tsv"), mode="apply",
                      return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["apply"]["harmonized"] == 0 and summary["apply"]["model_id"] is None
    note = summary["apply"]["skipped"]
    assert "no harmonization model is promoted for trial ABIDEH" in note and model_id in note
    assert _snapshot(lake) == before
    assert not lake.exists("tables/biomarkers_harmonized")
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert len(artifacts) == 1 and "no harmonization model is promoted" in artifacts[0].data


@pytest.mark.prefect
def test_covariates_matching_no_subject_reach_the_cli_user_as_one_refusal(world, prefect_harness,
                                                                         monkeypatch, capfd):
    from flows.cli import main

    root, lake = world
    cov = pd.read_csv(root / "covariates.tsv", sep="\t")
    cov.assign(subject="sub-" + cov["subject"]).to_csv(root / "wrong_ids.tsv", sep="\t", index=False)
    monkeypatch.setattr(sys, "argv", ["corelab", "harmonize", "fit", "--lake", lake.url, "--trial",
                                      str(root / "trial.yaml"), "--covariates-table",
                                      str(root / "wrong_ids.tsv")])
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capfd.readouterr()
    text = " ".join((out + err).split())
    assert exit_.value.code == 2
    assert "error: harmonization refused:" in text
    assert "no biomarker row matched a covariates row" in text and "wrong_ids.tsv" in text
    assert re.search(r"subject of the biomarkers: (\w+)", text).group(1) in set(cov["subject"])
    assert re.search(r"wrong_ids\.tsv: (sub-\w+)", text).group(1) in set("sub-" + cov["subject"])
    assert "Traceback" not in out + err and "IndexError" not in out + err
    assert model_store.list_models(lake) == []
