"""``corelab harmonize`` in table mode, on the ABIDE table a statistician would hand us."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli.harmonize import app
from harmonization import diagnostics
from harmonization.abide import constant_columns, load_abide
from harmonization.inputs import CovariateEncoding, infer_encoding
from harmonization.report import render_html

runner = CliRunner()
COVS = ["AGE", "SEX", "DX"]


@pytest.fixture(scope="module")
def tables(abide_data, tmp_path_factory):
    """ABIDE with text SEX/DX as CSV, split 70/30 per site (train CSV, test Parquet)."""
    root = tmp_path_factory.mktemp("cli")
    df = load_abide(abide_data, text_labels=True)
    df.to_csv(root / "abide.csv", index=False)
    train = df.groupby("SITE", group_keys=False).sample(frac=0.7, random_state=0)
    train.to_csv(root / "train.csv", index=False)
    df.drop(train.index).to_parquet(root / "test.parquet", index=False)
    return root, df


def _exclude(df: pd.DataFrame) -> str:
    return ",".join(["FILE_ID", *constant_columns(df)])


def _model_id(output: str) -> str:
    return re.search(r"model (hm-[0-9a-f]{16})", output).group(1)


def test_fit_writes_table_model_and_self_contained_report(tables):
    root, df = tables
    res = runner.invoke(app, ["fit", "--table", str(root / "abide.csv"), "--batch", "SITE",
                              "--covariates", "AGE,SEX,DX", "--exclude", _exclude(df),
                              "--out", str(root / "out.csv"), "--report", str(root / "fit.html"),
                              "--lake", str(root / "lake")])
    assert res.exit_code == 0, res.output
    model_id = _model_id(res.output)
    assert (root / "lake" / "models" / "harmonization" / model_id / "model.json").exists()
    out = pd.read_csv(root / "out.csv")
    assert list(out.columns) == list(df.columns)
    features = [c for c in df.columns[5:] if c not in constant_columns(df)]
    untouched = [c for c in df.columns if c not in features]
    pd.testing.assert_frame_equal(out[untouched], df[untouched])  # other columns and row order kept
    assert not np.allclose(out[features], df[features])
    enc, _ = infer_encoding(df, COVS).encode(df)
    share = diagnostics.site_effect(out[features], enc, df["SITE"])["significant_F"].mean()
    assert share <= 0.05

    html = (root / "fit.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//|/)""", html)  # nothing fetched from elsewhere
    assert html.count("data:image/png;base64,") == 7  # + the priors
    report = json.loads((root / "fit.json").read_text())
    assert sum(r["n"] for r in report["sites"]["rows"]) == 1035
    assert {r["batch"] for r in report["sites"]["rows"]} == set(df["SITE"])
    assert set(report["sites"]["rows"][0]) >= {"AGE", "SEX", "DX", "AGE:box"}
    se = report["diagnostics"]["site_effect"]
    assert se["before"]["share_F"] >= 0.9 and se["after"]["share_F"] <= 0.05
    assert len(se["per_feature"]) == len(features)
    terms = {t["term"] for t in report["diagnostics"]["biology"]["survival"]}
    assert terms == {"AGE", "SEX=M", "DX=TD"}
    assert len(report["diagnostics"]["boxplots"]) == 4
    assert np.array(report["location_scale"]["gamma_star"]).shape == (20, len(features))
    assert report["diagnostics"]["pca"]["after"]["batch_r2"][0] < \
        report["diagnostics"]["pca"]["before"]["batch_r2"][0]
    assert any(f["code"] == "associated_covariate" for f in report["findings"])
    assert "neuroHarmonize" in report["methods"] and report["model"]["model_id"] == model_id
    redrawn = render_html(report)  # a report is rebuilt from its JSON, without the data
    assert redrawn.count("data:image/png;base64,") == 7 and model_id in redrawn


def test_refused_fit_exits_2_names_the_columns_and_reports_why(tables):
    root, _ = tables
    res = runner.invoke(app, ["fit", "--table", str(root / "abide.csv"), "--batch", "SITE",
                              "--covariates", "AGE,SEX,DX", "--exclude", "FILE_ID",
                              "--out", str(root / "never.csv"), "--report", str(root / "no.html"),
                              "--lake", str(root / "lake")])
    assert res.exit_code == 2
    assert "feature 'Left-WM-hypointensities' is constant" in res.output
    assert not (root / "never.csv").exists()
    report = json.loads((root / "no.json").read_text())
    assert report["kind"] == "refused" and report["diagnostics"] is None
    assert sum(f["level"] == "refusal" for f in report["findings"]) == 4
    res = runner.invoke(app, ["fit", "--table", str(root / "abide.csv"), "--batch", "SITE",
                              "--covariates", "AGE,BMI", "--out", str(root / "never.csv"),
                              "--lake", str(root / "lake")])
    assert res.exit_code == 2 and "['BMI'] not found" in res.output


