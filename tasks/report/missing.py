"""Missing visits become deviations and site queries, like any other major finding.

A visit whose window closed with nothing received (:func:`tasks.report.status.visit_expectations`,
state ``missing``) is a protocol deviation the site must answer: a ``missing_visit`` deviation on
the subject's first study (the visit it was scheduled from), with the missing visit as its
session, and the site query that every major deviation raises. The query is dated the day the
window closed, so it falls due ``query_due_working_days`` after that and the nightly escalation
takes it when nobody answered. Run nightly; a visit already recorded is not recorded again (the
deviation id is a hash of the study, the kind and the visit), and a visit received late resolves
nothing by itself: the core lab resolves its query, as for an out-of-window visit.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import pandas as pd

from data_contracts.trial import TrialConfig
from tasks.conformance.findings import Finding, deviation_id, record_findings
from tasks.lake.storage import Lake
from tasks.lake.studies import read_study
from tasks.report.status import LakeTables, utc, visit_expectations


def missing_visit_finding(visit: str, closes: pd.Timestamp) -> Finding:
    return Finding(kind="missing_visit", severity="major", parameter="visit", expected=visit,
                   observed=f"{visit}: nothing received",
                   message=f"visit {visit} was not received: its window closed on {closes:%Y-%m-%d}")


def record_missing_visits(lake: Lake, trial: TrialConfig, as_of: datetime | None = None) -> list[str]:
    """Record each missing visit of ``trial`` not yet recorded; the deviation ids written."""
    at = utc(as_of or datetime.now(timezone.utc))
    tables = LakeTables.read(lake, trial.trial_id)
    exp = visit_expectations(trial, tables, at)
    missing = exp[exp["state"] == "missing"]
    if missing.empty:
        return []
    done = set(tables.deviations["deviation_id"]) if len(tables.deviations) else set()
    written = []
    for m in missing.itertuples():
        finding = missing_visit_finding(m.visit, m.closes)
        did = deviation_id(m.scheduled_from, finding)
        if did in done:
            continue
        study = replace(read_study(lake, m.site, m.scheduled_from), session=m.visit)
        record_findings(lake, study, [finding], now=m.closes.to_pydatetime())
        written.append(did)
    return written
