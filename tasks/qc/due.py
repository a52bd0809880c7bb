"""Which received studies have processing left to do: the nightly run's selection.

A study is due when, as the lake holds it now:

- a series the protocol wants in BIDS has no BIDS image yet, and no failed conversion is on
  record for it (a conversion that failed on the data is a deviation the site hears about; doing
  it again blindly would give the same answer);
- a BIDS image that a registered pipeline takes has no verdict of that pipeline's *current*
  version: never processed, processed by another version, or a run that never started (a worker
  without its engine raises and leaves no verdict, see :mod:`tasks.run.derivatives`);
- it holds a FAIL verdict, not overridden by a person, whose reason code is ``infrastructure``
  (written by versions before 0.2 of this module, when a run that never started was recorded
  as a FAIL; :func:`tasks.qc.record.clear_retryable` withdraws those first).

Everything else, in particular a study whose every image has a current verdict (PASS, WARN, or a
FAIL about the data) and a rejected study, is not due.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from data_contracts.trial import TrialConfig
from pipelines.spec import PipelineSpec
from tasks.bids.convert import existing_images, plan_session
from tasks.lake import tables
from tasks.lake.storage import Lake
from tasks.qc.record import NOT_RUN


@dataclass(frozen=True)
class DueStudy:
    """One study with work left, and why (one line per series and pipeline)."""

    study_key: str
    site: str
    reasons: tuple[str, ...]


def _judged(qc: pd.DataFrame) -> set[tuple[str, str, str]]:
    """(series, pipeline, version) with a verdict in force that is a fact about the data."""
    if qc.empty:
        return set()
    v = qc[qc.metric == "verdict"]
    not_run = (v.verdict == "FAIL") & v.override_by.isna() & v.reason_code.isin(NOT_RUN)
    v = v[~not_run]
    return set(zip(v.series_uid, v.pipeline_name, v.pipeline_version))


def _failed_conversions(deviations: pd.DataFrame) -> set[str]:
    if deviations.empty:
        return set()
    hit = deviations[(deviations.kind == "processing_failed") & (deviations.observed == "conversion")]
    return set(hit.series_uid.dropna())


def study_work(lake: Lake, trial: TrialConfig, study: pd.Series, series: pd.DataFrame,
               judged: set[tuple[str, str, str]], failed_conversion: set[str],
               specs: Sequence[PipelineSpec]) -> list[str]:
    """What is left to do for one study (empty: nothing)."""
    images = existing_images(lake, study.subject, study.session)
    out = []
    for s in plan_session(series[series.study_key == study.study_key], trial):
        image = images.get(s.series_uid)
        if image is None:
            if s.series_uid not in failed_conversion:
                out.append(f"series {s.series_number}: not in BIDS yet")
            continue
        rel = image.removeprefix("bids/")
        for spec in specs:
            if any(q.matches(rel) for q in spec.inputs) and (s.series_uid, spec.name, spec.version) not in judged:
                out.append(f"series {s.series_number}: no {spec.name} {spec.version} verdict")
    return out


def studies_due(lake: Lake, trial: TrialConfig, specs: Sequence[PipelineSpec]) -> list[DueStudy]:
    """Every received (not rejected) study with work left, in site and key order."""
    studies = tables.read_table(lake, "studies")
    if studies.empty:
        return []
    studies = studies[studies.status != "rejected"].sort_values(["site", "study_key"])
    out = []
    for site, rows in studies.groupby("site", sort=True):
        series = tables.read_table(lake, "series", [site])
        judged = _judged(tables.read_table(lake, "qc", [site]))
        failed = _failed_conversions(tables.read_table(lake, "deviations", [site]))
        for _, study in rows.iterrows():
            work = study_work(lake, trial, study, series, judged, failed, specs)
            if work:
                out.append(DueStudy(str(study.study_key), str(site), tuple(work)))
    return out