def test_apply_frozen_model_to_held_out_parquet_with_an_unseen_site(tables):
    root, df = tables
    res = runner.invoke(app, ["fit", "--table", str(root / "train.csv"), "--batch", "SITE",
                              "--covariates", "AGE,SEX,DX", "--exclude", _exclude(df),
                              "--min-site-n", "15", "--out", str(root / "train_h.csv"),
                              "--lake", str(root / "lake")])
    assert res.exit_code == 0, res.output
    model_id = _model_id(res.output)
    test = pd.read_parquet(root / "test.parquet")
    test.loc[test.index[:5], "SITE"] = "NEWSITE"
    test.to_parquet(root / "test2.parquet", index=False)
    res = runner.invoke(app, ["apply", model_id, "--table", str(root / "test2.parquet"),
                              "--out", str(root / "test_h.parquet"), "--report",
                              str(root / "apply.html"), "--lake", str(root / "lake")])
    assert res.exit_code == 0, res.output
    assert "site 'NEWSITE' is not in model" in res.output and "needs a refit" in res.output
    out = pd.read_parquet(root / "test_h.parquet")
    assert list(out.columns) == list(test.columns) + ["harmonization_status"]
    assert (out["harmonization_status"] == "harmonized").sum() == len(test) - 5
    assert out.loc[:4, "harmonization_status"].str.contains("NEWSITE").all()
    assert out.loc[:4, "CSF"].isna().all() and out.loc[5:, "CSF"].notna().all()
    report = json.loads((root / "apply.json").read_text())
    assert report["apply"]["harmonized"] == len(test) - 5
    assert report["diagnostics"]["site_effect"]["after"]["share_F"] < \
        report["diagnostics"]["site_effect"]["before"]["share_F"]
    listed = runner.invoke(app, ["models", "--lake", str(root / "lake")])
    assert model_id in listed.output


def test_smooth_term_fit_from_the_command_line(tables):
    root, _ = tables
    res = runner.invoke(app, ["fit", "--table", str(root / "abide.csv"), "--batch", "SITE",
                              "--covariates", "AGE,SEX,DX", "--smooth", "AGE",
                              "--features", "Left-Hippocampus,*_MeanThickness_thickness",
                              "--out", str(root / "gam.parquet"), "--lake", str(root / "lake")])
    assert res.exit_code == 0, res.output
    meta = json.loads((root / "lake" / "models" / "harmonization" / _model_id(res.output)
                       / "model.json").read_text())
    assert meta["method"] == "ComBat-GAM" and meta["spline"]["terms"] == ["AGE"]
    assert set(meta["penalties"]) == {"Left-Hippocampus", "lh_MeanThickness_thickness",
                                      "rh_MeanThickness_thickness"}
    enc = CovariateEncoding.from_dict(meta["covariates"])
    assert [c.smooth for c in enc.covariates] == [True, False, False]


