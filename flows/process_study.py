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
thread pool by default; Dask with ``--runner dask``), in two waves: a pipeline that takes another's
outputs (its spec's ``upstream``: the dwi pipeline takes the anat pipeline's T1 and tissue labels)
runs after the others, given the outputs of the first series of the session the other pipeline
judged PASS or WARN, in this run or an earlier one; with none it runs without them.

A pipeline that could not run at all (no container engine on this worker, a refused image, an
environment that differs from the lock) is not a verdict: the other series go on, then the run
fails (red in Prefect) with
:class:`~tasks.qc.record.PipelinesNotRun`, no ``qc`` row, deviation or site query is written for
that series, and the nightly run picks it up again.
"""

from __future__ import annotations

from prefect import flow

from data_contracts.trial import TrialConfig, load_trial
from flows.runtime import flow_run_id, load_secrets, trial_secrets
from pipelines.registry import get_spec, names
from pipelines.spec import PipelineSpec
from tasks.bids.convert import convert_study_task
from tasks.bids.deface import deface_study_task, verify_brain_untouched_task
from tasks.conformance.findings import record_findings
from tasks.lake.storage import Lake, open_lake
from tasks.lake.studies import Study, read_study
from tasks.qc.measure import SeriesQC, judge_series_task
from tasks.qc.record import (
    NotRun,
    PipelinesNotRun,
    judged_status,
    record_not_run,
    record_series_task,
    skip_if_judged,
)
from tasks.run.derivatives import image_entities, lake_outputs, run_on_image_task, upstream_inputs
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
    done: list[SeriesQC] = []
    not_run: list[NotRun] = []
    # 3-7 in two waves: the pipelines that take another's outputs (dwi: the session's T1
    # segmentation) run after the others, with the first series those judged usable
    for wave in ([w for w in work if not w[0].upstream], [w for w in work if w[0].upstream]):
        upstream = upstream_inputs_of(lake, study, work, done, wave)
        _run_wave(lake, trial, site, study, wave, defaced, backend, allow_version_mismatch, threads,
                  upstream, done, not_run)
    if not_run:
        raise PipelinesNotRun(not_run)
    return done


Work = list[tuple[PipelineSpec, str, str]]      # (pipeline, series UID, BIDS image)


def upstream_inputs_of(lake: Lake, study: Study, work: Work, done: list[SeriesQC], wave: Work
                       ) -> dict[str, dict[str, str]]:
    """Per pipeline of ``wave``: the upstream outputs it takes (empty when it takes none)."""
    status = {(sq.run.pipeline, sq.run.series_uid): sq.verdict.status if sq.verdict else "FAIL" for sq in done}
    out = {}
    for spec in {w[0].name: w[0] for w in wave if w[0].upstream}.values():
        usable: dict[str, list[str]] = {}
        for producer, uid, image in work:
            if producer.name in {u.pipeline for u in spec.upstream}:
                verdict = status.get((producer.name, uid)) or judged_status(lake, study.site, uid, producer.name,
                                                                           producer.version)
                if verdict in ("PASS", "WARN"):
                    usable.setdefault(producer.name, []).append(image)
        out[spec.name] = upstream_inputs(spec, study.subject, study.session, usable)
    return out


def _run_wave(lake: Lake, trial: TrialConfig, site: str, study: Study, wave: Work, defaced: dict,
              backend: str, allow_version_mismatch: bool, threads: int | None, upstream: dict[str, dict[str, str]],
              done: list[SeriesQC], not_run: list[NotRun]) -> None:
    # 3. skip what this pipeline version already judged; 4. run the others side by side
    runs = {(spec.name, uid): run_on_image_task.submit(lake, spec, image, study.subject, study.session, uid,
                                                        backend, allow_version_mismatch, threads,
                                                        upstream.get(spec.name))
            for spec, uid, image in wave if not skip_if_judged(lake, study, spec, uid)}
    for spec, uid, image in wave:
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
