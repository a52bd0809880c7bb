"""The Finding: one deviation from the trial's protocol, and the rows it becomes.

Every stage that finds something a site must hear about (a refused file, a parameter out of
tolerance, a visit out of its window, a QC FAIL) says it as a :class:`Finding`. This module
turns findings into ``deviations`` rows (one per distinct finding of a study) and ``queries``
rows (one site query per major deviation), so the shape of those rows lives in one place.
A new kind of deviation is a new ``kind`` here and in ``data_contracts/schemas.py``; nothing
else changes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from tasks.lake import tables
from tasks.lake.storage import Lake
from tasks.lake.studies import Study


@dataclass(frozen=True)
class Finding:
    """One deviation from the protocol."""

    kind: str
    severity: str
    message: str
    parameter: str | None = None
    expected: str | None = None
    observed: str | None = None
    series_key: str | None = None     # which series (the flow's key), None for study-level
    reason_code: str | None = None    # the error behind it (data_contracts.reasons), if one was


def deviation_id(study_key: str, f: Finding) -> str:
    text = "|".join([study_key, f.series_key or "", f.kind, f.parameter or "", f.observed or ""])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def deviation_rows(study: Study, findings: list[Finding], now: datetime) -> list[dict[str, Any]]:
    rows, seen = [], set()
    for f in findings:
        did = deviation_id(study.study_key, f)
        if did in seen:
            continue
        seen.add(did)
        rows.append({
            "deviation_id": did, "study_key": study.study_key, "series_uid": f.series_key,
            "subject": study.subject, "session": study.session, "kind": f.kind, "parameter": f.parameter,
            "expected": f.expected, "observed": f.observed, "severity": f.severity,
            "message": f.message, "reason_code": f.reason_code, "created_at": now,
        })
    return rows


def query_rows(study: Study, deviations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One site query per major deviation."""
    return [{
        "query_id": "Q" + d["deviation_id"][:15], "study_key": study.study_key,
        "deviation_id": d["deviation_id"], "subject": study.subject, "session": study.session,
        "status": "open", "created_at": d["created_at"],
        "message": (f"Site {study.site}, subject {study.subject}, visit {study.session}: {d['message']}. "
                    "Please confirm, correct or re-send."),
    } for d in deviations if d["severity"] == "major"]


def record_findings(lake: Lake, study: Study, findings: list[Finding], now: datetime | None = None) -> None:
    """Deviations (and site queries for the major ones) found after intake, e.g. while processing."""
    if not findings:
        return
    deviations = deviation_rows(study, findings, now or datetime.now(timezone.utc))
    tables.write_rows(lake, "deviations", study.site, deviations)
    queries = query_rows(study, deviations)
    if queries:  # a query already raised keeps its life (answer, resolution, escalation); a withdrawn one reopens
        existing = tables.read_table(lake, "queries", [study.site])
        status = dict(zip(existing["query_id"], existing["status"])) if len(existing) else {}
        queries = [q for q in queries if status.get(q["query_id"]) in (None, "closed")]
    if queries:
        tables.write_rows(lake, "queries", study.site, queries)
    count_deviations(lake, study)


def count_deviations(lake: Lake, study: Study) -> None:
    """The studies row's ``n_deviations``: every deviation of the study, intake's and later ones."""
    devs = tables.read_table(lake, "deviations", [study.site])
    n = int((devs.study_key == study.study_key).sum()) if len(devs) else 0

    def recount(row: dict[str, Any]) -> dict[str, Any]:
        status = "accepted_with_deviations" if n and row["status"] == "accepted" else row["status"]
        return {**row, "n_deviations": n, "status": status}

    tables.update_rows(lake, "studies", study.site, {"study_key": study.study_key}, recount)
