"""Parquet tables: validated, atomic, idempotent, readable by pandas and duckdb with no extra code."""

from __future__ import annotations

from datetime import date, datetime, timezone

import duckdb
import pandas as pd
import pytest

from tasks.lake.storage import Lake
from tasks.lake.tables import (
    SchemaViolation,
    delete_rows,
    partition_path,
    read_table,
    table_metadata,
    update_rows,
    write_rows,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _study(key, status="accepted", **kw):
    return dict(study_key=key, trial_id="T", subject="S1", session="baseline", status=status,
                received_at=NOW, acquisition_date=date(2020, 1, 1), **kw)


@pytest.fixture
def lake(tmp_path):
    return Lake(str(tmp_path / "lake")).init()


def test_upsert_by_key_and_no_op_rewrite(lake):
    assert write_rows(lake, "studies", "site-a", [_study("k1"), _study("k2")]) == 2
    path = lake.path(partition_path("studies", "site-a"))
    before = open(path, "rb").read()
    import os
    mtime = os.stat(path).st_mtime_ns
    assert write_rows(lake, "studies", "site-a", [_study("k1")]) == 2
    assert open(path, "rb").read() == before and os.stat(path).st_mtime_ns == mtime
    write_rows(lake, "studies", "site-a", [_study("k1", status="rejected")])
    df = read_table(lake, "studies")
    assert dict(zip(df.study_key, df.status)) == {"k1": "rejected", "k2": "accepted"}


@pytest.mark.parametrize("row,message", [
    (dict(status="maybe"), "status='maybe' is not one of"),
    (dict(subject=None), "required column 'subject' is empty"),
    (dict(colour="red"), "unknown columns ['colour']"),
    (dict(n_files="many"), "studies"),
])
def test_schema_violation_is_refused_and_the_table_kept(lake, row, message):
    write_rows(lake, "studies", "site-a", [_study("k1")])
    before = lake.read_bytes(partition_path("studies", "site-a"))
    bad = _study("k2")
    bad.update(row)
    with pytest.raises(SchemaViolation, match=message.replace("[", r"\[").replace("]", r"\]")):
        write_rows(lake, "studies", "site-a", [bad])
    assert lake.read_bytes(partition_path("studies", "site-a")) == before


def test_duplicate_keys_in_one_write_are_refused(lake):
    with pytest.raises(SchemaViolation, match="duplicate primary key"):
        write_rows(lake, "studies", "site-a", [_study("k1"), _study("k1", status="rejected")])


def test_metadata_names_schema_and_software(lake):
    write_rows(lake, "studies", "site-a", [_study("k1")])
    md = table_metadata(lake, "studies", "site-a")
    assert md["corelab.schema_version"] == "1.0"
    assert {"pyarrow", "pydicom", "corelab-imaging"} <= set(md["corelab.software"])


def test_duckdb_and_pandas_read_the_partitioned_table(lake):
    write_rows(lake, "studies", "site-a", [_study("k1")])
    write_rows(lake, "studies", "site-b", [_study("k2"), _study("k3")])
    glob = lake.path("tables/studies") + "/*/*.parquet"
    rows = duckdb.sql(f"SELECT site, count(*) AS n FROM read_parquet('{glob}', hive_partitioning=true) "
                      "GROUP BY site ORDER BY site").fetchall()
    assert rows == [("site-a", 1), ("site-b", 2)]
    df = pd.read_parquet(lake.path("tables/studies"))
    assert sorted(df["study_key"]) == ["k1", "k2", "k3"] and set(df["site"].astype(str)) == {"site-a", "site-b"}


def test_site_cannot_escape_the_table(lake):
    with pytest.raises(SchemaViolation, match="cannot name a table partition"):
        write_rows(lake, "studies", "../x", [_study("k1")])


def test_delete_rows(lake):
    write_rows(lake, "studies", "site-a", [_study("k1"), _study("k2"), _study("k3", status="rejected")])
    assert delete_rows(lake, "studies", "site-a", {"status": "accepted"}) == 2
    assert read_table(lake, "studies")["study_key"].tolist() == ["k3"]
    assert delete_rows(lake, "studies", "site-a", {"status": "accepted"}) == 0
    with pytest.raises(SchemaViolation, match="no columns"):
        delete_rows(lake, "studies", "site-a", {"colour": "red"})


def _deviation(did, **kw):
    return dict(deviation_id=did, study_key="k1", kind="parameter", severity="major", message="m",
                created_at=NOW, **kw)


def test_a_partition_of_the_previous_schema_version_reads_and_merges(lake):
    """deviations 1.0 had no reason_code: its rows read with the column empty, and new rows merge."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_contracts.schemas import DEVIATIONS

    old_schema = pa.schema([f for f in DEVIATIONS.schema if f.name != "reason_code"])
    old = pa.Table.from_pylist([{c: _deviation("d-old").get(c) for c in old_schema.names}], schema=old_schema)
    buf = io.BytesIO()
    pq.write_table(old.replace_schema_metadata({b"corelab.schema_version": b"1.0"}), buf)
    lake.write_bytes(partition_path("deviations", "site-a"), buf.getvalue())
    df = read_table(lake, "deviations")
    assert df.deviation_id.tolist() == ["d-old"] and df.reason_code.isna().all()
    assert write_rows(lake, "deviations", "site-a", [_deviation("d-new", reason_code="qc_limit")]) == 2
    df = read_table(lake, "deviations").set_index("deviation_id")
    assert df.loc["d-new", "reason_code"] == "qc_limit" and pd.isna(df.loc["d-old", "reason_code"])
    assert table_metadata(lake, "deviations", "site-a")["corelab.schema_version"] == DEVIATIONS.version
    assert delete_rows(lake, "deviations", "site-a", {"deviation_id": "d-old"}) == 1


def test_a_stored_partition_without_a_required_column_is_refused(lake):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"deviation_id": ["d1"]}), buf)
    lake.write_bytes(partition_path("deviations", "site-a"), buf.getvalue())
    with pytest.raises(SchemaViolation, match="lacks required columns"):
        read_table(lake, "deviations")


def test_an_unknown_reason_code_is_refused(lake):
    with pytest.raises(SchemaViolation, match="reason_code='no_such' is not one of"):
        write_rows(lake, "deviations", "site-a", [_deviation("d1", reason_code="no_such")])


def test_update_rows_changes_only_the_matched_row_and_keeps_nulls(lake):
    write_rows(lake, "studies", "site-a", [_study("k1", n_deviations=0), _study("k2", age_years=31.0)])
    path = lake.path(partition_path("studies", "site-a"))
    recount = lambda row: {**row, "n_deviations": 2, "status": "accepted_with_deviations"}  # noqa: E731
    assert update_rows(lake, "studies", "site-a", {"study_key": "k1"}, recount) == 1
    import pyarrow.parquet as pq

    stored = {r["study_key"]: r for r in pq.read_table(path).to_pylist()}
    assert (stored["k1"]["n_deviations"], stored["k1"]["status"]) == (2, "accepted_with_deviations")
    assert stored["k1"]["age_years"] is None and stored["k2"]["age_years"] == 31.0   # null stays null
    before = open(path, "rb").read()
    assert update_rows(lake, "studies", "site-a", {"study_key": "k1"}, recount) == 0  # unchanged: not rewritten
    assert open(path, "rb").read() == before
    assert update_rows(lake, "studies", "site-a", {"study_key": "nope"}, recount) == 0
