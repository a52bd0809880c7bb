"""Rows of the ``qc`` and ``biomarkers`` tables for one processed series, and reviewer overrides.

Only a series whose verdict in force is PASS or WARN has biomarker rows; a
FAIL keeps its ``qc`` rows (every metric and reason) and raises a site query.
A reviewer's override is written into the ``qc`` rows (who, when, why, and the
gate's own verdict beside it) and the ``biomarkers`` table follows it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

import pandas as pd

from tasks import tables
from tasks.audit import append_event
from tasks.processing import SeriesProcessing
from tasks.storage import Lake


class OverrideError(ValueError):
    """An override that names no processed series, or more than one."""


@dataclass(frozen=True)
class StudyContextRow:
    """What a biomarker row says about its study (from the ``studies``/``series`` tables)."""

    trial_id: str
    site: str
    study_key: str
    subject: str
    session: str
    acquisition_date: date
    scanner_epoch: str


def qc_rows(sp: SeriesProcessing, st: StudyContextRow, flow_run_id: str | None,
            now: datetime) -> list[dict[str, Any]]:
    """One row per metric, plus the ``verdict`` row whose reason lists every reason."""
    v = sp.verdict
    assert v is not None, "gate the series before recording it"
    common = {"series_uid": sp.series_uid, "study_key": st.study_key, "subject": st.subject,
              "session": st.session, "pipeline_name": sp.pipeline, "pipeline_version": sp.version,
              "verdict": v.status, "automatic_verdict": v.status, "input_sha256": sp.input_sha256,
              "container_digest": sp.digest or None, "flow_run_id": flow_run_id, "created_at": now}
    rows = [{**common, "metric": m.metric, "value": _finite(m.value), "status": m.status,
             "reason": m.reason, "robust_z": _finite(m.z)} for m in v.metrics]
    rows.append({**common, "metric": "verdict", "value": None, "status": v.status,
                 "reason": "; ".join(v.reasons) or None, "robust_z": None})
    return rows


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def biomarker_rows(sp: SeriesProcessing, st: StudyContextRow, qc_status: str, flow_run_id: str | None,
                   now: datetime) -> list[dict[str, Any]]:
    if qc_status not in ("PASS", "WARN"):
        return []
    return [{"trial_id": st.trial_id, "subject": st.subject, "session": st.session,
             "acquisition_date": st.acquisition_date, "scanner_epoch": st.scanner_epoch,
             "series_uid": sp.series_uid, "measure": m["measure"], "value": m["value"], "unit": m["unit"],
             "qc_status": qc_status, "pipeline_name": sp.pipeline, "pipeline_version": sp.version,
             "container_digest": sp.digest, "input_sha256": sp.input_sha256, "flow_run_id": flow_run_id,
             "created_at": now} for m in sp.measures if math.isfinite(m["value"])]


def already_judged(lake: Lake, site: str, series_uid: str, pipeline: str, version: str) -> bool:
    qc = tables.read_table(lake, "qc", [site])
    if qc.empty:
        return False
    hit = qc[(qc.series_uid == series_uid) & (qc.pipeline_name == pipeline)
             & (qc.pipeline_version == version) & (qc.metric == "verdict")]
    return not hit.empty


# -- reviewer overrides -----------------------------------------------------------------
def _find_series(lake: Lake, series: str) -> pd.DataFrame:
    qc = tables.read_table(lake, "qc")
    rows = qc[(qc.metric == "verdict") & qc.series_uid.str.startswith(series)] if not qc.empty else qc
    keys = rows[["series_uid", "pipeline_name", "pipeline_version"]].drop_duplicates()
    if keys.empty:
        raise OverrideError(f"no processed series {series!r} in the qc table")
    if len(keys) > 1:
        raise OverrideError(f"{series!r} names {len(keys)} processed series/pipeline versions; "
                            "give more of the SeriesInstanceUID")
    return rows


def override(lake: Lake, series: str, verdict: str, reason: str, by: str) -> dict[str, Any]:
    """Record a reviewer's verdict for a series and make the biomarkers follow it."""
    verdict = verdict.upper()
    if verdict not in ("PASS", "FAIL"):
        raise OverrideError(f"verdict must be pass or fail, not {verdict.lower()!r}")
    if not reason.strip() or not by.strip():
        raise OverrideError("an override needs a reason and the reviewer's name")
    (row,) = _find_series(lake, series).itertuples()
    site, uid = row.site, row.series_uid
    now = datetime.now(timezone.utc)
    qc = tables.read_table(lake, "qc", [site])
    mine = qc[(qc.series_uid == uid) & (qc.pipeline_name == row.pipeline_name)
              & (qc.pipeline_version == row.pipeline_version)].drop(columns=["site"])
    updated = [{**r, "verdict": verdict, "override_by": by, "override_reason": reason, "override_at": now}
               for r in mine.to_dict("records")]
    tables.write_rows(lake, "qc", site, [_clean(r) for r in updated])
    withdrawn = added = 0
    if verdict == "FAIL":
        withdrawn = tables.delete_rows(lake, "biomarkers", site, {
            "series_uid": uid, "pipeline_name": row.pipeline_name, "pipeline_version": row.pipeline_version})
    else:
        added = _restore_biomarkers(lake, site, row, now)
    event = {"series_uid": uid, "pipeline": row.pipeline_name, "version": row.pipeline_version,
             "verdict": verdict, "automatic_verdict": row.automatic_verdict, "reason": reason,
             "biomarkers_withdrawn": withdrawn, "biomarkers_added": added}
    append_event(lake, "qc_override", actor=by, **event)
    return event


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else
                (v.to_pydatetime() if isinstance(v, pd.Timestamp) else v)) for k, v in row.items()}


def _restore_biomarkers(lake: Lake, site: str, row: Any, now: datetime) -> int:
    """Biomarker rows of a series passed by a reviewer, from its derivatives and provenance."""
    series = tables.read_table(lake, "series", [site]).set_index("series_uid").loc[row.series_uid]
    study = tables.read_table(lake, "studies", [site]).set_index("study_key").loc[series.study_key]
    root = f"derivatives/{row.pipeline_name}-{row.pipeline_version}/sub-{row.subject}/ses-{row.session}"
    record, measures = {}, None
    for p in lake.find(root):
        if p.endswith("_provenance.json"):
            candidate = json.loads(lake.read_text(p))
            if row.input_sha256 in candidate.get("inputs", {}).values():
                record = candidate
                prefix = p.rsplit("/", 1)[-1][: -len("_provenance.json")]
                measures = f"{root}/anat/{prefix}_desc-volumes_measures.tsv"
    if not record.get("ok") or not measures or not lake.exists(measures):
        return 0  # nothing measured (the pipeline failed): there is nothing to restore
    sp = SeriesProcessing(row.series_uid, "", row.input_sha256, row.pipeline_name, row.pipeline_version,
                          digest=record.get("digest", ""))
    df = pd.read_csv(lake.open(measures), sep="\t")
    sp.measures = [{"measure": r.measure, "value": float(r.value), "unit": str(r.unit)} for r in df.itertuples()]
    st = StudyContextRow(study.trial_id, site, series.study_key, row.subject, row.session,
                         pd.Timestamp(study.acquisition_date).date(), series.scanner_epoch)
    rows = biomarker_rows(sp, st, "PASS", None, now)
    tables.write_rows(lake, "biomarkers", site, rows)
    return len(rows)
