"""The lake: every store of a core lab behind one fsspec filesystem (a folder, or S3).

storage    Lake: relative paths, atomic writes, locks; the stores (inbox, deid, bids, ...)
tables     versioned Parquet tables, validated and partitioned by site, upserted atomically
audit      the append-only, hash-chained event log
studies    the Study value, read back from the studies table
export     the biomarker table for statisticians (long, or one row per subject and session)
versions   corelab's version and the software versions every output records

Every stage may use the lake; the lake uses no stage.
"""
