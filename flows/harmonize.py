"""Flow ``harmonize``: ComBat across sites on the lake's QC-passed biomarkers.

Inputs
    lake_url: the lake; trial_file: the trial YAML (its ``harmonization:``
    section); covariates_file: a CSV/TSV/Parquet keyed by ``subject`` (and
    optionally ``session``) holding the covariates; mode: ``fit`` (fit a new
    model on the reference set, then apply it) or ``apply`` (apply the frozen
    model ``model_id``, nightly); only_new: skip scans the model already harmonized.
Outputs
    ``models/harmonization/<model_id>/`` (fit), ``tables/biomarkers_harmonized``,
    ``reports/harmonization/*.html|json``, audit events. Returns a summary dict.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from data_contracts.trial import load_trial
from harmonization.lake import read_biomarkers_task, read_covariates, select_rows
from harmonization.model_store import load_model_task
from harmonization.service import apply_lake_task, fit_lake_task, summary_markdown
from tasks.lake.storage import open_lake

QC_USABLE = ["PASS", "WARN"]


@flow(name="harmonize")
def harmonize(lake_url: str, trial_file: str, covariates_file: str,
              mode: Literal["fit", "apply"] = "fit", model_id: str | None = None,
              only_new: bool = True) -> dict[str, Any]:
    """Fit a versioned ComBat model or apply a frozen one; write harmonized rows and a report."""
    log = get_run_logger()
    lake = open_lake(lake_url)
    trial = load_trial(trial_file)
    settings = trial.harmonization
    covariates = read_covariates(covariates_file)
    # 1. QC-passed biomarkers of this trial
    rows = select_rows(read_biomarkers_task(lake), trial.trial_id, QC_USABLE)
    # 2. a new model on the reference set, or the frozen one
    summary: dict[str, Any] = {}
    if mode == "fit":
        reference = select_rows(rows, None, settings.reference_qc_status, settings.reference_visits)
        model, fitted = fit_lake_task(lake, reference, covariates, settings)
        model_id = fitted.model_id
        summary["fit"] = fitted.summary()
        log.info("fitted %s on %d scans; report %s", model_id, fitted.rows, fitted.outputs["report"])
    elif model_id:
        model = load_model_task(lake, model_id)
    else:
        raise ValueError("mode 'apply' needs model_id")
    # 3. harmonize every QC-passed scan the model can speak for
    applied = apply_lake_task(lake, model, model_id, rows, covariates, settings, only_new)
    summary["apply"] = applied.summary()
    for f in applied.findings:
        log.warning(f.message)
    log.info("%d of %d scans harmonized with %s", applied.harmonized, applied.rows, model_id)
    # 4. a summary people find in the Prefect UI, one version per run
    create_markdown_artifact(key="harmonization-summary", markdown=summary_markdown(summary),
                             description=f"harmonization with model {model_id}")
    return summary
