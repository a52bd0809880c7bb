"""Receive one study: identify it, de-identify and verify each series, check the protocol.

This is the per-study body of the ``receive_study`` flow. It decides nothing
the trial file does not say, and writes only verified data to ``deid/`` and
refused data to ``quarantine/``; table rows are built by :mod:`tasks.records`
and written by :func:`record_study`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from importlib import metadata

from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.trial import TrialConfig
from tasks import records, tables
from tasks._heap import collector_paused
from tasks.audit import append_event
from tasks.deid import DeidContext, date_shift_days
from tasks.deid_series import (PARALLEL_MIN_FILES, DeidSeries, SeriesJob, collect_series, start_series,
                                write_series)
from tasks.dicom_params import scanner_identity, series_parameters
from tasks.identify import VisitAssignment, assign_visit, patient_characteristics, subject_label
from tasks.inbox import QuarantineRecord, quarantine
from tasks.inventory import ReceivedFile, group_series, study_key
from tasks.phi_verify import Fingerprint, Matcher, collect_identifiers, find_leaks
from tasks.protocol import Finding, check_completeness, check_scanner, check_series
from tasks.records import SeriesOutcome, StudyOutcome
from tasks.storage import Lake


class PHILeakError(RuntimeError):
    """An output about to leave the restricted stores still holds an identifying value."""


def corelab_version() -> str:
    try:
        return metadata.version("corelab-imaging")
    except metadata.PackageNotFoundError:
        return "dev"


@dataclass
class StudyContext:
    trial: TrialConfig
    site: str
    upload: str
    lake: Lake


def fingerprint_path(site: str, subject: str, session: str, study_key: str) -> str:
    return f"deid/{site}/{subject}/{session}/phi-fingerprint-{study_key[:16]}.json"


def load_fingerprints(lake: Lake, trial: TrialConfig, site: str, subject: str, session: str) -> list[Fingerprint]:
    """Every fingerprint of a subject's session (one per study received for it)."""
    key = trial.secret(trial.deidentification.secret_env)
    folder = f"deid/{site}/{subject}/{session}"
    return [Fingerprint.from_json(lake.read_text(p), key) for p in lake.find(folder)
            if p.rsplit("/", 1)[-1].startswith("phi-fingerprint-")]


def _verified_before(lake: Lake, site: str, ctx: DeidContext, files: list[ReceivedFile]) -> list[str]:
    """Files of a re-sent study whose series were de-identified and verified the first time.

    Their raw copies (staged again with the re-sent upload) can be released at once;
    files of a series refused then stay where they were put, in quarantine and inbox.
    """
    series = tables.read_table(lake, "series", [site])
    accepted = set(series.loc[series.verdict != "rejected", "series_uid"]) if len(series) else set()
    return [f.rel for f in files if ctx.new_uid(str(f.header.SeriesInstanceUID)) in accepted]


def _study_date(files: list[ReceivedFile]) -> date:
    h = files[0].header
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        v = str(h.get(kw, "") or "").strip()
        if len(v) >= 8:
            try:
                return datetime.strptime(v[:8], "%Y%m%d").date()
            except ValueError:
                continue
    raise ValueError("the study has no readable StudyDate (0008,0020): its visit cannot be determined")


def _prior(lake: Lake, site: str, subject: str):
    studies = tables.read_table(lake, "studies", [site])
    return studies[studies["subject"] == subject] if len(studies) else studies


def receive_one_study(sc: StudyContext, files: list[ReceivedFile]) -> StudyOutcome:
    """Identify, de-identify, verify and check one study (all its accepted files).

    Raises
    ------
    SubjectError, ValueError
        The study cannot be attributed (no PatientID, not on the roster, no date);
        the caller quarantines its files.
    """
    with collector_paused():  # the study's parsed headers fill the heap (see tasks._heap)
        return _receive_one_study(sc, files)


