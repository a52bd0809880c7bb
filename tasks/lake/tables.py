"""Parquet tables in the lake: validated, partitioned by site, written atomically.

A partition is one file, ``tables/<table>/site=<site>/part-0.parquet``. A write
merges the new rows into the partition by primary key (a row with an existing
key replaces the old one), validates the result against the table's schema and
replaces the file in one atomic step, so a reader sees the old table or the new
one, never half of either, and a refused write leaves the old one in place. A
merge that changes nothing does not touch the file, which keeps re-ingest a no-op.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.schemas import TABLES, TableSchema
from tasks.errors import CorelabError
from tasks.lake.storage import Lake
from tasks.lake.versions import software_versions

PART_FILE = "part-0.parquet"


class SchemaViolation(CorelabError, ValueError):
    """Rows that do not meet their table's contract; nothing was written."""

    code = "schema_violation"


def partition_path(table: str, site: str) -> str:
    _check_site(site)
    return f"tables/{table}/site={site}/{PART_FILE}"


def _check_site(site: str) -> None:
    if not site or "/" in site or "=" in site or site.startswith("."):
        raise SchemaViolation(f"site {site!r} cannot name a table partition")


def to_arrow(rows: Iterable[Mapping[str, Any]], spec: TableSchema) -> pa.Table:
    """Validate rows against ``spec`` and return them as an Arrow table.

    Raises
    ------
    SchemaViolation
        Unknown or missing columns, a value of the wrong type, a null in a
        required column, a value outside an enumeration, a NaN, or a duplicate key.
    """
    rows = [dict(r) for r in rows]
    where = f"table {spec.name!r} (schema {spec.version})"
    for i, row in enumerate(rows):
        extra = set(row) - set(spec.columns) - {"site"}
        if extra:
            raise SchemaViolation(f"{where}, row {i}: unknown columns {sorted(extra)}")
        for col in spec.required:
            v = row.get(col)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                raise SchemaViolation(f"{where}, row {i}: required column {col!r} is empty")
        for col, allowed in spec.allowed.items():
            v = row.get(col)
            if v is not None and v not in allowed:
                raise SchemaViolation(
                    f"{where}, row {i}: {col}={v!r} is not one of {sorted(allowed)}")
        for col, v in row.items():
            if isinstance(v, float) and math.isnan(v) and col in spec.required:
                raise SchemaViolation(f"{where}, row {i}: {col} is NaN")
    try:
        table = pa.Table.from_pylist(
            [{c: r.get(c) for c in spec.columns} for r in rows], schema=spec.schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        raise SchemaViolation(f"{where}: {exc}") from exc
    _check_unique(table, spec, where)
    return table


def _check_unique(table: pa.Table, spec: TableSchema, where: str) -> None:
    if table.num_rows == 0:
        return
    keys = table.select(list(spec.primary_key)).to_pandas()
    dup = keys.duplicated(keep=False)
    if dup.any():
        first = keys[dup].iloc[0].to_dict()
        raise SchemaViolation(f"{where}: duplicate primary key {first}")


def _file_metadata(spec: TableSchema) -> dict[bytes, bytes]:
    return {
        b"corelab.table": spec.name.encode(),
        b"corelab.schema_version": spec.version.encode(),
        b"corelab.software": json.dumps(dict(software_versions()), sort_keys=True).encode(),
    }


def read_partition(lake: Lake, table: str, site: str) -> pa.Table | None:
    """One site's partition in the table's current schema (None when there is none yet)."""
    rel = partition_path(table, site)
    if not lake.exists(rel):
        return None
    return conform(pq.read_table(io.BytesIO(lake.read_bytes(rel))), TABLES[table])


def conform(table: pa.Table, spec: TableSchema) -> pa.Table:
    """A stored partition in the current schema: columns added since it was written are null.

    Raises
    ------
    SchemaViolation
        The partition lacks a required column, or a column cannot be cast to its type.
    """
    missing = [c for c in spec.columns if c not in table.column_names]
    required = sorted(set(missing) & set(spec.required))
    if required:
        raise SchemaViolation(f"existing partition of {spec.name!r} lacks required columns {required} "
                              f"of schema {spec.version}")
    for name in missing:
        table = table.append_column(spec.schema.field(name), pa.nulls(table.num_rows, spec.schema.field(name).type))
    try:
        return table.select(spec.columns).cast(spec.schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SchemaViolation(f"existing partition of {spec.name!r} does not match schema {spec.version}: "
                              f"{exc}") from exc


def write_rows(lake: Lake, table: str, site: str, rows: Iterable[Mapping[str, Any]]) -> int:
    """Upsert ``rows`` into one site's partition of ``table``.

    Returns the number of rows in the partition afterwards. The schema is
    checked on the merged result, so a bad row refuses the whole write and the
    previous file stays as it was.
    """
    spec = TABLES[table]
    new = to_arrow(rows, spec)
    with lake.lock(f"table-{table}-{site}"):
        old = read_partition(lake, table, site)
        merged = _merge(old, new, spec)
        if old is not None and _same_rows(old, merged, spec):
            return old.num_rows
        _write_partition(lake, table, site, merged, spec)
    return merged.num_rows


def update_rows(lake: Lake, table: str, site: str, where: Mapping[str, Any],
                change: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Change, under the partition's lock, the rows whose columns equal ``where``; returns how many changed.

    ``change`` gets each row as stored (nulls as None) and returns it changed; a read-modify-write
    of a row (a count recomputed after the fact) cannot lose a write made meanwhile.
    """
    spec = TABLES[table]
    with lake.lock(f"table-{table}-{site}"):
        old = read_partition(lake, table, site)
        if old is None or old.num_rows == 0:
            return 0
        hit = [r for r in old.to_pylist() if all(r.get(k) == v for k, v in where.items())]
        new = [change(dict(r)) for r in hit]
        changed = [n for n, r in zip(new, hit) if n != r]
        if changed:
            _write_partition(lake, table, site, _merge(old, to_arrow(changed, spec), spec), spec)
    return len(changed)


def _write_partition(lake: Lake, table: str, site: str, data: pa.Table, spec: TableSchema) -> None:
    buf = io.BytesIO()
    pq.write_table(data.replace_schema_metadata(_file_metadata(spec)), buf, compression="zstd")
    lake.write_bytes(partition_path(table, site), buf.getvalue())


def delete_rows(lake: Lake, table: str, site: str, where: Mapping[str, Any]) -> int:
    """Remove the rows of one site's partition whose columns equal ``where``; returns how many.

    Used when a decision withdraws data (a reviewer fails a series: its
    biomarkers go). The partition is rewritten atomically like any write.
    """
    spec = TABLES[table]
    unknown = set(where) - set(spec.columns)
    if unknown:
        raise SchemaViolation(f"table {table!r} has no columns {sorted(unknown)}")
    with lake.lock(f"table-{table}-{site}"):
        old = read_partition(lake, table, site)
        if old is None or old.num_rows == 0:
            return 0
        cols = {k: old.column(k).to_pylist() for k in where}
        keep = [not all(cols[k][i] == v for k, v in where.items()) for i in range(old.num_rows)]
        removed = keep.count(False)
        if removed:
            _write_partition(lake, table, site, old.filter(pa.array(keep, pa.bool_())), spec)
    return removed


def _merge(old: pa.Table | None, new: pa.Table, spec: TableSchema) -> pa.Table:
    if old is None or old.num_rows == 0:
        merged = new
    else:
        new_keys = set(_key_tuples(new, spec))
        keep = [k not in new_keys for k in _key_tuples(old, spec)]
        merged = pa.concat_tables([old.filter(pa.array(keep, pa.bool_())), new])
    order = [(c, "ascending") for c in spec.primary_key]
    return merged.sort_by(order)


def _key_tuples(table: pa.Table, spec: TableSchema) -> list[tuple]:
    cols = [table.column(c).to_pylist() for c in spec.primary_key]
    return list(zip(*cols))


def _same_rows(a: pa.Table, b: pa.Table, spec: TableSchema) -> bool:
    return a.num_rows == b.num_rows and a.equals(b.select(spec.columns))


def read_table(lake: Lake, table: str, sites: Iterable[str] | None = None) -> pd.DataFrame:
    """All partitions of ``table`` (or only ``sites``) as one DataFrame with a ``site`` column."""
    spec = TABLES[table]
    base = f"tables/{table}"
    frames = []
    wanted = set(sites) if sites is not None else None
    for entry in lake.listdir(base):
        if not entry.startswith("site="):
            continue
        site = entry.split("=", 1)[1]
        if wanted is not None and site not in wanted:
            continue
        part = read_partition(lake, table, site)
        if part is None:
            continue
        df = part.to_pandas()
        df.insert(0, "site", site)
        frames.append(df)
    if not frames:
        empty = spec.schema.empty_table().to_pandas()
        empty.insert(0, "site", pd.Series(dtype="object"))
        return empty
    return pd.concat(frames, ignore_index=True)


def table_metadata(lake: Lake, table: str, site: str) -> dict[str, Any]:
    """The corelab metadata stored in one partition's Parquet footer."""
    md = pq.read_schema(io.BytesIO(lake.read_bytes(partition_path(table, site)))).metadata or {}
    out = {k.decode(): v.decode() for k, v in md.items() if k.startswith(b"corelab.")}
    if "corelab.software" in out:
        out["corelab.software"] = json.loads(out["corelab.software"])
    return out
