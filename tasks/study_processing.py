"""The per-study steps of ``process_study``: BIDS, pipelines and QC, and recording them.

Each step first looks for what an earlier run already made (a BIDS image with
the series' UID in its sidecar, a ``qc`` verdict for the same pipeline
version) and skips it, so re-running a study changes nothing while a new
pipeline version adds its own rows beside the old ones.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.trial import TrialConfig
from pipelines.spec import PipelineSpec
from tasks import records, tables
from tasks.audit import append_event
from tasks.bids import ConversionError, convert_series, plan_session
from tasks.bids_tables import write_dataset_description, write_participants, write_scans, write_sessions
from tasks.intake import PHILeakError, load_fingerprints
from tasks.processing import SeriesProcessing, gate, measure_quality, read_measures, run_on_image, site_history
from tasks.protocol import Finding
from tasks.qc_records import StudyContextRow, already_judged, biomarker_rows, qc_rows
from tasks.storage import Lake

log = logging.getLogger("corelab.process")


class UnknownStudyError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def study_row(lake: Lake, site: str, study_key: str) -> pd.Series:
    studies = tables.read_table(lake, "studies", [site])
    hit = studies[studies.study_key.str.startswith(study_key)] if len(studies) else studies
    if len(hit) != 1:
        raise UnknownStudyError(f"study {study_key!r} is {'ambiguous' if len(hit) else 'not in'} "
                                f"the studies table of site {site}")
    return hit.iloc[0]


def existing_images(lake: Lake, subject: str, session: str) -> dict[str, str]:
    """series UID -> BIDS image already converted for this session."""
    out = {}
    for rel in lake.find(f"bids/sub-{subject}/ses-{session}"):
        if rel.endswith(".json") and not rel.endswith("_scans.json"):
            uid = json.loads(lake.read_text(rel)).get("SeriesInstanceUID")
            image = rel[: -len(".json")] + ".nii.gz"
            if uid and lake.exists(image):
                out[uid] = image
    return out


def convert_study(lake: Lake, trial: TrialConfig, study: pd.Series) -> tuple[dict[str, str], list[Finding]]:
    """BIDS images of the study's accepted series (converting what is not there yet)."""
    series = tables.read_table(lake, "series", [study.site])
    series = series[series.study_key == study.study_key]
    done = existing_images(lake, study.subject, study.session)
    fingerprints = load_fingerprints(lake, trial, study.site, study.subject, study.session)
    images, findings = {}, []
    for s in plan_session(series, trial):
        if s.series_uid in done:
            log.info("found %s, skipping conversion of series %s", done[s.series_uid], s.series_number)
            images[s.series_uid] = done[s.series_uid]
            continue
        try:
            images[s.series_uid] = convert_series(lake, s, study.subject, study.session, fingerprints).image
        except ConversionError as exc:
            findings.append(Finding(kind="processing_failed", severity="major", series_key=s.series_uid,
                                    observed="conversion", message=f"series {s.series_number}: {exc}"))
    write_dataset_description(lake, trial)
    write_sessions(lake, study.subject)
    write_scans(lake, study.subject, study.session, str(pd.Timestamp(study.acquisition_date).date()))
    write_participants(lake, trial)
    return images, findings


def process_series(lake: Lake, trial: TrialConfig, spec: PipelineSpec, image: str, study: pd.Series,
                   series_uid: str, backend: str, allow_version_mismatch: bool) -> SeriesProcessing:
    """Run, measure and gate one series (never raises for a failed run or a missing output)."""
    sp = run_on_image(lake, spec, image, study.subject, study.session, series_uid, backend,
                      allow_version_mismatch)
    if sp.error is None:
        read_measures(lake, sp)
    measure_quality(lake, sp)
    history = site_history(tables.read_table(lake, "qc", [study.site]), study.site, spec.name,
                           spec.version, series_uid)
    gate(trial, study.site, sp, history)
    return sp


