"""Rows of the intake tables (studies, series, deviations, queries) for one study.

Everything a row holds is de-identified: new UIDs, shifted dates, the trial
subject label, cleaned descriptions, codes and sha256 digests. The flow checks
the rows for identifying values before they are written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

from tasks.protocol import Finding


@dataclass
class SeriesOutcome:
    """What intake decided about one series."""

    series_uid: str
    series_number: int
    description: str
    n_files: int
    params: dict[str, Any]
    identity: dict[str, str | None]
    scanner_epoch: str
    series_type: str | None
    verdict: str                      # conform | deviation | unclassified | rejected
    findings: list[Finding] = field(default_factory=list)
    deid_path: str | None = None
    content_sha256: str | None = None
    burned_in: bool = False


@dataclass
class StudyOutcome:
    study_key: str
    trial_id: str
    site: str
    subject: str
    session: str
    study_uid: str
    acquisition_date: date
    days_from_baseline: int
    in_window: bool
    n_files: int
    n_quarantined: int
    deid_method: str
    series: list[SeriesOutcome] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)   # study-level
    quarantined: list[Any] = field(default_factory=list)    # QuarantineRecord
    characteristics: dict[str, Any] = field(default_factory=dict)  # age_years, sex, weight_kg, height_m
    already_received: bool = False
    verified_files: list[str] = field(default_factory=list)  # upload names now verified in deid/
    matcher: Any = field(default=None, repr=False)            # this study's identifying values
    received_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    flow_run_id: str | None = None

    @property
    def all_findings(self) -> list[Finding]:
        return self.findings + [f for s in self.series for f in s.findings]

    @property
    def status(self) -> str:
        if not any(s.verdict != "rejected" for s in self.series):
            return "rejected"
        return "accepted_with_deviations" if self.all_findings else "accepted"


def deviation_id(study_key: str, f: Finding) -> str:
    text = "|".join([study_key, f.series_key or "", f.kind, f.parameter or "", f.observed or ""])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def study_row(s: StudyOutcome, corelab_version: str) -> dict[str, Any]:
    return {
        "study_key": s.study_key, "trial_id": s.trial_id, "subject": s.subject,
        "session": s.session, "study_uid": s.study_uid, "acquisition_date": s.acquisition_date,
        "days_from_baseline": s.days_from_baseline, "in_window": s.in_window, "status": s.status,
        **{k: s.characteristics.get(k) for k in ("age_years", "sex", "weight_kg", "height_m")},
        "n_files": s.n_files, "n_series": len(s.series), "n_quarantined": s.n_quarantined,
        "n_deviations": len(s.all_findings), "deid_method": s.deid_method,
        "received_at": s.received_at, "flow_run_id": s.flow_run_id, "corelab_version": corelab_version,
    }


def series_rows(s: StudyOutcome) -> list[dict[str, Any]]:
    rows = []
    for x in s.series:
        p = x.params
        rows.append({
            "study_key": s.study_key, "series_uid": x.series_uid, "subject": s.subject,
            "session": s.session, "series_number": x.series_number, "description": x.description,
            "series_type": x.series_type, "verdict": x.verdict, "n_files": x.n_files,
            "manufacturer": x.identity.get("manufacturer"), "model": x.identity.get("model"),
            "software_versions": x.identity.get("software_versions"),
            "device_serial": x.identity.get("device_serial"), "scanner_epoch": x.scanner_epoch,
            **{k: p.get(k) for k in ("field_strength", "repetition_time", "echo_time", "inversion_time",
                                     "flip_angle", "slice_thickness", "pixel_spacing_row",
                                     "pixel_spacing_col", "rows", "columns", "n_slices", "n_volumes",
                                     "coverage_mm")},
            "burned_in_annotation": x.burned_in, "deid_path": x.deid_path,
            "content_sha256": x.content_sha256, "created_at": s.received_at,
        })
    return rows


@dataclass(frozen=True)
class StudyRef:
    """What a deviation or a query says about the study it belongs to."""

    study_key: str
    site: str
    subject: str
    session: str


def ref(s: StudyOutcome) -> StudyRef:
    return StudyRef(s.study_key, s.site, s.subject, s.session)


def deviation_rows(study: StudyRef, findings: list[Finding], now: datetime) -> list[dict[str, Any]]:
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
            "message": f.message, "created_at": now,
        })
    return rows


def query_rows(study: StudyRef, deviations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One site query per major deviation."""
    return [{
        "query_id": "Q" + d["deviation_id"][:15], "study_key": study.study_key,
        "deviation_id": d["deviation_id"], "subject": study.subject, "session": study.session,
        "status": "open", "created_at": d["created_at"],
        "message": (f"Site {study.site}, subject {study.subject}, visit {study.session}: {d['message']}. "
                    "Please confirm, correct or re-send."),
    } for d in deviations if d["severity"] == "major"]
