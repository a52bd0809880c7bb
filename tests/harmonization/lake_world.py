"""A trial's lake of biomarker rows built from ABIDE's real measures, for lake-mode tests.

One long row per subject, session and measure, as the pipelines write them, under trial
``ABIDEH`` (:data:`TRIAL`); the covariates go to a separate TSV as a statistician supplies
them (``subject`` is ABIDE's FILE_ID without the underscore).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from data_contracts.harmonization_settings import HarmonizationSettings
from tasks.lake.storage import Lake
from tasks.lake.tables import write_rows

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


def subject_of(wide: pd.DataFrame) -> pd.Series:
    """The lake's subject id of each ABIDE row."""
    return wide["FILE_ID"].str.replace("_", "")


def biomarker_rows(wide: pd.DataFrame, session: str, epoch: pd.Series, qc: pd.Series,
                   trial_id: str = "ABIDEH") -> list[dict]:
    """``biomarkers`` rows of ``wide``'s subjects at one session."""
    out = []
    for i, r in wide.iterrows():
        subject = r["FILE_ID"].replace("_", "")
        for m in MEASURES:
            out.append({
                "site": r["SITE"], "trial_id": trial_id, "subject": subject, "session": session,
                "acquisition_date": None, "scanner_epoch": epoch[i], "series_uid": f"2.25.{i}.{session}",
                "measure": m, "value": float(r[m]), "unit": "mm" if "thickness" in m else "mm3",
                "qc_status": qc[i], "pipeline_name": "freesurfer", "pipeline_version": "6.0.0",
                "container_digest": "sha256:" + "0" * 64,
                "input_sha256": hashlib.sha256(f"{subject}{session}".encode()).hexdigest(),
                "flow_run_id": "test", "created_at": CREATED})
    return out


def write_biomarkers(lake: Lake, frame: pd.DataFrame) -> None:
    """Each site's rows as that site's partition of ``biomarkers``."""
    for site, part in frame.groupby("site"):
        write_rows(lake, "biomarkers", site, part.drop(columns="site").to_dict("records"))


def write_covariates(wide: pd.DataFrame, path: Path) -> Path:
    """The covariate table of ``wide``'s subjects as a TSV keyed by ``subject``."""
    wide.assign(subject=subject_of(wide))[["subject", *COVS]].to_csv(path, sep="\t", index=False)
    return path
