"""Stage 7, QC: metrics, the per-site gate, and the qc and biomarker tables.

metrics    the catalogue of image quality metrics (pure functions on arrays)
measure    load a series' images, compute its metrics (SeriesQC), judge it
gate       PASS, WARN or FAIL with every reason: rules, per-site overrides, robust z-score
record     qc and biomarker rows of a series, deviations and queries for a FAIL
overrides  a reviewer's verdict, and the biomarkers following it
"""
