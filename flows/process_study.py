"""Flow ``process_study``: a received study becomes BIDS, pinned-pipeline derivatives,
QC verdicts and biomarker rows.

Inputs: the study key (or a unique prefix), its site, the trial file, the lake, the
container backend and the threads each pipeline run may use (default: the pipeline's own).
Outputs: ``bids/`` images and tables, a defaced copy of each head image
(``derivatives/deface-<version>/``, its brain check done once a pipeline made a brain mask),
``derivatives/<pipeline>-<version>/`` with each run's provenance, rows in ``qc`` and (PASS/WARN only) ``biomarkers``,
deviations and site queries for failures, audit events. Returns one
:class:`~tasks.qc.measure.SeriesQC` per series processed in this run (skipped ones are not).

The pipeline runs of a study's series are submitted side by side to the flow's task runner (a
thread pool by default; Dask with ``--runner dask``). A pipeline that could not run at all (no
container engine on this worker, a refused image, an environment that differs from the lock) is
not a verdict: the other series go on, then the run fails (red in Prefect) with
:class:`~tasks.qc.record.PipelinesNotRun`, no ``qc`` row, deviation or site query is written for
that series, and the nightly run picks it up again.
"""

from __future__ import annotations

from prefect import flow

from data_contracts.trial import TrialConfig, load_trial
from flows.runtime import flow_run_id, load_secrets, trial_secrets
from pipelines.registry import get_spec, names
from tasks.bids.convert import convert_study_task
from tasks.bids.deface import deface_study_task, verify_brain_untouched_task
from tasks.conformance.findings import record_findings
from tasks.lake.storage import open_lake
from tasks.lake.studies import read_study
from tasks.qc.measure import SeriesQC, judge_series_task
from tasks.qc.record import NotRun, PipelinesNotRun, record_not_run, record_series_task, skip_if_judged
from tasks.run.derivatives import image_entities, lake_outputs, run_on_image_task
from tasks.run.engines import ContainerRunError


@flow(name="process_study")
def process_study(study_key: str, site: str, trial_file: str | None = None, lake_url: str | None = None,
                  backend: str = "local", allow_version_mismatch: bool = False,
                  pipelines: list[str] | None = None, trial: TrialConfig | None = None,
                  threads: int | None = None) -> list[SeriesQC]:
    """Process one received study (see module docstring)."""
    trial = trial or load_trial(trial_file or "trial.yaml")
    load_secrets(trial_secrets(trial, lake_url))  # from Prefect Secret blocks when not in the environment
    lake = open_lake(lake_url)
    study = read_study(lake, site, study_key)
    specs = [get_spec(name) for name in (pipelines or names())]

    # 1. BIDS raw dataset: every accepted series of a known type
    images, findings = convert_study_task(lake, trial, study)
    record_findings(lake, study, findings)
    # 2. a defaced copy of every head image (what may leave the restricted stores)
    defaced = deface_study_task(lake, trial, images)
    work = [(spec, uid, image) for spec in specs for uid, image in sorted(images.items())
            if any(q.matches(image.removeprefix("bids/")) for q in spec.inputs)]
    # 3. skip what this pipeline version already judged; 4. run the others side by side
    runs = {(spec.name, uid): run_on_image_task.submit(lake, spec, image, study.subject, study.session, uid,
                                                        backend, allow_version_mismatch, threads)
            for spec, uid, image in work if not skip_if_judged(lake, study, spec, uid)}
    done: list[SeriesQC] = []
    not_run: list[NotRun] = []
    for spec, uid, image in work:
        future = runs.get((spec.name, uid))
        if future is not None:
            try:
                run = future.result()
            except ContainerRunError as exc:  # never ran: no verdict, no query; the run ends red
                not_run.append(record_not_run(lake, study, spec, uid, backend, exc))
                continue
            # 5. measure quality, gate on the site's rules and history
            sq = judge_series_task(lake, trial, site, spec, run)
            # 6. record: qc, biomarkers (PASS/WARN), queries for FAIL, audit
            record_series_task(lake, trial, study, sq, flow_run_id())
            done.append(sq)
        # 7. the defacing left the brain whole (once per copy, whenever a brain mask exists)
        if defaced.get(uid):
            brain = lake_outputs(spec, study.subject, study.session, image_entities(image)).get("brain_mask")
            if brain:
                verify_brain_untouched_task(lake, trial, image, brain)
    if not_run:
        raise PipelinesNotRun(not_run)
    return done
