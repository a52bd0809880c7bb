"""Rows of the ``qc`` and ``biomarkers`` tables for one processed series, and writing them.

Only a series whose verdict in force is PASS or WARN has biomarker rows; a FAIL keeps its
``qc`` rows (every metric and reason) and raises a deviation, a site query and an audit event.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.reasons import codes_in
from data_contracts.trial import TrialConfig
from pipelines.registry import get_spec
from pipelines.registry import names as pipeline_names
from pipelines.spec import PipelineSpec
from tasks.bids.convert import existing_images, plan_session
from tasks.conformance.findings import Finding, count_deviations, record_findings
from tasks.deid.fingerprint import load_fingerprints
from tasks.deid.verify import check_no_phi
from tasks.errors import TRANSIENT_RETRIES, CorelabError
from tasks.lake import tables
from tasks.lake.audit import append_event
from tasks.lake.storage import Lake
from tasks.lake.studies import Study, read_study
from tasks.qc.measure import SeriesQC
from tasks.qc.queries import resolve_by_resend
from tasks.run.derivatives import PipelineRun

log = logging.getLogger("corelab.qc")


def qc_rows(sq: SeriesQC, study: Study, flow_run_id: str | None, now: datetime) -> list[dict[str, Any]]:
    """One row per metric, plus the ``verdict`` row whose reason lists every reason."""
    v, run = sq.verdict, sq.run
    assert v is not None, "gate the series before recording it"
    common = {"series_uid": run.series_uid, "study_key": study.study_key, "subject": study.subject,
              "session": study.session, "pipeline_name": run.pipeline, "pipeline_version": run.version,
              "verdict": v.status, "automatic_verdict": v.status, "input_sha256": run.input_sha256,
              "container_digest": run.digest or None, "backend": run.backend or None,
              "environment_sha256": run.environment_sha256 or None, "flow_run_id": flow_run_id, "created_at": now}
    rows = [{**common, "metric": m.metric, "value": _finite(m.value), "status": m.status,
             "reason": m.reason, "reason_code": m.code, "robust_z": _finite(m.z)} for m in v.metrics]
    rows.append({**common, "metric": "verdict", "value": None, "status": v.status,
                 "reason": "; ".join(v.reasons) or None, "reason_code": v.reason_code, "robust_z": None})
    return rows


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def biomarker_rows(run: PipelineRun, study: Study, scanner_epoch: str, qc_status: str,
                   flow_run_id: str | None, now: datetime) -> list[dict[str, Any]]:
    if qc_status not in ("PASS", "WARN"):
        return []
    return [{"trial_id": study.trial_id, "subject": study.subject, "session": study.session,
             "acquisition_date": study.acquisition_date, "scanner_epoch": scanner_epoch,
             "series_uid": run.series_uid, "measure": m["measure"], "value": m["value"], "unit": m["unit"],
             "qc_status": qc_status, "pipeline_name": run.pipeline, "pipeline_version": run.version,
             "container_digest": run.digest or None, "backend": run.backend or None,
             "environment_sha256": run.environment_sha256 or None, "input_sha256": run.input_sha256,
             "flow_run_id": flow_run_id, "created_at": now} for m in run.measures if math.isfinite(m["value"])]


def judged_status(lake: Lake, site: str, series_uid: str, pipeline: str, version: str) -> str | None:
    """The verdict (``PASS``/``WARN``/``FAIL``) this pipeline version gave the series, or None."""
    qc = tables.read_table(lake, "qc", [site])
    if qc.empty:
        return None
    hit = qc[(qc.series_uid == series_uid) & (qc.pipeline_name == pipeline)
             & (qc.pipeline_version == version) & (qc.metric == "verdict")]
    return None if hit.empty else str(hit.iloc[-1].status)


def already_judged(lake: Lake, site: str, series_uid: str, pipeline: str, version: str) -> bool:
    return judged_status(lake, site, series_uid, pipeline, version) is not None


def skip_if_judged(lake: Lake, study: Study, spec: PipelineSpec, series_uid: str) -> bool:
    """True (and say so) when this pipeline version has already judged the series."""
    if already_judged(lake, study.site, series_uid, spec.name, spec.version):
        log.info("found a %s %s verdict for series %s, skipping", spec.name, spec.version, series_uid[-12:])
        return True
    return False


def series_scanner_epoch(lake: Lake, site: str, series_uid: str) -> str:
    series = tables.read_table(lake, "series", [site]).set_index("series_uid")
    return str(series.loc[series_uid].scanner_epoch)


def record_series(lake: Lake, trial: TrialConfig, study: Study, sq: SeriesQC, flow_run_id: str | None) -> str:
    """qc rows, biomarkers for PASS/WARN, and for a FAIL a deviation, a site query and an audit event.

    The qc rows go last: their verdict row is what :func:`skip_if_judged` and the nightly selection
    read as "done", so a process killed before it leaves the series to be judged again (its
    biomarker, deviation and query rows are upserts by key), never judged without its biomarkers.
    A PASS then resolves the FAIL queries a re-send of the series answers (:mod:`tasks.qc.queries`).
    """
    now = datetime.now(timezone.utc)
    run = sq.run
    status = sq.verdict.status if sq.verdict else "FAIL"
    qc = qc_rows(sq, study, flow_run_id, now)
    epoch = series_scanner_epoch(lake, study.site, run.series_uid)
    bio = biomarker_rows(run, study, epoch, status, flow_run_id, now)
    check_no_phi("processing rows", {"qc": qc, "biomarkers": bio},
                 load_fingerprints(lake, trial, study.site, study.subject, study.session))
    if bio:
        tables.write_rows(lake, "biomarkers", study.site, bio)
    if status == "FAIL":
        reasons = sq.verdict.reasons if sq.verdict else [run.error or "no verdict"]
        code = sq.verdict.reason_code if sq.verdict else run.error_code
        record_findings(lake, study, [Finding(
            kind="qc_fail", severity="major", series_key=run.series_uid, parameter=run.pipeline,
            observed=status, message=f"{run.pipeline} {run.version} QC FAIL: " + "; ".join(reasons),
            reason_code=code)])
    log.info("%s %s on series %s: %s%s", run.pipeline, run.version, run.series_uid[-12:], status,
             "".join(f"; {r}" for r in (sq.verdict.reasons if sq.verdict else [])))
    append_event(lake, "series_processed", series_uid=run.series_uid, study_key=study.study_key,
                 pipeline=run.pipeline, version=run.version, digest=run.digest, verdict=status,
                 input_sha256=run.input_sha256, biomarkers=len(bio))
    tables.write_rows(lake, "qc", study.site, qc)
    if status == "PASS":  # a re-send that passes answers the FAIL queries of its kind in this visit
        for qid in resolve_by_resend(lake, study.site, study.subject, study.session, run.pipeline, run.series_uid):
            log.info("query %s resolved: a re-sent series passed", qid)
    return status


@dataclass(frozen=True)
class NotRun:
    """A pipeline that could not run on a series (nothing was learnt about the data)."""

    series_uid: str
    pipeline: str
    version: str
    backend: str
    code: str          # data_contracts.reasons, category infrastructure
    message: str


class PipelinesNotRun(CorelabError):
    """One or more pipelines of a study could not run on this worker: the run fails, retryable.

    No verdict, deviation or site query is written for those series; the nightly run
    (:mod:`tasks.qc.due`) finds them without a verdict and tries again.
    """

    code = "run_refused"

    def __init__(self, not_run: list[NotRun]) -> None:
        self.not_run = not_run
        lines = "; ".join(f"series {n.series_uid[-12:]}: {n.message}" for n in not_run)
        super().__init__(f"{len(not_run)} pipeline run(s) could not start on this worker, no verdict "
                         f"recorded (the nightly run tries again): {lines}", not_run[0].code)

    @property
    def retryable(self) -> bool:  # not within seconds (Prefect's task retries), but tonight
        return False


def record_not_run(lake: Lake, study: Study, spec: PipelineSpec, series_uid: str, backend: str,
                   exc: CorelabError) -> NotRun:
    """Log and audit a pipeline that could not run; nothing is written to the tables."""
    n = NotRun(series_uid, spec.name, spec.version, backend, exc.code, f"{spec.name} {spec.version} not run "
               f"on backend {backend!r}: {exc}")
    log.error("%s (%s): no verdict recorded; the nightly run tries again", n.message, n.code)
    append_event(lake, "pipeline_not_run", series_uid=series_uid, study_key=study.study_key,
                 pipeline=spec.name, version=spec.version, backend=backend, reason_code=exc.code)
    return n


# A FAIL whose deciding reason is one of these says the pipeline never ran (no engine, a refused
# image). Versions before PipelinesNotRun recorded such FAILs; clear_retryable withdraws them.
NOT_RUN = codes_in("infrastructure")


def failures_after_intake(lake: Lake, trial: TrialConfig, study: Study) -> list[str]:
    """What of a study failed after intake, one line per series, as the lake holds it now.

    A series the protocol wants in BIDS that has no BIDS image (with the deviation that says
    why), and every current FAIL verdict of a pipeline. Read from the tables, not from one run,
    so sending the same upload again reports what is still failed, not "nothing new".
    """
    series = tables.read_table(lake, "series", [study.site])
    series = series[series.study_key == study.study_key]
    converted = existing_images(lake, study.subject, study.session)
    deviations = tables.read_table(lake, "deviations", [study.site])
    lines = []
    for s in plan_session(series, trial):
        if s.series_uid in converted:
            continue
        why = deviations[(deviations.series_uid == s.series_uid) & (deviations.kind == "processing_failed")
                         & (deviations.observed == "conversion")] if len(deviations) else deviations
        reason = why.sort_values("created_at").message.iloc[-1] if len(why) else "not converted yet"
        lines.append(f"series {s.series_number}: not in BIDS: {reason}")
    qc = tables.read_table(lake, "qc", [study.site])
    if len(qc):
        # only the pipeline versions this installation runs: a FAIL of an older version is history
        current = {(n, get_spec(n).version) for n in pipeline_names()}
        is_current = pd.Series([(p, v) in current for p, v in zip(qc.pipeline_name, qc.pipeline_version)],
                               index=qc.index, dtype=bool)
        failed = qc[(qc.study_key == study.study_key) & (qc.metric == "verdict") & (qc.verdict == "FAIL")
                    & is_current]
        number = dict(zip(series.series_uid, series.series_number))
        for row in failed.sort_values(["pipeline_name", "pipeline_version", "series_uid"]).itertuples():
            lines.append(f"series {number.get(row.series_uid, row.series_uid[-12:])}: "
                         f"{row.pipeline_name} {row.pipeline_version} QC FAIL: {row.reason or row.reason_code}")
    return lines


def clear_retryable(lake: Lake, site: str) -> int:
    """Withdraw the FAIL verdicts of runs that never started, with their deviations and queries.

    Such a verdict (written before :class:`PipelinesNotRun` existed) said nothing about the data:
    its ``qc`` rows are deleted, its ``qc_fail`` deviation too, and the site query raised for it is
    closed, so tonight's run processes the series again and no site is asked to re-send it.
    """
    qc = tables.read_table(lake, "qc", [site])
    if qc.empty:
        return 0
    failed = qc[(qc.metric == "verdict") & (qc.verdict == "FAIL") & qc.override_by.isna()
                & qc.reason_code.isin(NOT_RUN)]
    deviations = tables.read_table(lake, "deviations", [site])
    for row in failed.itertuples():
        tables.delete_rows(lake, "qc", site, {"series_uid": row.series_uid,
                                              "pipeline_name": row.pipeline_name,
                                              "pipeline_version": row.pipeline_version})
        if deviations.empty:
            continue
        hit = deviations[(deviations.kind == "qc_fail") & (deviations.series_uid == row.series_uid)
                         & (deviations.parameter == row.pipeline_name) & deviations.reason_code.isin(NOT_RUN)]
        for dev in hit.itertuples():
            tables.update_rows(lake, "queries", site, {"deviation_id": dev.deviation_id},
                               lambda q: {**q, "status": "closed"})
            tables.delete_rows(lake, "deviations", site, {"deviation_id": dev.deviation_id})
            append_event(lake, "verdict_withdrawn", series_uid=row.series_uid, study_key=row.study_key,
                         pipeline=row.pipeline_name, version=row.pipeline_version, reason_code=row.reason_code,
                         deviation_id=dev.deviation_id)
        if not hit.empty:
            count_deviations(lake, read_study(lake, site, row.study_key))
    return len(failed)


@task(name="record-series", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def record_series_task(lake: Lake, trial: TrialConfig, study: Study, sq: SeriesQC,
                       flow_run_id: str | None) -> str:
    return record_series(lake, trial, study, sq, flow_run_id)
