"""The lake side of harmonization: long ``biomarkers`` rows in, ``biomarkers_harmonized`` out.

The ``biomarkers`` table is long (one row per subject, session, series and
measure). ComBat wants one row per scan and one column per measure, so
:func:`to_wide` pivots the QC-passed rows, builds the batch (site, or
site:scanner_epoch) and joins the covariates the statistician supplies (a
table keyed by ``subject``, optionally also by ``session``). Scans that lack a
measure or a covariate are left out with a warning naming them, never filled
in. :func:`harmonized_rows` turns the harmonized wide values back into rows of
``biomarkers_harmonized``: the biomarker row unchanged (same provenance,
including its ``created_at``, so applying the same model again rewrites
nothing) with the harmonized ``value``, the raw value, the batch and the model id.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.harmonization_settings import HarmonizationSettings
from harmonization.errors import Finding, InputTableError, NoRowsToHarmonize
from harmonization.inputs import HarmonizationData, read_table_file
from tasks.errors import TRANSIENT_RETRIES
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table, write_rows

KEY = ["site", "subject", "session", "series_uid"]
EPOCH_SEP = ":"


def read_covariates(path: str) -> pd.DataFrame:
    """A covariate table keyed by ``subject`` (and optionally ``session``).

    A BIDS ``participants.tsv`` works as is: its ``participant_id`` (``sub-<label>``)
    becomes ``subject`` (``<label>``).
    """
    df = read_table_file(path)
    if "subject" not in df.columns and "participant_id" in df.columns:
        df["subject"] = df["participant_id"].astype(str).str.removeprefix("sub-")
    if "subject" not in df.columns:
        raise InputTableError(f"{path}: a covariate table needs a 'subject' column "
                              f"(it has {', '.join(map(str, df.columns))})")
    keys = ["subject", "session"] if "session" in df.columns else ["subject"]
    dup = df.duplicated(keys, keep=False)
    if dup.any():
        raise InputTableError(f"{path}: {int(dup.sum())} rows repeat a {'/'.join(keys)} key, "
                              f"e.g. {df.loc[dup, keys].iloc[0].tolist()}")
    df["subject"] = df["subject"].astype(str)
    if "session" in df.columns:  # "1" in the lake and 1 in a CSV are the same visit
        df["session"] = df["session"].astype(str)
    df.attrs["source"] = str(path)  # named when no biomarker row matches (to_wide)
    return df


#: covariate name -> the studies table's column it is read from when no covariate file is given
#: (values the de-identification profile keeps from the DICOM headers: PatientAge, PatientSex, ...)
HEADER_COVARIATES = {"AGE": "age_years", "SEX": "sex", "WEIGHT": "weight_kg", "HEIGHT": "height_m"}


def covariates_from_studies(lake: Lake, trial_id: str) -> pd.DataFrame:
    """Covariates keyed by subject and session from the lake's own ``studies`` table.

    Age, sex, weight and height as the DICOM headers gave them (the trial keeps them through
    de-identification). Two studies of one visit (a re-send) give one row: the first received.
    """
    studies = read_table(lake, "studies")
    studies = studies[studies["trial_id"] == trial_id].sort_values("received_at")
    df = pd.DataFrame({"subject": studies["subject"].astype(str), "session": studies["session"].astype(str),
                       **{name: studies[col] for name, col in HEADER_COVARIATES.items()}})
    df = df.drop_duplicates(["subject", "session"]).reset_index(drop=True)
    df.attrs["source"] = ("the lake's studies table (age, sex, weight and height from the DICOM headers, "
                          "kept by de-identification)")
    return df


def select_rows(biomarkers: pd.DataFrame, trial_id: str | None, qc_status: list[str],
                sessions: list[str] | None = None, pipeline: str | None = None) -> pd.DataFrame:
    """Rows of one trial with the given QC verdicts (and visits, and pipeline, when given)."""
    keep = biomarkers["qc_status"].isin(qc_status)
    if pipeline is not None:
        keep &= biomarkers["pipeline_name"] == pipeline
    if trial_id is not None:
        keep &= biomarkers["trial_id"] == trial_id
    if sessions is not None:
        keep &= biomarkers["session"].isin(sessions)
    return biomarkers[keep].reset_index(drop=True)


def batch_of(rows: pd.DataFrame, mode: str) -> pd.Series:
    """Site, or site:scanner_epoch when ``mode == 'site_epoch'`` and the epoch is known."""
    site = rows["site"].astype(str)
    if mode != "site_epoch":
        return site
    epoch = rows["scanner_epoch"]
    return site.where(epoch.isna(), site + EPOCH_SEP + epoch.astype(str))


def to_wide(rows: pd.DataFrame, covariates: pd.DataFrame, settings: HarmonizationSettings,
            source: str = "lake biomarkers") -> tuple[HarmonizationData, list[Finding]]:
    """One row per scan, one column per measure, with batch and covariates.

    Raises
    ------
    InputTableError
        A measure comes from more than one pipeline version (a batch effect of its
        own), or a scan has the same measure twice.
    NoRowsToHarmonize
        There are scans, but not one of them has a row in the covariate table (the
        wrong file, or subject ids written another way): the file and ids of both sides
        are named.
    """
    pipelines = sorted(rows["pipeline_name"].dropna().unique())
    if len(pipelines) > 1:
        raise InputTableError(f"{source}: measures of several pipelines ({', '.join(pipelines)}), each scan "
                              "holding one pipeline's; harmonize one pipeline at a time (the trial's "
                              "harmonization.pipeline)")
    versions = rows.groupby("measure")[["pipeline_name", "pipeline_version"]].nunique()
    mixed = versions.index[(versions > 1).any(axis=1)].tolist()
    if mixed:
        raise InputTableError(f"{source}: measure(s) {mixed[:5]} come from several pipeline "
                              "versions; harmonize one pipeline version at a time")
    rows = _keyed(rows)
    dup = rows.duplicated(KEY + ["measure"], keep=False)
    if dup.any():
        raise InputTableError(f"{source}: a scan has the same measure twice, e.g. "
                              f"{rows.loc[dup, KEY + ['measure']].iloc[0].to_dict()}")
    rows = rows.assign(batch=batch_of(rows, settings.batch))
    wide = rows.pivot(index=KEY, columns="measure", values="value")
    batch = rows.drop_duplicates(KEY).set_index(KEY)["batch"].reindex(wide.index)
    findings: list[Finding] = []
    # available-case ComBat harmonizes each measure on the scans that have it (the fit says how much
    # is missing); complete_scans leaves out a scan that lacks one
    incomplete = (wide.isna().any(axis=1) if settings.missing == "complete_scans" else wide.isna().all(axis=1)
                  ).to_numpy()
    if incomplete.any():
        findings.append(_left_out(wide.index[incomplete], "lack some measures" if settings.missing == "complete_scans"
                                  else "have no measure"))
        findings.append(_missingness(wide, batch))
    keys = ["subject", "session"] if "session" in covariates.columns else ["subject"]
    names = [c for c in settings.covariates if c in covariates.columns]
    table = covariates[keys + names].astype({k: str for k in keys})
    cov = wide.index.to_frame(index=False)[keys].merge(table, on=keys, how="left",
                                                       indicator=True)
    matched = (cov.pop("_merge") == "both").to_numpy()
    if len(cov) and not matched.any():
        raise _no_match(wide.index.to_frame(index=False)[keys], table[keys],
                        str(covariates.attrs.get("source", "the covariate table")), source)
    cov.index = wide.index
    no_cov = cov[names].isna().any(axis=1).to_numpy() & ~incomplete if names else \
        np.zeros(len(wide), dtype=bool)
    if no_cov.any():
        findings.append(_left_out(wide.index[no_cov], "have no covariates"))
    keep = ~incomplete & ~no_cov
    labels = pd.Series([f"{s}/sub-{sub} ses-{ses}" for s, sub, ses, _ in wide.index], index=wide.index)
    subjects = pd.Series([f"{s}/{sub}" for s, sub, _, _ in wide.index], index=wide.index)
    data = HarmonizationData(features=wide[keep], covariates=cov.drop(columns=keys)[keep],
                             batch=batch[keep], row_labels=labels[keep], source=source, subjects=subjects[keep])
    return data, findings


def _no_match(scans: pd.DataFrame, table: pd.DataFrame, path: str, source: str,
              shown: int = 5) -> NoRowsToHarmonize:
    """The refusal when not one scan has a covariate row, with a few ids of each side."""
    keys = list(scans.columns)

    def ids(frame: pd.DataFrame) -> str:
        unique = frame.drop_duplicates()
        text = ", ".join("/".join(map(str, k)) for k in unique.head(shown).itertuples(index=False))
        return (text or "none") + (f" ... ({len(unique)} in all)" if len(unique) > shown else "")

    what = "/".join(keys)
    return NoRowsToHarmonize([Finding(
        "refusal", "no_covariate_match",
        f"no biomarker row matched a covariates row: none of the {len(scans)} scan(s) of {source} "
        f"has its {what} in {path}; {what} of the biomarkers: {ids(scans)}; of {path}: "
        f"{ids(table)}. Check that the file is this trial's and writes {what} as the lake does "
        "(a BIDS participants.tsv's 'sub-' prefix is removed)",
        {"covariates_file": path, "keys": keys, "scans": len(scans), "covariate_rows": len(table)})])


def _keyed(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows with a text key: a scan without a series UID is keyed by '' (NaN never matches)."""
    return rows.assign(series_uid=rows["series_uid"].fillna("").astype(str),
                       subject=rows["subject"].astype(str), session=rows["session"].astype(str))