def _context(lake: Lake, study: pd.Series, series_uid: str) -> StudyContextRow:
    series = tables.read_table(lake, "series", [study.site]).set_index("series_uid")
    return StudyContextRow(study.trial_id, study.site, study.study_key, study.subject, study.session,
                           pd.Timestamp(study.acquisition_date).date(), series.loc[series_uid].scanner_epoch)


def record_findings(lake: Lake, study: pd.Series, findings: list[Finding]) -> None:
    """Deviations (and site queries for the major ones) found while processing a study."""
    if not findings:
        return
    ref = records.StudyRef(study.study_key, study.site, study.subject, study.session)
    deviations = records.deviation_rows(ref, findings, datetime.now(timezone.utc))
    tables.write_rows(lake, "deviations", study.site, deviations)
    queries = records.query_rows(ref, deviations)
    if queries:
        tables.write_rows(lake, "queries", study.site, queries)


def record_processing(lake: Lake, trial: TrialConfig, study: pd.Series, sp: SeriesProcessing,
                      flow_run_id: str | None) -> str:
    """qc rows, biomarkers for PASS/WARN, and for a FAIL a deviation, a site query and an audit event."""
    now = datetime.now(timezone.utc)
    st = _context(lake, study, sp.series_uid)
    status = sp.verdict.status if sp.verdict else "FAIL"
    qc = qc_rows(sp, st, flow_run_id, now)
    bio = biomarker_rows(sp, st, status, flow_run_id, now)
    _check_no_phi(lake, trial, study, {"qc": qc, "biomarkers": bio})
    tables.write_rows(lake, "qc", study.site, qc)
    if bio:
        tables.write_rows(lake, "biomarkers", study.site, bio)
    if status == "FAIL":
        reasons = sp.verdict.reasons if sp.verdict else [sp.error or "no verdict"]
        record_findings(lake, study, [Finding(
            kind="qc_fail", severity="major", series_key=sp.series_uid, parameter=sp.pipeline,
            observed=status, message=f"{sp.pipeline} {sp.version} QC FAIL: " + "; ".join(reasons))])
    append_event(lake, "series_processed", series_uid=sp.series_uid, study_key=study.study_key,
                 pipeline=sp.pipeline, version=sp.version, digest=sp.digest, verdict=status,
                 input_sha256=sp.input_sha256, biomarkers=len(bio))
    return status


def _check_no_phi(lake: Lake, trial: TrialConfig, study: pd.Series, payload: object) -> None:
    data = json.dumps(payload, default=str).encode()
    for fp in load_fingerprints(lake, trial, study.site, study.subject, study.session):
        leaks = fp.find_leaks("processing rows", data)
        if leaks:
            raise PHILeakError(f"refusing to write processing rows: {leaks[0].source}")


@task(name="convert-study", cache_policy=NO_CACHE)
def convert_study_task(lake: Lake, trial: TrialConfig, study: pd.Series) -> tuple[dict[str, str], list[Finding]]:
    return convert_study(lake, trial, study)


@task(name="process-series", cache_policy=NO_CACHE)
def process_series_task(lake: Lake, trial: TrialConfig, spec: PipelineSpec, image: str, study: pd.Series,
                        series_uid: str, backend: str, allow_version_mismatch: bool) -> SeriesProcessing:
    return process_series(lake, trial, spec, image, study, series_uid, backend, allow_version_mismatch)


@task(name="record-processing", cache_policy=NO_CACHE)
def record_processing_task(lake: Lake, trial: TrialConfig, study: pd.Series, sp: SeriesProcessing,
                           flow_run_id: str | None) -> str:
    return record_processing(lake, trial, study, sp, flow_run_id)


def skip_if_judged(lake: Lake, study: pd.Series, spec: PipelineSpec, series_uid: str) -> bool:
    if already_judged(lake, study.site, series_uid, spec.name, spec.version):
        log.info("found a %s %s verdict for series %s, skipping", spec.name, spec.version, series_uid[-12:])
        return True
    return False

