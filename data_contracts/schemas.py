"""Versioned pyarrow schemas of the lake's Parquet tables.

Every table is partitioned by ``site`` (the partition column lives in the path
``tables/<table>/site=<site>/``, not inside the files, the Hive convention that
pandas, pyarrow and duckdb read with no extra code). Each schema has a version;
bump it on any change and say why in the changelog line. Writers validate
every row against the schema (types, required columns, allowed values, unique
primary key) before anything is written. A new version may add nullable
columns and nothing else: partitions written by an older version are read with
those columns empty (``tasks.lake.tables``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from data_contracts.reasons import CODES

UTC_TS = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class TableSchema:
    """One table's contract.

    Attributes
    ----------
    name
        Table name, also its folder under ``tables/``.
    version
        Schema version, written into each Parquet file's metadata.
    schema
        Columns of the files (without the ``site`` partition column).
    primary_key
        Columns that identify a row; re-writing a row with the same key replaces it.
    required
        Columns that may not be null (beyond what the Arrow types enforce).
    allowed
        Column -> allowed values, for enumerations.
    """

    name: str
    version: str
    schema: pa.Schema
    primary_key: tuple[str, ...]
    required: tuple[str, ...] = ()
    allowed: dict[str, frozenset[str]] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return self.schema.names


def _s(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t in fields])


STUDIES = TableSchema(
    name="studies",
    version="1.0",
    schema=_s(
        ("study_key", pa.string()),            # sha256 of the sorted original SOPInstanceUIDs
        ("trial_id", pa.string()),
        ("subject", pa.string()),
        ("session", pa.string()),              # visit id from the schedule, or "unscheduled"
        ("study_uid", pa.string()),            # de-identified StudyInstanceUID
        ("acquisition_date", pa.date32()),     # shifted
        ("days_from_baseline", pa.int32()),
        ("in_window", pa.bool_()),
        ("age_years", pa.float64()),           # retained patient characteristics (ComBat covariates)
        ("sex", pa.string()),
        ("weight_kg", pa.float64()),
        ("height_m", pa.float64()),
        ("status", pa.string()),
        ("n_files", pa.int32()),
        ("n_series", pa.int32()),
        ("n_quarantined", pa.int32()),
        ("n_deviations", pa.int32()),
        ("deid_method", pa.string()),
        ("received_at", UTC_TS),
        ("flow_run_id", pa.string()),
        ("corelab_version", pa.string()),
    ),
    primary_key=("study_key",),
    required=("study_key", "trial_id", "subject", "session", "status", "received_at"),
    allowed={"status": frozenset({"accepted", "accepted_with_deviations", "rejected"}),
             "sex": frozenset({"M", "F", "O"})},
)

SERIES = TableSchema(
    name="series",
    version="1.0",
    schema=_s(
        ("study_key", pa.string()),
        ("series_uid", pa.string()),           # de-identified SeriesInstanceUID
        ("subject", pa.string()),
        ("session", pa.string()),
        ("series_number", pa.int32()),
        ("description", pa.string()),
        ("series_type", pa.string()),          # protocol series type, null if unclassified
        ("verdict", pa.string()),
        ("n_files", pa.int32()),
        ("manufacturer", pa.string()),
        ("model", pa.string()),
        ("software_versions", pa.string()),
        ("device_serial", pa.string()),
        ("scanner_epoch", pa.string()),
        ("field_strength", pa.float64()),
        ("repetition_time", pa.float64()),     # ms
        ("echo_time", pa.float64()),           # ms
        ("inversion_time", pa.float64()),      # ms
        ("flip_angle", pa.float64()),          # degrees
        ("slice_thickness", pa.float64()),     # mm
        ("pixel_spacing_row", pa.float64()),   # mm
        ("pixel_spacing_col", pa.float64()),   # mm
        ("rows", pa.int32()),
        ("columns", pa.int32()),
        ("n_slices", pa.int32()),
        ("n_volumes", pa.int32()),
        ("coverage_mm", pa.float64()),
        ("burned_in_annotation", pa.bool_()),
        ("deid_path", pa.string()),            # lake path of the de-identified series folder
        ("content_sha256", pa.string()),       # sha256 over the sorted sha256 of its de-identified files
        ("created_at", UTC_TS),
    ),
    primary_key=("series_uid",),
    required=("study_key", "series_uid", "subject", "session", "verdict", "created_at"),
    allowed={"verdict": frozenset({"conform", "deviation", "unclassified", "incomplete", "rejected"})},
)

DEVIATIONS = TableSchema(
    name="deviations",
    # 1.1: reason_code (the error that caused a deviation: a quarantine, a failed conversion,
    # a QC FAIL's deciding reason; null for protocol findings, whose kind says it all); the
    # kind duplicate_series, which nothing ever produced, is gone; study_date_substituted (a visit
    # dated from another element than StudyDate, or from the upload's arrival); derived_image (a
    # scanner-computed image found in an acquired series and kept apart from it)
    # 1.2: missing_visit (a visit whose window closed with nothing received; on the subject's
    # first study, with the missing visit as its session)
    version="1.2",
    schema=_s(
        ("deviation_id", pa.string()),         # hash of study_key, series, kind, parameter
        ("study_key", pa.string()),
        ("series_uid", pa.string()),
        ("subject", pa.string()),
        ("session", pa.string()),
        ("kind", pa.string()),
        ("parameter", pa.string()),
        ("expected", pa.string()),
        ("observed", pa.string()),
        ("severity", pa.string()),
        ("message", pa.string()),
        ("reason_code", pa.string()),          # data_contracts.reasons
        ("created_at", UTC_TS),
    ),
    primary_key=("deviation_id",),
    required=("deviation_id", "study_key", "kind", "severity", "message", "created_at"),
    allowed={
        "severity": frozenset({"major", "minor"}),
        "kind": frozenset({
            "parameter", "missing_series", "unclassified_series", "ambiguous_series",
            "unknown_scanner", "new_scanner_epoch", "out_of_window", "unscheduled_visit",
            "quarantined_file", "burned_in_annotation", "qc_fail", "processing_failed",
            "study_date_substituted", "derived_image", "incomplete_series", "missing_visit",
        }),
        "reason_code": CODES,
    },
)

QUERIES = TableSchema(
    name="queries",
    # 1.1: a query's life: answered (by the site: a comment, a re-send), resolved (by the core lab, or
    # by itself when a re-sent series passes), escalated (past its due date); who and when of each step
    version="1.1",
    schema=_s(
        ("query_id", pa.string()),
        ("study_key", pa.string()),
        ("deviation_id", pa.string()),
        ("subject", pa.string()),
        ("session", pa.string()),
        ("status", pa.string()),
        ("message", pa.string()),
        ("created_at", UTC_TS),
        ("answer", pa.string()),
        ("answered_by", pa.string()),
        ("answered_at", UTC_TS),
        ("resolution", pa.string()),
        ("resolved_by", pa.string()),
        ("resolved_at", UTC_TS),
        ("escalated_at", UTC_TS),
    ),
    primary_key=("query_id",),
    required=("query_id", "study_key", "status", "message", "created_at"),
    # closed: withdrawn by corelab (the deviation it asked about was an infrastructure failure)
    allowed={"status": frozenset({"open", "answered", "escalated", "resolved", "closed"})},
)

QC = TableSchema(
    name="qc",
    # 1.1: reason_code (why a metric is not PASS; on the verdict row, the deciding reason)
    # 1.2: backend (what ran the pipeline), environment_sha256 (the local backend's software)
    version="1.2",
    # One row per processed series and metric, plus a row with metric "verdict" whose
    # status is the series' verdict and whose reason lists every reason.
    schema=_s(
        ("series_uid", pa.string()),
        ("study_key", pa.string()),
        ("subject", pa.string()),
        ("session", pa.string()),
        ("pipeline_name", pa.string()),
        ("pipeline_version", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("status", pa.string()),               # PASS | WARN | FAIL for this metric
        ("reason", pa.string()),
        ("reason_code", pa.string()),          # data_contracts.reasons
        ("robust_z", pa.float64()),
        ("verdict", pa.string()),              # the series' verdict in force (after any override)
        ("automatic_verdict", pa.string()),    # what the gate said
        ("override_by", pa.string()),
        ("override_reason", pa.string()),
        ("override_at", UTC_TS),
        ("input_sha256", pa.string()),
        ("container_digest", pa.string()),     # the image that ran; null when none ran (local)
        ("backend", pa.string()),              # podman | docker | apptainer | local
        ("environment_sha256", pa.string()),   # local: tasks.run.runner.environment_hash
        ("flow_run_id", pa.string()),
        ("created_at", UTC_TS),
    ),
    primary_key=("series_uid", "pipeline_name", "pipeline_version", "metric"),
    required=("series_uid", "study_key", "subject", "session", "pipeline_name", "pipeline_version",
              "metric", "status", "verdict", "automatic_verdict", "created_at"),
    allowed={"status": frozenset({"PASS", "WARN", "FAIL"}), "verdict": frozenset({"PASS", "WARN", "FAIL"}),
             "automatic_verdict": frozenset({"PASS", "WARN", "FAIL"}), "reason_code": CODES},
)

BIOMARKERS = TableSchema(
    name="biomarkers",
    # 1.1: backend, environment_sha256; container_digest only when an image ran (null for local)
    version="1.1",
    schema=_s(
        ("trial_id", pa.string()),
        ("subject", pa.string()),
        ("session", pa.string()),
        ("acquisition_date", pa.date32()),     # shifted
        ("scanner_epoch", pa.string()),
        ("series_uid", pa.string()),
        ("measure", pa.string()),
        ("value", pa.float64()),
        ("unit", pa.string()),
        ("qc_status", pa.string()),
        ("pipeline_name", pa.string()),
        ("pipeline_version", pa.string()),
        ("container_digest", pa.string()),
        ("input_sha256", pa.string()),
        ("flow_run_id", pa.string()),
        ("created_at", UTC_TS),
        ("backend", pa.string()),
        ("environment_sha256", pa.string()),
    ),
    primary_key=("subject", "session", "series_uid", "measure", "pipeline_name", "pipeline_version"),
    required=("trial_id", "subject", "session", "measure", "value", "unit", "qc_status",
              "pipeline_name", "pipeline_version", "input_sha256", "created_at"),
    allowed={"qc_status": frozenset({"PASS", "WARN"})},
)

BIOMARKERS_HARMONIZED = TableSchema(
    name="biomarkers_harmonized",
    version="1.0",
    # The biomarkers row, with ``value`` harmonized, the raw value kept beside it,
    # and the model that did it on every row.
    schema=pa.schema(list(BIOMARKERS.schema) + [
        pa.field("value_raw", pa.float64()),
        pa.field("batch", pa.string()),
        pa.field("harmonization_model_id", pa.string()),
    ]),
    primary_key=BIOMARKERS.primary_key + ("harmonization_model_id",),
    required=BIOMARKERS.required + ("value_raw", "batch", "harmonization_model_id"),
    allowed=BIOMARKERS.allowed,
)

TABLES: dict[str, TableSchema] = {
    t.name: t for t in (STUDIES, SERIES, DEVIATIONS, QUERIES, QC, BIOMARKERS, BIOMARKERS_HARMONIZED)
}
