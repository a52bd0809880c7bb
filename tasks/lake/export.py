"""Biomarker tables for statisticians: the long table as is, or one row per subject and session.

The long ``biomarkers`` table (one row per subject, session, series and
measure) is what pandas and duckdb read directly. The wide view pivots it to
one row per subject and session with a column per ``<pipeline>_<measure>``,
taking for each pipeline its newest version unless one is named.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tasks.errors import CorelabError
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table

INDEX = ["site", "subject", "session", "acquisition_date", "scanner_epoch"]


class ExportError(CorelabError, ValueError):
    """The export cannot be made as asked (no rows yet, an unknown format)."""

    code = "export_refused"


def _version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in str(v).split("."))


def newest_versions(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of each pipeline's newest version only (older versions stay in the lake)."""
    if df.empty:
        return df
    newest = {name: max(g["pipeline_version"].unique(), key=_version_key)
              for name, g in df.groupby("pipeline_name")}
    return df[df["pipeline_version"] == df["pipeline_name"].map(newest)]


def wide(df: pd.DataFrame) -> pd.DataFrame:
    """One row per subject and session; a session with two series of one pipeline keeps both rows."""
    if df.empty:
        return pd.DataFrame(columns=INDEX)
    df = df.assign(column=df["pipeline_name"] + "_" + df["measure"])
    values = df.pivot_table(index=INDEX + ["series_uid"], columns="column", values="value", aggfunc="first")
    status = df.groupby(INDEX + ["series_uid"])["qc_status"].agg(lambda s: "WARN" if "WARN" in set(s) else "PASS")
    out = values.join(status).reset_index()
    out.columns.name = None
    return out.sort_values(["site", "subject", "session"]).reset_index(drop=True)


def export_biomarkers(lake: Lake, out: Path, fmt: str, as_wide: bool, harmonized: bool = False,
                      version: str | None = None) -> int:
    table = "biomarkers_harmonized" if harmonized else "biomarkers"
    df = read_table(lake, table)
    if df.empty:
        raise ExportError(f"the lake has no {table} rows yet")
    df = df[df["pipeline_version"] == version] if version else newest_versions(df)
    result = wide(df) if as_wide else df
    if fmt == "parquet":
        result.to_parquet(out, index=False)
    elif fmt == "csv":
        result.to_csv(out, index=False)
    else:
        raise ExportError(f"format must be parquet or csv, not {fmt!r}")
    return len(result)
