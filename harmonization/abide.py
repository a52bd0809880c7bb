"""ABIDE I FreeSurfer 6 measures joined to the PCP phenotypic file: real multi-site data.

The ``stats`` tables of ``abide_preproc_smri_freesurfer6`` hold one row per
subject, keyed by the first column (``Caltech_0051456``), which equals
``FILE_ID`` of ``Phenotypic_V1_0b_preprocessed1.csv`` (1035 subjects, 20 sites;
see ../shared/data/MANIFEST.md). Used by the tests and by bench/harmonize.py
as the real-data check of harmonization.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

FS_DIR = ("abide_preproc_smri_freesurfer6", "stats")
PHENO = ("pcp_abide", "Phenotypic_V1_0b_preprocessed1.csv")
TABLES = {
    "aseg": "aseg_table.tsv",
    "lh.thickness": "lh.aparc_table_thickness.tsv",
    "rh.thickness": "rh.aparc_table_thickness.tsv",
}
PHENO_COLUMNS = {"SITE_ID": "SITE", "AGE_AT_SCAN": "AGE", "SEX": "SEX", "DX_GROUP": "DX"}
SEX_LABELS = {1: "M", 2: "F"}
DX_LABELS = {1: "ASD", 2: "TD"}
# the phenotypic file's codes by name, for a report (HarmonizationSettings.covariate_levels)
SEX_NAMES = {"1": "male", "2": "female"}
DX_NAMES = {"1": "autism", "2": "control"}


def default_shared_dir() -> Path:
    """../shared/data relative to the repository root."""
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def load_abide(shared: str | Path | None = None, tables: tuple[str, ...] = tuple(TABLES),
               text_labels: bool = False) -> pd.DataFrame:
    """One row per subject: FILE_ID, SITE, AGE, SEX, DX, then the FreeSurfer measures.

    Parameters
    ----------
    shared
        The shared data folder (default ../shared/data).
    tables
        Which FreeSurfer tables to join (keys of :data:`TABLES`).
    text_labels
        SEX as M/F and DX as ASD/TD instead of the phenotypic file's 1/2 codes.
    """
    shared = Path(shared) if shared is not None else default_shared_dir()
    parts = []
    for key in tables:
        t = pd.read_csv(shared.joinpath(*FS_DIR, TABLES[key]), sep="\t", index_col=0)
        parts.append(t)
    measures = pd.concat(parts, axis=1)
    pheno = pd.read_csv(shared.joinpath(*PHENO)).set_index("FILE_ID")
    missing = measures.index.difference(pheno.index)
    if len(missing):
        raise ValueError(f"{len(missing)} FreeSurfer subjects have no phenotypic row: "
                         f"{list(missing[:5])}")
    cov = pheno.loc[measures.index, list(PHENO_COLUMNS)].rename(columns=PHENO_COLUMNS)
    if text_labels:
        cov["SEX"] = cov["SEX"].map(SEX_LABELS)
        cov["DX"] = cov["DX"].map(DX_LABELS)
    out = pd.concat([cov, measures], axis=1)
    out.index.name = "FILE_ID"
    return out.reset_index()


def constant_columns(df: pd.DataFrame) -> list[str]:
    """Numeric columns with a single value (FreeSurfer 6 writes 0 for some hypointensities)."""
    num = df.select_dtypes("number")
    return [c for c in num.columns if num[c].nunique() <= 1]
