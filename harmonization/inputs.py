"""Tables in, tables out: what ComBat needs, taken from the tables people have.

A statistician's table is wide (one row per scan, one column per feature plus
batch and covariate columns); neuroHarmonize wants a float array, a covariate
frame with a column named ``SITE`` and numbers only. This module bridges the
two: it reads CSV/TSV/Parquet, picks the feature columns, encodes text
covariates as indicator columns (and remembers the levels, so new data is
encoded the same way), and writes the table back with only the feature columns
changed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from harmonization.errors import Finding, InputTableError

READERS = {".csv": ",", ".tsv": "\t", ".txt": "\t"}


def read_table_file(path: str | Path) -> pd.DataFrame:
    """A CSV, TSV or Parquet file as a DataFrame (format by extension)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise InputTableError(f"{path}: no such file")
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in READERS:
            return pd.read_csv(path, sep=READERS[suffix])
    except (ValueError, OSError) as exc:
        raise InputTableError(f"{path}: cannot read as {suffix[1:]} ({exc})") from exc
    raise InputTableError(f"{path}: unknown table format {suffix!r}; use .csv, .tsv or .parquet")


def write_table_file(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as CSV/TSV/Parquet by extension, via a temporary name then rename."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in READERS and suffix not in (".parquet", ".pq"):
        raise InputTableError(f"{path}: unknown output format {suffix!r}; use .csv, .tsv or .parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if suffix in READERS:
        df.to_csv(tmp, sep=READERS[suffix], index=False)
    else:
        df.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def require_columns(df: pd.DataFrame, columns: list[str], what: str, source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        shown = ", ".join(map(str, list(df.columns)[:30]))
        raise InputTableError(f"{source}: {what} column(s) {missing} not found; the table has: {shown}"
                              + (" ..." if df.shape[1] > 30 else ""))


def select_features(df: pd.DataFrame, reserved: list[str], features: list[str] | None = None,
                    exclude: list[str] | None = None, source: str = "table") -> list[str]:
    """Feature columns: the named ones (names or glob patterns), else every numeric column
    that is not batch, covariate or excluded."""
    exclude = exclude or []
    if features:
        chosen: list[str] = []
        for pat in features:
            hits = [c for c in df.columns if fnmatch.fnmatchcase(str(c), pat)]
            if not hits:
                raise InputTableError(f"{source}: feature {pat!r} matches no column")
            chosen += [c for c in hits if c not in chosen]
    else:
        chosen = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])
                  and not pd.api.types.is_bool_dtype(df[c])]
    chosen = [c for c in chosen if c not in reserved and not any(
        fnmatch.fnmatchcase(str(c), pat) for pat in exclude)]
    bad = [c for c in chosen if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise InputTableError(f"{source}: feature column(s) {bad} are not numeric")
    if not chosen:
        raise InputTableError(f"{source}: no numeric feature columns left to harmonize")
    return chosen


def level_of(value: Any) -> str:
    """Canonical text of a category, so 1, 1.0 and '1' are one level."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    return str(value)


@dataclass(frozen=True)
class CovariateSpec:
    """How one covariate enters the ComBat design.

    Attributes
    ----------
    kind
        ``numeric`` (one column, as is) or ``categorical`` (one 0/1 column per
        level but the first, which is the reference).
    levels
        Sorted levels of a categorical covariate as seen at fit time.
    smooth
        Modelled by a spline (ComBat-GAM) instead of a line.
    """

    name: str
    kind: Literal["numeric", "categorical"]
    levels: tuple[str, ...] = ()
    smooth: bool = False

    @property
    def columns(self) -> list[str]:
        if self.kind == "numeric":
            return [self.name]
        return [f"{self.name}={lvl}" for lvl in self.levels[1:]]


@dataclass(frozen=True)
class CovariateEncoding:
    """The covariates of a model, in design order."""

    covariates: tuple[CovariateSpec, ...] = field(default_factory=tuple)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.covariates]

    @property
    def smooth_terms(self) -> list[str]:
        return [c.name for c in self.covariates if c.smooth]

    @property
    def columns(self) -> list[str]:
        """Encoded columns of all covariates (smooth ones included, as raw values)."""
        return [col for c in self.covariates for col in c.columns]

    @property
    def linear_columns(self) -> list[str]:
        return [col for c in self.covariates if not c.smooth for col in c.columns]

    def encode(self, df: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
        """Numeric design columns for ``df`` and, per row, why it cannot be encoded ('' if fine)."""
        out = np.zeros((len(df), len(self.columns)))
        why = np.full(len(df), "", dtype=object)
        free = np.ones(len(df), dtype=bool)  # rows without a reason yet
        j = 0
        for c in self.covariates:
            raw = df[c.name]
            if c.kind == "numeric":
                missing = raw.isna().to_numpy()
                why[missing & free] = f"{c.name} is missing"
                free &= ~missing
                out[:, j] = (raw.to_numpy(dtype=float) if pd.api.types.is_numeric_dtype(raw)
                             else pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float))
                j += 1
                continue
            # the text of each distinct value, not of each row
            codes, uniques = pd.factorize(raw)  # missing -> -1
            text = [level_of(v) for v in uniques]
            where = {lvl: i for i, lvl in enumerate(c.levels)}
            # position of each row's level in c.levels; -1 unseen, -2 missing (code -1 picks the -2)
            level = np.array([where.get(t, -1) for t in text] + [-2], dtype=int)[codes]
            why[(codes < 0) & free] = f"{c.name} is missing"
            free &= codes >= 0
            for i in np.nonzero((level == -1) & free)[0]:
                why[i] = f"{c.name}={text[codes[i]]!r} was not seen when the model was fitted"
            free &= level != -1
            for k in range(1, len(c.levels)):
                out[:, j] = level == k
                j += 1
        return (pd.DataFrame(out, index=df.index, columns=self.columns),
                pd.Series(why, index=df.index))

    def to_dict(self) -> list[dict[str, Any]]:
        return [{"name": c.name, "kind": c.kind, "levels": list(c.levels), "smooth": c.smooth}
                for c in self.covariates]

    @classmethod
    def from_dict(cls, items: list[dict[str, Any]]) -> "CovariateEncoding":
        return cls(tuple(CovariateSpec(d["name"], d["kind"], tuple(d["levels"]), bool(d["smooth"]))
                         for d in items))


def infer_encoding(df: pd.DataFrame, names: list[str], categorical: list[str] = (),
                   smooth: list[str] = ()) -> CovariateEncoding:
    """Numeric covariates stay numeric; text, boolean and ``categorical`` ones become levels."""
    specs = []
    for name in names:
        col = df[name]
        is_cat = name in categorical or not pd.api.types.is_numeric_dtype(col) \
            or pd.api.types.is_bool_dtype(col)
        if is_cat:
            levels = tuple(sorted({level_of(v) for v in col.dropna()}))
            specs.append(CovariateSpec(name, "categorical", levels, smooth=False))
        else:
            specs.append(CovariateSpec(name, "numeric", (), smooth=name in smooth))
    return CovariateEncoding(tuple(specs))


@dataclass
class HarmonizationData:
    """One harmonization input, rows aligned across all members.

    Attributes
    ----------
    features
        (n, F) float values, one column per feature.
    covariates
        The raw covariate columns (text or numbers), as given.
    batch
        Batch label per row (site, or site:epoch).
    row_labels
        How to name a row in a message ("row 17", "sub-01 ses-baseline").
    source
        Where the data came from (file path or lake table), for provenance.
    """

    features: pd.DataFrame
    covariates: pd.DataFrame
    batch: pd.Series
    row_labels: pd.Series
    source: str = ""
    notes: list = field(default_factory=list)     # Findings about how the table was read
    subjects: pd.Series | None = None              # who each row is, when known (repeated scans)

    def __post_init__(self) -> None:
        self.batch = self.batch.map(lambda v: None if pd.isna(v) else level_of(v))

    @property
    def n(self) -> int:
        return len(self.features)

    def subset(self, mask: np.ndarray) -> "HarmonizationData":
        mask = np.asarray(mask, dtype=bool)
        return HarmonizationData(self.features[mask], self.covariates[mask], self.batch[mask],
                                 self.row_labels[mask], self.source, list(self.notes),
                                 None if self.subjects is None else self.subjects[mask])

    def fingerprint(self) -> str:
        """sha256 of the values used (features, covariates, batch), independent of file format."""
        h = hashlib.sha256()
        h.update("\x1f".join(map(str, self.features.columns)).encode())
        # column by column: pandas holds a frame's values column-major, so this copies nothing
        values = np.asfortranarray(self.features.to_numpy(dtype=float))
        h.update(values.T.data)
        for frame in (self.covariates, self.batch.to_frame()):
            h.update("\x1f".join(map(str, frame.columns)).encode())
            if frame.shape[1]:   # pandas cannot hash a frame without columns (a fit without covariates)
                h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
        return h.hexdigest()


SUBJECT_COLUMN = re.compile(r"^(sub(ject)?|participant|patient)([ _-]?(id|label|key))?$", re.IGNORECASE)


def from_wide_table(df: pd.DataFrame, batch_col: str, covariates: list[str],
                    features: list[str] | None = None, exclude: list[str] | None = None,
                    source: str = "table", subject_col: str | None = None) -> HarmonizationData:
    """Split a statistician's wide table into features, covariates and batch.

    Raises
    ------
    InputTableError
        The batch or a covariate column is missing, or no numeric feature is left.
    """
    require_columns(df, [batch_col], "batch", source)
    require_columns(df, covariates, "covariate", source)
    if subject_col is not None:
        require_columns(df, [subject_col], "subject", source)
    else:   # a column named as subjects are (subject, participant_id, SUB_ID): who each row is
        subject_col = next((c for c in df.columns if SUBJECT_COLUMN.match(str(c))), None)
    reserved = [batch_col, *covariates, *([subject_col] if subject_col is not None else [])]
    ids = [c for c in df.columns if c not in reserved and identifier_like(df[c])]
    notes = []
    if not features:   # named features are the user's choice; the default never takes an identifier
        numeric_ids = [c for c in ids if pd.api.types.is_numeric_dtype(df[c])]
        reserved += numeric_ids
        notes += [Finding("warning", "identifier_column",
                          f"column {c!r} holds a different whole number in every row (an identifier): it is not "
                          "harmonized; name it in --features to harmonize it anyway", {"column": str(c)})
                  for c in numeric_ids]
    cols = select_features(df, reserved, features, exclude, source)
    lines = [f"row {i + 2}" for i in range(len(df))]   # file line numbers
    id_col = subject_col if subject_col is not None else next((c for c in ids if c not in cols), None)
    if id_col is not None:                            # name rows by the subject, and where they are
        lines = [f"{id_col}={level_of(v)} ({line})" for v, line in zip(df[id_col], lines)]
    return HarmonizationData(
        features=df[cols].astype(float), covariates=df[covariates].copy(),
        batch=df[batch_col], row_labels=pd.Series(lines, index=df.index), source=source, notes=notes,
        subjects=None if subject_col is None else df[subject_col].map(level_of))


IDENTIFIER_NAME = re.compile(r"(^|[^a-z])(id|no|nr|num|number|key|index|idx|code|mrn)$|^id", re.IGNORECASE)


def identifier_like(column: pd.Series) -> bool:
    """A column that names rows: a different value in every row, text, or whole numbers that are
    named like an identifier (``SUB_ID``, ``scan_no``) or dense like a running number (their span at
    most twice the number of rows). A measurement in whole numbers (voxel counts) is neither named
    so nor dense, even where a few rows make it unique. Nothing is told from three rows or fewer."""
    if len(column) <= 3 or column.isna().any() or not column.is_unique:
        return False
    if pd.api.types.is_bool_dtype(column):
        return False
    if pd.api.types.is_numeric_dtype(column):
        values = column.to_numpy(dtype=float)
        if not (np.all(np.isfinite(values)) and np.all(values == np.round(values))):
            return False
        return bool(IDENTIFIER_NAME.search(str(column.name)) or values.max() - values.min() < 2 * len(values))
    return True


def write_back(original: pd.DataFrame, harmonized: pd.DataFrame,
               status: pd.Series | None = None) -> pd.DataFrame:
    """The input table with its feature columns replaced, order and other columns unchanged.

    ``status`` (one text per row, '' when harmonized) is appended as
    ``harmonization_status`` only when some row could not be harmonized.
    """
    out = pd.DataFrame({c: harmonized[c].to_numpy() if c in harmonized.columns else original[c]
                        for c in original.columns}, index=original.index)
    if status is not None and (status != "").any():
        out = out.assign(harmonization_status=status.replace("", "harmonized").to_numpy())
    return out