def _missingness(wide: pd.DataFrame, batch: pd.Series) -> Finding:
    """Per batch: the share of its scans left out for a missing measure, and the measures missing
    most (ComBat needs every measure of a scan; one missing value costs the scan all of them)."""
    missing = wide.isna()
    per = missing.any(axis=1).groupby(batch.to_numpy()).agg(["sum", "size"])
    by_measure = missing.sum().sort_values(ascending=False)
    worst = ", ".join(f"{m} ({int(n)})" for m, n in by_measure[by_measure > 0].head(5).items())
    sites = "; ".join(f"{b} {int(r['sum'])} of {int(r['size'])} ({100 * r['sum'] / r['size']:.0f} %)"
                      for b, r in per.sort_values("sum", ascending=False).iterrows() if r["sum"])
    return Finding("warning", "missingness",
                   f"scans left out for a missing measure, by site: {sites}; measures missing most: {worst}",
                   {"by_batch": {str(b): [int(r["sum"]), int(r["size"])] for b, r in per.iterrows()},
                    "by_measure": {str(m): int(n) for m, n in by_measure[by_measure > 0].items()}})


def _left_out(index: pd.MultiIndex, why: str) -> Finding:
    shown = ", ".join(f"{s}/sub-{sub} ses-{ses}" for s, sub, ses, _ in list(index)[:5])
    return Finding("warning", "left_out",
                   f"{len(index)} scan(s) {why} and are left out: {shown}"
                   + (" ..." if len(index) > 5 else ""), {"scans": len(index)})