def _receive_one_study(sc: StudyContext, files: list[ReceivedFile]) -> StudyOutcome:
    trial, lake, site = sc.trial, sc.lake, sc.site
    key = study_key([f.sop_uid for f in files])
    subject = subject_label(trial, site, str(files[0].header.get("PatientID", "") or ""))
    opts = trial.deidentification
    secret = trial.secret(opts.secret_env)
    shift = date_shift_days(secret, trial.trial_id, subject, opts.max_date_shift_days)
    ctx = DeidContext(trial.trial_id, site, subject, "", secret, opts, shift)
    headers = [f.header for f in files]
    ctx.prepare(headers)  # before any UID is replaced: new UIDs must avoid original dates
    new_study_uid = ctx.new_uid(str(files[0].header.StudyInstanceUID))
    acq = _study_date(files) + timedelta(days=shift)
    prior = _prior(lake, site, subject)
    if len(prior) and key in set(prior["study_key"]):
        row = prior[prior["study_key"] == key].iloc[0]
        return StudyOutcome(key, trial.trial_id, site, subject, row["session"], new_study_uid, acq,
                            int(row["days_from_baseline"]), bool(row["in_window"]), len(files), 0,
                            "", already_received=True,
                            verified_files=_verified_before(lake, site, ctx, files))
    same = prior[prior["study_uid"] == new_study_uid] if len(prior) else prior
    if len(same):  # more files of a study already received: it keeps its visit
        row = same.iloc[0]
        visit = VisitAssignment(str(row["session"]), int(row["days_from_baseline"]), bool(row["in_window"]))
    else:
        base = prior[prior["session"] == trial.visits[0].id] if len(prior) else prior
        baseline = min(base["acquisition_date"]) if len(base) else None
        visit = assign_visit(trial, acq, baseline, set(prior["session"]) if len(prior) else set())
    ctx.session = visit.session
    matcher = Matcher(collect_identifiers(headers, opts.retain_device_identity),
                      own_labels=[trial.trial_id, site, subject, visit.session])
    outcome = StudyOutcome(key, trial.trial_id, site, subject, visit.session, new_study_uid, acq,
                           visit.days_from_baseline, visit.in_window, len(files), 0,
                           "; ".join(ctx.method_text), findings=list(visit.findings), matcher=matcher,
                           characteristics=patient_characteristics(headers[0], opts.retain_patient_characteristics))
    scanner_findings: dict[tuple[str, str], Finding] = {}
    pooled = len(files) >= PARALLEL_MIN_FILES
    started = [_start_series(sc, ctx, matcher, members, pooled) for members in group_series(files).values()]
    for pending in started:
        so, deid = _finish_series(sc, pending)
        for f in list(so.findings):
            if f.kind in ("unknown_scanner", "new_scanner_epoch"):
                scanner_findings.setdefault((f.kind, f.observed or ""), f)
                so.findings.remove(f)
        outcome.series.append(so)
        if deid.ok:
            outcome.verified_files += list(deid.sources.values())
        else:
            outcome.quarantined += _quarantine_series(sc, pending.job.files, deid)
    outcome.findings += list(scanner_findings.values())
    # later stages (BIDS, derivatives) verify against this, long after the raw upload is gone
    lake.write_text(fingerprint_path(site, subject, visit.session, key),
                    Fingerprint.from_matcher(matcher, secret).to_json())
    present = {s.series_type for s in outcome.series if s.series_type and s.verdict != "rejected"}
    outcome.findings += check_completeness(trial, site, visit.session, present)
    outcome.n_quarantined = len(outcome.quarantined)
    return outcome


@dataclass
class _PendingSeries:
    """What the received headers said about a series, and its de-identification under way."""

    number: int
    params: dict
    identity: dict
    descriptions: list[str]
    job: SeriesJob


