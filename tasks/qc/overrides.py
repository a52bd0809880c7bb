"""Reviewer overrides: a reviewer's verdict for a processed series, and the biomarkers following it.

The override is written into the series' ``qc`` rows (who, when, why, and the gate's own
verdict beside it); a FAIL withdraws the series' biomarker rows, a PASS restores them from
the pipeline's derivatives and provenance. Every override is an audit event.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from data_contracts.qc_settings import HEAD_CHECK
from pipelines.registry import UnknownPipeline, get_spec
from pipelines.spec import PipelineSpec
from tasks.errors import CorelabError
from tasks.lake import tables
from tasks.lake.audit import append_event
from tasks.lake.storage import Lake
from tasks.lake.studies import read_study
from tasks.qc.queries import resolve_for_series
from tasks.qc.record import biomarker_rows
from tasks.run.derivatives import PipelineRun, derivatives_root, image_entities, lake_outputs, measures_table


class OverrideError(CorelabError, ValueError):
    """An override that names no processed series, or more than one."""

    code = "override_invalid"


def _find_series(lake: Lake, series: str, pipeline: str | None = None) -> pd.DataFrame:
    """The verdict row of one series' latest judgement (by ``pipeline`` when given).

    A series judged by several versions of a pipeline is overridden in its newest judgement;
    judged by several pipelines, ``pipeline`` says which.
    """
    qc = tables.read_table(lake, "qc")
    rows = qc[(qc.metric == "verdict") & qc.series_uid.str.startswith(series)] if not qc.empty else qc
    if pipeline is not None:
        rows = rows[rows.pipeline_name == pipeline]
    if rows.series_uid.nunique() > 1:
        raise OverrideError(f"{series!r} names {rows.series_uid.nunique()} processed series; "
                            "give more of the SeriesInstanceUID")
    if rows.empty:
        raise OverrideError(f"no processed series {series!r}" + (f" judged by {pipeline}" if pipeline else "")
                            + " in the qc table")
    if rows.pipeline_name.nunique() > 1:
        raise OverrideError(f"series {series!r} was judged by {', '.join(sorted(set(rows.pipeline_name)))}: "
                            "say which with --pipeline")
    newest = rows.assign(created_at=pd.to_datetime(rows.created_at, utc=True)).sort_values("created_at")
    return rows[rows.pipeline_version == newest.pipeline_version.iloc[-1]]


def override(lake: Lake, series: str, verdict: str, reason: str, by: str, *,
             confirm_head: bool = False, pipeline: str | None = None) -> dict[str, Any]:
    """Record a reviewer's verdict for a series and make the biomarkers follow it.

    Passing a series the gate failed as not a head (reason ``not_a_head``) needs
    ``confirm_head``: the reviewer says they looked and the object is a head. The override's
    recorded reason and its audit event then say which head-check failures it overrides.
    """
    verdict = verdict.upper()
    if verdict not in ("PASS", "FAIL"):
        raise OverrideError(f"verdict must be pass or fail, not {verdict.lower()!r}")
    if not reason.strip() or not by.strip():
        raise OverrideError("an override needs a reason and the reviewer's name")
    (row,) = _find_series(lake, series, pipeline).itertuples()
    site, uid = row.site, row.series_uid
    spec = _spec_of(row) if verdict == "PASS" else None   # before anything is written
    now = datetime.now(timezone.utc)
    qc = tables.read_table(lake, "qc", [site])
    mine = qc[(qc.series_uid == uid) & (qc.pipeline_name == row.pipeline_name)
              & (qc.pipeline_version == row.pipeline_version)].drop(columns=["site"])
    failed, warned = head_check_findings(mine) if verdict == "PASS" else ([], [])
    if failed and not confirm_head:
        raise OverrideError(
            f"series {uid} failed the head check: {'; '.join(failed)}. The object may not be a head, or "
            "its registration to the template failed, and passing it would put its volumes in the "
            "biomarkers table. Look at the image and at its segmentation figure; if it is a T1-weighted "
            "head segmented as one, repeat with --confirm-head. Nothing was changed")
    not_a_head = failed + warned
    if not_a_head:
        reason = f"{reason} [overrides not_a_head: {'; '.join(not_a_head)}]"
    updated = [{**r, "verdict": verdict, "override_by": by, "override_reason": reason, "override_at": now}
               for r in mine.to_dict("records")]
    tables.write_rows(lake, "qc", site, [_clean(r) for r in updated])
    withdrawn = added = 0
    resolved: list[str] = []
    if verdict == "FAIL":
        withdrawn = tables.delete_rows(lake, "biomarkers", site, {
            "series_uid": uid, "pipeline_name": row.pipeline_name, "pipeline_version": row.pipeline_version})
    else:
        added = _restore_biomarkers(lake, site, row, spec, now)
        # the site is no longer asked to re-send what the core lab accepted
        resolved = resolve_for_series(lake, site, uid, row.pipeline_name, by, reason, now)
    event = {"series_uid": uid, "pipeline": row.pipeline_name, "version": row.pipeline_version,
             "verdict": verdict, "automatic_verdict": row.automatic_verdict, "reason": reason,
             "biomarkers_withdrawn": withdrawn, "biomarkers_added": added,
             "overrides_not_a_head": not_a_head, "confirm_head": confirm_head, "queries_resolved": resolved}
    append_event(lake, "qc_override", actor=by, **event)
    return event


def head_check_findings(rows: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The gate's FAIL and WARN reasons on the head-check metrics among a series' ``qc`` rows.

    Whatever their code: beyond a limit (``not_a_head``), far from the site's own scans, or not
    measurable at all (``metric_missing``) are all a head check that did not pass.
    """
    mine = rows[rows.metric.isin(HEAD_CHECK)].sort_values("metric")
    def reasons(status: str) -> list[str]:
        return [str(r) for r in mine[mine.status == status].reason]
    return reasons("FAIL"), reasons("WARN")


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else
                (v.to_pydatetime() if isinstance(v, pd.Timestamp) else v)) for k, v in row.items()}


