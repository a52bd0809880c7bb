"""The stages of corelab, one package per stage, in the order a study's data flows.

A stage imports only the stages before it (plus ``lake`` and ``errors``), never one after
it: ``lint-imports`` checks this in ``make test`` (contract in pyproject.toml).

lake/          the stores (fsspec), Parquet tables, the audit chain, exports, the Study value
intake/        1. what arrived: inventory, custody (inbox, quarantine), whose study it is
deid/          2. PS3.15 Annex E de-identification and its independent verification
conformance/   3. protocol: the Finding type, parameters, series types, scanner, visit, completeness
receive/       4. one study through 1-3 at arrival, and its rows (studies, series, deviations, queries)
bids/          5. dcm2niix into the BIDS raw dataset, and the dataset's own files
run/           6. pinned pipelines in containers (or the proven-equal local environment)
qc/            7. QC metrics, the per-site gate, qc and biomarker rows, reviewer overrides

Each module holds pure functions with thin ``@task`` wrappers at the bottom; the pure
functions are tested without Prefect.
"""