def test_every_combat_option_and_no_covariates_from_the_command_line(tables):
    root, df = tables
    features = [c for c in df.columns[5:] if c not in constant_columns(df)]
    res = runner.invoke(app, ["fit", "--table", str(root / "abide.csv"), "--batch", "SITE",
                              "--covariates", "AGE,SEX,DX", "--exclude", _exclude(df), "--no-eb", "--mean-only",
                              "--ref-batch", "NYU", "--out", str(root / "ref.csv"), "--lake", str(root / "lake")])
    assert res.exit_code == 0, res.output
    meta = json.loads((root / "lake" / "models" / "harmonization" / _model_id(res.output) / "model.json").read_text())
    ref = sorted(df["SITE"].unique()).index("NYU")
    assert meta["options"] == {"eb": False, "parametric": True, "mean_only": True, "ref": ref}
    assert meta["reference_batch"] == "NYU"
    out = pd.read_csv(root / "ref.csv")
    nyu = (df["SITE"] == "NYU").to_numpy()
    np.testing.assert_array_equal(out.loc[nyu, features].to_numpy(), df.loc[nyu, features].to_numpy())
    assert not np.allclose(out.loc[~nyu, features], df.loc[~nyu, features])
    # no covariates: said, and the report has no biology section to draw
    res = runner.invoke(app, ["fit", "--table", str(root / "abide.csv"), "--batch", "SITE", "--non-parametric",
                              "--exclude", _exclude(df) + ",AGE,SEX,DX", "--out", str(root / "plain.csv"),
                              "--report", str(root / "plain.html"), "--lake", str(root / "lake")])
    assert res.exit_code == 0, res.output
    assert "no covariates: every difference between sites is removed" in res.output
    report = json.loads((root / "plain.json").read_text())
    assert report["diagnostics"]["biology"]["survival"] == [] and report["model"]["covariates"] == []
    bad = runner.invoke(app, ["fit", "--table", str(root / "abide.csv"), "--batch", "SITE", "--no-eb",
                              "--non-parametric", "--out", str(root / "x.csv")])
    assert bad.exit_code == 2 and "needs eb=True" in bad.output


def test_missing_values_from_the_command_line_stay_missing_or_are_refused_on_request(tables):
    """A table with holes: harmonized around them, said in the report; --missing complete-scans refuses."""
    root, df = tables
    holed = df.copy()
    features = [c for c in df.columns[5:] if c not in constant_columns(df)]
    rows = np.random.default_rng(2).choice(len(df), 60, replace=False)
    holed.loc[rows, "CSF"] = np.nan
    holed.to_csv(root / "holed.csv", index=False)
    common = ["fit", "--table", str(root / "holed.csv"), "--batch", "SITE", "--covariates", "AGE,SEX,DX",
              "--exclude", _exclude(df), "--lake", str(root / "lake")]
    res = runner.invoke(app, [*common, "--out", str(root / "holed_out.csv"), "--report", str(root / "holed.html")])
    assert res.exit_code == 0, res.output
    out = pd.read_csv(root / "holed_out.csv")
    assert out["CSF"].isna().sum() == 60 and out[features].drop(columns="CSF").notna().all().all()
    html = (root / "holed.html").read_text()
    assert "harmonized on the rows that have it" in html and f"{len(df) - 60} of {len(df)} rows complete" in html
    res = runner.invoke(app, [*common, "--missing", "complete-scans", "--out", str(root / "strict.csv")])
    assert res.exit_code == 2 and "feature 'CSF' has 60 missing or infinite value(s)" in res.output
    assert "Traceback" not in res.output


def test_coded_levels_are_shown_by_name(tables, abide_data):
    """ABIDE's phenotypic file codes SEX and DX as 1/2: named, the report says "SEX=female" and
    "male: 29", never "SEX=2" or "1.2 ± 0.4"; a malformed --levels is a usage error."""
    root, df = tables
    coded = load_abide(abide_data, tables=("aseg",))
    coded.to_csv(root / "coded.csv", index=False)
    common = ["fit", "--table", str(root / "coded.csv"), "--batch", "SITE", "--covariates", "AGE,SEX,DX",
              "--exclude", _exclude(coded), "--lake", str(root / "lake"), "--out", str(root / "coded_out.csv")]
    res = runner.invoke(app, [*common, "--levels", "SEX:1=male,2=female", "--levels", "DX:1=autism,2=control",
                              "--report", str(root / "coded.html")])
    assert res.exit_code == 0, res.output
    html = (root / "coded.html").read_text()
    assert "SEX=female" in html and "DX=control" in html and "SEX (categorical: male/female)" in html
    assert re.search(r"male: \d+, female: \d+", html) and "SEX=2" not in html and "SEX=1" not in html
    assert "all 71 scans have SEX=&#39;male&#39;" in html                  # USM, an all-male site
    data = json.loads((root / "coded.json").read_text())
    assert {t["term"] for t in data["diagnostics"]["biology"]["survival"]} == {"AGE", "SEX=female", "DX=control"}
    bad = runner.invoke(app, [*common, "--levels", "SEX=1:male"])
    assert bad.exit_code == 2 and "COVARIATE:CODE=NAME" in bad.output
    unknown = runner.invoke(app, [*common, "--levels", "SITEX:1=a"])
    assert unknown.exit_code == 2 and "SITEX" in unknown.output