def _spec_of(row: Any) -> PipelineSpec:
    """The spec of the pipeline version that judged the series (its measures are read through it)."""
    try:
        return replace(get_spec(row.pipeline_name), version=row.pipeline_version)
    except UnknownPipeline as exc:
        raise OverrideError(f"pipeline {row.pipeline_name!r} is not registered here, so its biomarkers "
                            "cannot be restored; nothing was changed") from exc


def _restore_biomarkers(lake: Lake, site: str, row: Any, spec: PipelineSpec, now: datetime) -> int:
    """Biomarker rows of a series passed by a reviewer, from its derivatives and provenance.

    The measures table is found through the pipeline's spec (its ``measures`` output, for the
    entities of the run's provenance file), with the version of the verdict.
    """
    series = tables.read_table(lake, "series", [site]).set_index("series_uid").loc[row.series_uid]
    root = f"{derivatives_root(spec)}/sub-{row.subject}/ses-{row.session}"
    record, measures = {}, None
    for p in lake.find(root):
        if p.endswith("_provenance.json"):
            candidate = json.loads(lake.read_text(p))
            if row.input_sha256 in candidate.get("inputs", {}).values():
                record = candidate
                measures = lake_outputs(spec, row.subject, row.session, image_entities(p)).get("measures")
    if not record.get("ok") or not measures or not lake.exists(measures):
        return 0  # nothing measured (the pipeline failed): there is nothing to restore
    run = PipelineRun(row.series_uid, "", row.input_sha256, row.pipeline_name, row.pipeline_version,
                      digest=record.get("digest", ""), backend=record.get("backend", ""),
                      environment_sha256=record.get("environment_sha256", ""),
                      measures=measures_table(lake.read_bytes(measures)))
    rows = biomarker_rows(run, read_study(lake, site, series.study_key), series.scanner_epoch, "PASS", None, now)
    tables.write_rows(lake, "biomarkers", site, rows)
    return len(rows)