def harmonized_rows(rows: pd.DataFrame, harmonized: pd.DataFrame, batch: pd.Series,
                    model_id: str) -> dict[str, list[dict[str, Any]]]:
    """``biomarkers_harmonized`` rows per site for every harmonized (scan, measure)."""
    long = harmonized.rename_axis(columns="measure").stack().rename("harmonized").reset_index()
    long = long.merge(batch.rename("batch").reset_index(), on=KEY)
    merged = _keyed(rows).merge(long, on=KEY + ["measure"], how="inner")
    merged["series_uid"] = merged["series_uid"].replace("", None)
    merged["value_raw"] = merged["value"]
    merged["value"] = merged.pop("harmonized")
    merged["harmonization_model_id"] = model_id
    merged = merged.astype(object).where(merged.notna(), None)
    out: dict[str, list[dict[str, Any]]] = {}
    for site, part in merged.groupby("site"):
        out[str(site)] = part.drop(columns=["site"]).to_dict(orient="records")
    return out


def write_harmonized(lake: Lake, per_site: dict[str, list[dict[str, Any]]]) -> int:
    """Upsert every site's harmonized rows; returns the number of rows written."""
    for site, site_rows in per_site.items():
        write_rows(lake, "biomarkers_harmonized", site, site_rows)
    return sum(len(r) for r in per_site.values())


def already_harmonized(lake: Lake, model_id: str) -> set[tuple[str, str, str, str]]:
    """Scans that already have harmonized rows from ``model_id``."""
    done = read_table(lake, "biomarkers_harmonized")
    done = done[done["harmonization_model_id"] == model_id]
    return set(map(tuple, _keyed(done)[KEY].drop_duplicates().to_numpy()))


@task(name="read-biomarkers", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def read_biomarkers_task(lake: Lake) -> pd.DataFrame:
    """The lake's ``biomarkers`` table (retried: storage can fail transiently)."""
    return read_table(lake, "biomarkers")
