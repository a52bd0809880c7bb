"""ComBat harmonization across sites (neuroHarmonize), model store and report.

inputs       tables in and out (CSV/TSV/Parquet), covariate encoding, HarmonizationData
checks       the honest refusals: NaN/constant features, small sites, missing and confounded covariates
combat       fit (every neuroCombat variant; ComBat-GAM via gam) and the frozen-model apply
extend       new batches estimated against a frozen model: a child model, nothing harmonized moves
longitudinal longitudinal ComBat's mixed model (random subject intercept) in closed form
gam          neuroHarmonize's smooth-term GAM for all features at once
model_store  versioned models under models/harmonization/<model_id>/
diagnostics  site effect and biology before/after, PCA, per-site summaries
validation   held-out k-fold site effect, scale test, multivariate site prediction, EB prior fit, balance
report       the JSON report and its self-contained HTML (figures, report_spec.yaml, report.html.j2)
lake         biomarkers (long) <-> ComBat (wide) <-> biomarkers_harmonized
service      fit/apply on a table file or on the lake; cli: ``corelab harmonize``
abide        the ABIDE I FreeSurfer 6 table of ../shared/data, for tests and bench
"""