def _start_series(sc: StudyContext, ctx: DeidContext, matcher: Matcher, members: list[ReceivedFile],
                  pooled: bool) -> _PendingSeries:
    # everything read from the received headers is read here: de-identification rewrites them
    headers = [m.header for m in members]
    h = headers[0]
    number = int(h.get("SeriesNumber", 0) or 0)
    return _PendingSeries(number, series_parameters(headers), scanner_identity(h),
                          [str(h.get("SeriesDescription", "") or ""), str(h.get("ProtocolName", "") or "")],
                          start_series(members, ctx, matcher, number, pooled))


def _finish_series(sc: StudyContext, p: _PendingSeries) -> tuple[SeriesOutcome, DeidSeries]:
    deid = collect_series(p.job)
    epoch, scanner = check_scanner(sc.trial.site(sc.site), p.identity, deid.series_uid)
    check = check_series(p.descriptions, p.params, p.identity["manufacturer"], sc.trial, sc.site,
                         deid.series_uid, label=deid.description or f"series {p.number}")
    so = SeriesOutcome(deid.series_uid, p.number, deid.description, len(p.job.files), p.params, p.identity,
                       epoch, check.series_type, check.verdict, check.findings + scanner,
                       burned_in=deid.refused_code == "burned_in")
    if deid.ok:
        write_series(sc.lake, deid)
        so.deid_path, so.content_sha256 = deid.folder, deid.content_sha256
    else:
        so.verdict = "rejected"
        kind = "burned_in_annotation" if deid.refused_code == "burned_in" else "quarantined_file"
        so.findings.append(Finding(kind=kind, severity="major", series_key=deid.series_uid,
                                   observed=deid.refused_code,
                                   message=f"series {p.number} quarantined: {deid.refused}"))
    return so, deid


def _quarantine_series(sc: StudyContext, members: list[ReceivedFile], deid: DeidSeries) -> list[QuarantineRecord]:
    return [quarantine(sc.lake, sc.site, sc.upload, m.rel, m.raw, f"{m.rel}: {deid.refused}",
                       deid.refused_code or "refused", m.sha256) for m in members]


def check_no_phi(label: str, payload: object, matcher: Matcher) -> None:
    """Refuse to write rows or events that hold an identifying value."""
    data = json.dumps(payload, default=str, sort_keys=True).encode()
    leaks = find_leaks(label, data, matcher)
    if leaks:
        raise PHILeakError(f"{label}: refusing to write: " + "; ".join(sorted({l.source for l in leaks})))


def record_study(lake: Lake, outcome: StudyOutcome, matcher: Matcher) -> dict[str, int]:
    """Write the study's rows (checked for PHI first) and its audit events."""
    version = corelab_version()
    deviations = records.deviation_rows(records.ref(outcome), outcome.all_findings, outcome.received_at)
    rows = {
        "studies": [records.study_row(outcome, version)],
        "series": records.series_rows(outcome),
        "deviations": deviations,
        "queries": records.query_rows(records.ref(outcome), deviations),
    }
    check_no_phi(f"tables for study {outcome.study_key[:12]}", rows, matcher)
    counts = {}
    for table, table_rows in rows.items():
        if table_rows:
            counts[table] = tables.write_rows(lake, table, outcome.site, table_rows)
    event = {
        "study_key": outcome.study_key, "site": outcome.site, "subject": outcome.subject,
        "session": outcome.session, "status": outcome.status, "n_files": outcome.n_files,
        "n_series": len(outcome.series), "n_quarantined": outcome.n_quarantined,
        "deviations": [d["deviation_id"] for d in rows["deviations"]],
        "quarantined_sha256": [q.sha256 for q in outcome.quarantined],
    }
    check_no_phi("audit event", event, matcher)
    append_event(lake, "study_received", **event)
    return counts


@task(name="receive-one-study", cache_policy=NO_CACHE)
def receive_one_study_task(sc: StudyContext, files: list[ReceivedFile]) -> StudyOutcome:
    return receive_one_study(sc, files)


@task(name="record-study", cache_policy=NO_CACHE)
def record_study_task(lake: Lake, outcome: StudyOutcome, matcher: Matcher) -> dict[str, int]:
    return record_study(lake, outcome, matcher)
