"""What intake decided about a study, and its rows in the studies, series, deviations and queries tables.

Everything a row holds is de-identified: new UIDs, shifted dates, the trial
subject label, cleaned descriptions, codes and sha256 digests. The rows and the
audit event are checked for the study's identifying values before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.conformance.findings import Finding, deviation_rows, query_rows
from tasks.deid.verify import Matcher, check_no_phi
from tasks.errors import TRANSIENT_RETRIES
from tasks.intake.custody import QuarantineRecord
from tasks.lake import tables
from tasks.lake.audit import append_event, read_events
from tasks.lake.storage import Lake
from tasks.lake.studies import Study
from tasks.lake.versions import corelab_version


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
    """What intake decided about one study: its series, findings and quarantined files."""

    study: Study
    n_files: int
    deid_method: str
    series: list[SeriesOutcome] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)   # study-level
    quarantined: list[QuarantineRecord] = field(default_factory=list)
    characteristics: dict[str, Any] = field(default_factory=dict)  # age_years, sex, weight_kg, height_m
    already_received: bool = False
    verified_files: list[str] = field(default_factory=list)  # upload names now verified in deid/
    matcher: Any = field(default=None, repr=False)            # this study's identifying values
    received_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    flow_run_id: str | None = None

    @property
    def n_quarantined(self) -> int:
        return len(self.quarantined)

    @property
    def all_findings(self) -> list[Finding]:
        return self.findings + [f for s in self.series for f in s.findings]

    @property
    def status(self) -> str:
        if not any(s.verdict != "rejected" for s in self.series):
            return "rejected"
        return "accepted_with_deviations" if self.all_findings else "accepted"


def study_row(o: StudyOutcome, corelab_version: str) -> dict[str, Any]:
    s = o.study
    return {
        "study_key": s.study_key, "trial_id": s.trial_id, "subject": s.subject,
        "session": s.session, "study_uid": s.study_uid, "acquisition_date": s.acquisition_date,
        "days_from_baseline": s.days_from_baseline, "in_window": s.in_window, "status": o.status,
        **{k: o.characteristics.get(k) for k in ("age_years", "sex", "weight_kg", "height_m")},
        "n_files": o.n_files, "n_series": len(o.series), "n_quarantined": o.n_quarantined,
        "n_deviations": len(o.all_findings), "deid_method": o.deid_method,
        "received_at": o.received_at, "flow_run_id": o.flow_run_id, "corelab_version": corelab_version,
    }


def series_rows(o: StudyOutcome) -> list[dict[str, Any]]:
    s, rows = o.study, []
    for x in o.series:
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
            "content_sha256": x.content_sha256, "created_at": o.received_at,
        })
    return rows


def record_study(lake: Lake, outcome: StudyOutcome, matcher: Matcher) -> dict[str, int]:
    """Write the study's rows (checked for PHI first) and its audit event; the ``studies`` row last.

    The ``studies`` row is what says a study was received: intake takes a study that has one as
    already received and records nothing more (:func:`tasks.receive.study.receive_one_study`).
    So it is written only once everything else of the study is: a run killed before it leaves a
    study that the next attempt records whole (the other rows are upserts by their keys, and
    their keys do not change between attempts). Its audit event comes before it too; an attempt
    that finds series rows of this study already written (an earlier attempt got that far) looks
    for that attempt's ``study_received`` first and, when it is there, logs
    ``study_record_resumed`` instead: a crash never logs a study's receipt twice, and the log's
    head moves past an append the crash cut short.
    """
    study = outcome.study
    deviations = deviation_rows(study, outcome.all_findings, outcome.received_at)
    rows = {
        "studies": [study_row(outcome, corelab_version())],
        "series": series_rows(outcome),
        "deviations": deviations,
        "queries": query_rows(study, deviations),
    }
    check_no_phi(f"tables for study {study.study_key[:12]}", rows, [matcher])
    event = {
        "study_key": study.study_key, "site": study.site, "subject": study.subject,
        "session": study.session, "status": outcome.status, "n_files": outcome.n_files,
        "n_series": len(outcome.series), "n_quarantined": outcome.n_quarantined,
        "deviations": [d["deviation_id"] for d in rows["deviations"]],
        "quarantined_sha256": [q.sha256 for q in outcome.quarantined],
    }
    check_no_phi("audit event", event, [matcher])
    resumed = _partly_recorded(lake, study)
    counts = {}
    for table in ("series", "deviations", "queries"):
        if rows[table]:
            counts[table] = tables.write_rows(lake, table, study.site, rows[table])
    if resumed and _received_event(lake, study):
        # the receipt is in the log already (perhaps beyond its head, an append cut short): an
        # event saying the recording was completed takes it up, and no receipt is logged twice
        append_event(lake, "study_record_resumed", study_key=study.study_key, site=study.site)
    else:
        append_event(lake, "study_received", **event)
    counts["studies"] = tables.write_rows(lake, "studies", study.site, rows["studies"])
    return counts


def _partly_recorded(lake: Lake, study: Study) -> bool:
    """Whether an earlier attempt wrote series rows of this study (and then stopped before its studies row)."""
    series = tables.read_table(lake, "series", [study.site])
    return bool(len(series)) and bool((series["study_key"] == study.study_key).any())


def _received_event(lake: Lake, study: Study) -> bool:
    """Whether the audit log holds this study's ``study_received`` (only asked after an interrupted attempt)."""
    return any(e.get("action") == "study_received" and e.get("details", {}).get("study_key") == study.study_key
               for e in read_events(lake))


@task(name="record-study", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def record_study_task(lake: Lake, outcome: StudyOutcome, matcher: Matcher) -> dict[str, int]:
    return record_study(lake, outcome, matcher)
