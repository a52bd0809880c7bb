"""One harmonization model per pipeline (issue 13): a lake that holds anat, dwi and bold measures
(each scan one pipeline's) is harmonized one pipeline at a time, and DWI measures are harmonized
as volumes are, batch = site + scanner epoch.

The DWI rows are a simulation (no multi-site DWI is in ../shared/data): white-matter FA and MD
with a known age effect, per-site additive and multiplicative scanner effects and one site's
scanner upgrade, for 4 sites x 40 subjects.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from data_contracts.harmonization_settings import HarmonizationSettings
from harmonization import lake as lake_io
from harmonization import service
from harmonization.errors import InputTableError
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tests.harmonization.lake_world import CREATED, write_biomarkers

SITES = {"s1": (0.00, 1.00), "s2": (0.03, 1.10), "s3": (-0.02, 0.90), "s4": (0.015, 1.05)}   # FA shift, scale


def _rows(pipeline: str, measures: dict[str, tuple[str, float, float]], rng, age_slope=-0.002,
          upgrade: str | None = "s2") -> tuple[list[dict], pd.DataFrame]:
    rows, cov = [], []
    for site, (shift, scale) in SITES.items():
        for i in range(40):
            subject = f"{site}x{i:02d}"
            age = float(rng.uniform(20, 80))
            epoch = "e2" if site == upgrade and i >= 20 else "e1"
            extra = 0.02 if epoch == "e2" else 0.0       # the upgraded scanner reads higher
            cov.append({"subject": subject, "AGE": age, "SEX": int(rng.integers(1, 3))})
            for name, (unit, mean, sd) in measures.items():
                value = mean * (1 + age_slope * (age - 50)) + rng.normal(0, sd) * scale + (shift + extra) * mean
                rows.append({
                    "site": site, "trial_id": "DWIH", "subject": subject, "session": "baseline",
                    "acquisition_date": None, "scanner_epoch": epoch, "series_uid": f"2.25.{pipeline}.{subject}",
                    "measure": name, "value": float(value), "unit": unit, "qc_status": "PASS",
                    "pipeline_name": pipeline, "pipeline_version": "0.1.0",
                    "container_digest": "sha256:" + "0" * 64,
                    "input_sha256": hashlib.sha256(f"{pipeline}{subject}".encode()).hexdigest(),
                    "flow_run_id": "test", "created_at": CREATED})
    return rows, pd.DataFrame(cov)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    rng = np.random.default_rng(13)
    dwi, cov = _rows("dwi", {"FA_WM": ("1", 0.45, 0.02), "MD_WM": ("um2/ms", 0.75, 0.03)}, rng)
    anat, _ = _rows("anat", {"GM": ("mm3", 650000.0, 40000.0), "WM": ("mm3", 520000.0, 35000.0)}, rng)
    bold, _ = _rows("bold", {"FD_mean": ("mm", 0.15, 0.05)}, rng, age_slope=0.0)
    lake = Lake(str(tmp_path_factory.mktemp("lake"))).init()
    write_biomarkers(lake, pd.DataFrame(dwi + anat + bold))
    return lake, cov


def test_several_pipelines_at_once_are_refused_with_what_to_set(mixed):
    lake, cov = mixed
    rows = lake_io.select_rows(read_table(lake, "biomarkers"), "DWIH", ["PASS"])
    with pytest.raises(InputTableError, match=r"several pipelines \(anat, bold, dwi\).*harmonization.pipeline"):
        lake_io.to_wide(rows, cov, HarmonizationSettings(covariates=["AGE", "SEX"]))


def test_dwi_measures_are_harmonized_like_volumes_site_and_scanner_epoch_removed(mixed):
    lake, cov = mixed
    settings = HarmonizationSettings(covariates=["AGE", "SEX"], pipeline="dwi", min_site_n=10)
    rows = lake_io.select_rows(read_table(lake, "biomarkers"), "DWIH", ["PASS"], pipeline=settings.pipeline)
    assert set(rows["measure"]) == {"FA_WM", "MD_WM"}
    data, left_out = lake_io.to_wide(rows, cov, settings)
    assert data.n == 160 and left_out == []
    assert sorted(set(data.batch)) == ["s1:e1", "s2:e1", "s2:e2", "s3:e1", "s4:e1"]
    model, fitted = service.fit_lake(lake, rows, cov, settings)
    applied = service.apply_lake(lake, model, fitted.model_id, rows, cov, settings)
    assert applied.harmonized == 160
    out = read_table(lake, "biomarkers_harmonized")
    assert set(out["measure"]) == {"FA_WM", "MD_WM"} and set(out["pipeline_name"]) == {"dwi"}
    fa = out[out["measure"] == "FA_WM"].merge(cov, on="subject")
    resid_before = fa["value_raw"] - np.polyval(np.polyfit(fa["AGE"], fa["value_raw"], 1), fa["AGE"])
    resid_after = fa["value"] - np.polyval(np.polyfit(fa["AGE"], fa["value"], 1), fa["AGE"])
    p_before = stats.f_oneway(*[resid_before[fa["batch"] == b] for b in sorted(set(fa["batch"]))]).pvalue
    p_after = stats.f_oneway(*[resid_after[fa["batch"] == b] for b in sorted(set(fa["batch"]))]).pvalue
    assert p_before < 1e-4 and p_after > 0.5, (p_before, p_after)
    # the age effect survives: slope within 20 % of the simulated -0.002 * 0.45 per year
    slope = np.polyfit(fa["AGE"], fa["value"], 1)[0]
    assert slope == pytest.approx(-0.002 * 0.45, rel=0.2)
