"""Flow ``harmonize``: ComBat across sites on the lake's QC-passed biomarkers.

Inputs
    lake_url: the lake; trial_file: the trial YAML (its ``harmonization:``
    section); covariates_file: a CSV/TSV/Parquet keyed by ``subject`` (and
    optionally ``session``) holding the covariates, or none (or empty): the
    lake's own studies table (age, sex, weight, height from the headers); mode: ``fit`` (fit a new
    model on the reference set, then apply it) or ``apply`` (apply the frozen
    model ``model_id``; without one, the trial's promoted model, as the nightly
    deployment does); only_new: skip scans the model already harmonized.
Outputs
    ``models/harmonization/<model_id>/`` (fit), ``tables/biomarkers_harmonized``,
    ``reports/harmonization/*.html|json``, audit events. Returns a summary dict.
    With no model promoted (``corelab harmonize promote MODEL_ID``), ``apply``
    without a model id writes nothing and completes: its summary and the run's
    artifact say that no model is promoted.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from data_contracts.trial import load_trial
from harmonization import model_store
from harmonization.lake import covariates_from_studies, read_biomarkers_task, read_covariates, select_rows
from harmonization.service import apply_lake_task, extend_lake_task, fit_lake_task, skipped, summary_markdown
from tasks.lake.storage import open_lake

QC_USABLE = ["PASS", "WARN"]
ARTIFACT = "harmonization-summary"


@flow(name="harmonize")
def harmonize(lake_url: str, trial_file: str, covariates_file: str | None = None,
              mode: Literal["fit", "apply"] = "fit", model_id: str | None = None,
              only_new: bool = True) -> dict[str, Any]:
    """Fit a versioned ComBat model or apply a frozen one; write harmonized rows and a report."""
    log = get_run_logger()
    lake = open_lake(lake_url)
    trial = load_trial(trial_file)
    settings = trial.harmonization
    summary: dict[str, Any] = {}
    # 0. nightly: the trial's promoted model, or nothing to do
    promoted = None
    if mode == "apply" and not model_id:
        promoted = model_store.current_task(lake, trial.trial_id)
        if promoted is None:
            note = "nothing applied: " + model_store.nothing_promoted(lake, trial.trial_id)
            log.info(note)
            summary["apply"] = skipped(note)
            create_markdown_artifact(key=ARTIFACT, markdown=summary_markdown(summary),
                                     description="harmonization: no model is promoted")
            return summary
        model_id = promoted.model_id
        log.info("applying the promoted model: %s", promoted.describe())
    covariates = (read_covariates(covariates_file) if covariates_file
                  else covariates_from_studies(lake, trial.trial_id))
    # 1. QC-passed biomarkers of this trial
    rows = select_rows(read_biomarkers_task(lake), trial.trial_id, QC_USABLE, pipeline=settings.pipeline)
    # 2. a new model on the reference set, or the frozen one
    if mode == "fit":
        reference = select_rows(rows, None, settings.reference_qc_status, settings.reference_visits)
        source = (f"lake biomarkers of trial {trial.trial_id} (reference set: QC "
                  f"{'/'.join(settings.reference_qc_status)}, visits "
                  f"{', '.join(settings.reference_visits)})")
        model, fitted = fit_lake_task(lake, reference, covariates, settings, source)
        model_id = fitted.model_id
        summary["fit"] = fitted.summary()
        log.info("fitted %s on %d scans; report %s", model_id, fitted.rows, fitted.outputs["report"])
    else:
        model = model_store.load_model_task(lake, model_id)
        # an explicit model may come from a table file; a promoted one is the trial's own
        model_store.check_trial(model, model_id, trial.trial_id, strict=promoted is not None)
    # 3. nightly: a new site or scanner epoch with enough scans is estimated against the promoted
    #    model (a child model that changes nothing harmonized before), and promoted in its place
    if promoted is not None:
        model, child_id, extended = extend_lake_task(lake, model, model_id, rows, covariates, settings)
        if extended is not None:
            summary["extend"] = extended.summary()
            for f in extended.findings:
                log.warning(f.message)
        if child_id != model_id:
            promoted, _ = model_store.promote(lake, child_id, trial.trial_id,
                                              f"nightly extension of {model_id} (promoted by {promoted.actor})")
            log.info("extended %s into %s and promoted it", model_id, child_id)
            model_id = child_id
    # 4. harmonize every QC-passed scan the model can speak for
    applied = apply_lake_task(lake, model, model_id, rows, covariates, settings, only_new)
    summary["apply"] = applied.summary()
    if promoted is not None:
        summary["apply"]["promoted"] = promoted.to_dict()
    for f in applied.findings:
        log.warning(f.message)
    log.info("%d of %d scans harmonized with %s", applied.harmonized, applied.rows, model_id)
    # 5. a summary people find in the Prefect UI, one version per run
    create_markdown_artifact(key=ARTIFACT, markdown=summary_markdown(summary),
                             description=f"harmonization with model {model_id}")
    return summary
