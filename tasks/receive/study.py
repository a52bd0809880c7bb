"""Receive one study: identify it, de-identify and verify each series, check the protocol.

This is the per-study body of the ``receive_study`` flow. It decides nothing
the trial file does not say, and writes only verified data to ``deid/`` and
refused data to ``quarantine/``; its table rows are built and written by
:mod:`tasks.receive.record`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial

from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.trial import TrialConfig
from tasks.conformance.findings import Finding
from tasks.conformance.parameters import scanner_identity, series_gaps, series_parameters
from tasks.conformance.protocol import check_completeness, check_scanner, check_series
from tasks.conformance.visits import VisitAssignment, assign_visit, date_finding
from tasks.deid.fingerprint import Fingerprint, fingerprint_path
from tasks.deid.profile import DeidContext, date_shift_days, device_label
from tasks.deid.series import PARALLEL_MIN_FILES, DeidSeries, SeriesJob, collect_series, start_series, write_series
from tasks.deid.verify import Matcher, collect_identifiers, retained_values
from tasks.intake.custody import QuarantineRecord, quarantine
from tasks.intake.derived import derived_reason, split_derived
from tasks.intake.heap import collector_paused
from tasks.intake.identify import AttributionError, patient_characteristics, study_date, subject_label
from tasks.intake.inventory import ReceivedFile, group_series, study_key
from tasks.lake import tables
from tasks.lake.storage import Lake
from tasks.lake.studies import Study
from tasks.receive.record import SeriesOutcome, StudyOutcome

log = logging.getLogger("corelab.receive")


@dataclass
class Upload:
    """Where a site's upload goes: its trial, its site, its content key and the lake."""

    trial: TrialConfig
    site: str
    key: str                # content-derived upload id (tasks.intake.inventory.upload_id)
    lake: Lake
    # (study UID, series UID) -> (files the upload's DICOMDIR lists that did not arrive, files it lists,
    # the DICOMDIR's number of the series): tasks.intake.inventory.Inventory.absent
    absent: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)


def _verified_before(lake: Lake, site: str, ctx: DeidContext, files: list[ReceivedFile]) -> list[str]:
    """Files of a re-sent study whose series were de-identified and verified the first time.

    Their raw copies (staged again with the re-sent upload) can be released at once;
    files of a series refused then stay where they were put, in quarantine and inbox.
    """
    series = tables.read_table(lake, "series", [site])
    accepted = set(series.loc[series.verdict != "rejected", "series_uid"]) if len(series) else set()
    return [f.rel for f in files if ctx.new_uid(str(f.header.SeriesInstanceUID)) in accepted]


class StudyElsewhereError(AttributionError):
    """The study is already in the lake under another site, subject or trial: not received twice."""

    code = "study_elsewhere"


def _prior(lake: Lake, trial_id: str, site: str, subject: str, key: str):
    """The subject's earlier studies at this site; refuses a study the lake holds under another attribution."""
    studies = tables.read_table(lake, "studies")
    if not len(studies):
        return studies
    for row in studies[studies["study_key"] == key].itertuples():
        if (row.trial_id, row.site, row.subject) != (trial_id, site, subject):
            raise StudyElsewhereError(
                f"this study (the same images, by their UIDs) was received before as trial {row.trial_id}, "
                f"site {row.site}, subject {row.subject}, visit {row.session}; it is not received again as "
                f"trial {trial_id}, site {site}, subject {subject}. If the first attribution was wrong, "
                "correct it there")
    return studies[(studies["site"] == site) & (studies["subject"] == subject)]


def receive_one_study(up: Upload, files: list[ReceivedFile]) -> StudyOutcome:
    """Identify, de-identify, verify and check one study (all its accepted files).

    Raises
    ------
    AttributionError
        The study cannot be attributed (no PatientID, not on the roster, no date);
        the caller quarantines its files. Anything else is a failure of the run.
    """
    with collector_paused():  # the study's parsed headers fill the heap (see tasks.intake.heap)
        return _receive_one_study(up, files)


def _receive_one_study(up: Upload, files: list[ReceivedFile]) -> StudyOutcome:
    trial, lake, site = up.trial, up.lake, up.site
    key = study_key([f.sop_uid for f in files])
    subject = subject_label(trial, site, str(files[0].header.get("PatientID", "") or ""))
    opts = trial.deidentification
    secret = trial.secret(opts.secret_env)
    shift = date_shift_days(secret, trial.trial_id, subject, opts.max_date_shift_days)
    ctx = DeidContext(trial.trial_id, site, subject, "", secret, opts, shift)
    headers = [f.header for f in files]
    ctx.prepare(headers)  # before any UID is replaced: new UIDs must avoid original dates
    new_study_uid = ctx.new_uid(str(files[0].header.StudyInstanceUID))
    received_at = datetime.now(timezone.utc)
    dated = study_date(headers, received_at.date())
    acq = dated.value + timedelta(days=shift)
    prior = _prior(lake, trial.trial_id, site, subject, key)
    if len(prior) and key in set(prior["study_key"]):
        row = prior[prior["study_key"] == key].iloc[0]
        study = Study(trial.trial_id, site, key, subject, str(row["session"]), new_study_uid, acq,
                      int(row["days_from_baseline"]), bool(row["in_window"]))
        return StudyOutcome(study, len(files), "", already_received=True,
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
                      own_labels=[trial.trial_id, site, subject, visit.session],
                      retained=retained_values(headers, opts.retain_device_identity))
    study = Study(trial.trial_id, site, key, subject, visit.session, new_study_uid, acq,
                  visit.days_from_baseline, visit.in_window)
    dating = date_finding(dated.source)   # None when StudyDate itself held the date
    outcome = StudyOutcome(study, len(files), "; ".join(ctx.method_text), received_at=received_at,
                           findings=([dating] if dating else []) + list(visit.findings),
                           matcher=matcher,
                           characteristics=patient_characteristics(headers[0], opts.retain_patient_characteristics))
    scanner_findings: dict[tuple[str, str], Finding] = {}
    pooled = len(files) >= PARALLEL_MIN_FILES
    started, derived = [], []
    study_uid = str(files[0].header.StudyInstanceUID)    # the original: read before de-identification
    series = list(group_series(files).values())
    arrived = {str(m[0].header.get("SeriesInstanceUID", "")) for m in series}
    for (uid, series_uid), (gone, listed, number) in sorted(up.absent.items()):
        if uid == study_uid and series_uid not in arrived:
            outcome.findings.append(Finding(
                kind="incomplete_series", severity="major", observed=f"series {number}: {gone} of {listed} file(s)",
                message=f"series {number}: the upload's DICOMDIR lists {listed} file(s) of it and none arrived; "
                        "the site should send the series again", reason_code="incomplete_series"))
    for members in series:
        acquired, apart = split_derived(members)   # the scanner's computed images are not volumes
        started.append(_start_series(up, ctx, matcher, acquired, pooled))
        if apart:
            derived.append((started[-1].number, apart))
    # without Retain Device Identity the serial leaves intake only as a keyed label
    show = (lambda serial: serial) if opts.retain_device_identity else partial(device_label, secret)
    for pending in started:
        so, deid = _finish_series(up, pending, show)
        for f in list(so.findings):
            if f.kind in ("unknown_scanner", "new_scanner_epoch"):
                scanner_findings.setdefault((f.kind, f.observed or ""), f)
                so.findings.remove(f)
        outcome.series.append(so)
        if deid.ok:
            outcome.verified_files += list(deid.sources.values())
        else:
            outcome.quarantined += _quarantine_series(up, pending.job.files, deid)
    outcome.findings += list(scanner_findings.values())
    for number, apart in derived:
        outcome.quarantined += _keep_derived_apart(up, number, apart)
        outcome.findings.append(Finding(
            kind="derived_image", severity="minor", observed=f"series {number}: {len(apart)} file(s)",
            message=f"series {number}: {len(apart)} derived image(s) ({apart[0][1]}) kept apart from the "
                    "acquisition in quarantine/; not de-identified, counted or converted",
            reason_code="derived_image"))
    # later stages (BIDS, derivatives) verify against this, long after the raw upload is gone
    lake.write_text(fingerprint_path(site, subject, visit.session, key),
                    Fingerprint.from_matcher(matcher, secret).to_json())
    present = {s.series_type for s in outcome.series if s.series_type and s.verdict != "rejected"}
    outcome.findings += check_completeness(trial, site, visit.session, present)
    return outcome


@dataclass
class _PendingSeries:
    """What the received headers said about a series, and its de-identification under way."""

    number: int
    params: dict
    identity: dict
    descriptions: list[str]
    job: SeriesJob
    derived: str | None        # why every file of the series is a derived image, else None
    incomplete: str | None     # what the series lacks (volumes, listed files), else None


def _start_series(up: Upload, ctx: DeidContext, matcher: Matcher, members: list[ReceivedFile],
                  pooled: bool) -> _PendingSeries:
    # everything read from the received headers is read here: de-identification rewrites them
    headers = [m.header for m in members]
    h = headers[0]
    number = int(h.get("SeriesNumber", 0) or 0)
    reasons = [derived_reason(x) for x in headers]
    gone, listed, _ = up.absent.get((str(h.get("StudyInstanceUID", "")), str(h.get("SeriesInstanceUID", ""))),
                                    (0, 0, 0))
    incomplete = series_gaps(headers) or (
        f"{gone} of the {listed} files the upload's DICOMDIR lists did not arrive" if gone else None)
    return _PendingSeries(number, series_parameters(headers), scanner_identity(h),
                          [str(h.get("SeriesDescription", "") or ""), str(h.get("ProtocolName", "") or "")],
                          start_series(members, ctx, matcher, number, pooled),
                          reasons[0] if all(reasons) else None, incomplete)


def _finish_series(up: Upload, p: _PendingSeries, show: Callable[[str | None], str | None]
                   ) -> tuple[SeriesOutcome, DeidSeries]:
    deid = collect_series(p.job)
    epoch, scanner = check_scanner(up.trial.site(up.site), p.identity, deid.series_uid, show)
    check = check_series(p.descriptions, p.params, p.identity["manufacturer"], up.trial, up.site,
                         deid.series_uid, label=deid.description or f"series {p.number}", derived=p.derived,
                         incomplete=p.incomplete)
    identity = {**p.identity, "device_serial": show(p.identity.get("device_serial"))}
    so = SeriesOutcome(deid.series_uid, p.number, deid.description, len(p.job.files), p.params, identity,
                       epoch, check.series_type, check.verdict, check.findings + scanner,
                       burned_in=deid.refused_code == "burned_in")
    if deid.ok:
        write_series(up.lake, deid)
        so.deid_path, so.content_sha256 = deid.folder, deid.content_sha256
    else:
        so.verdict = "rejected"
        kind = "burned_in_annotation" if deid.refused_code == "burned_in" else "quarantined_file"
        so.findings.append(Finding(kind=kind, severity="major", series_key=deid.series_uid,
                                   observed=deid.refused_code,
                                   message=f"series {p.number} quarantined: {deid.refused}",
                                   reason_code=deid.refused_code or "refused"))
    # Only what is known to be clean goes to the run log (which leaves the restricted stores): the
    # description of a verified series, the protocol's names, and the findings by kind. A finding's
    # message may quote a file name or a scanner serial; it reaches the tables after their PHI check.
    log.info("series %s%s: %s%s%s", p.number, f" {so.description!r}" if deid.ok else "", so.verdict,
             f" as {so.series_type}" if so.series_type else "",
             "".join(f"; {f.severity} {f.kind}" + (f" {f.parameter}" if f.parameter else "") for f in so.findings))
    return so, deid


def _keep_derived_apart(up: Upload, number: int, apart: list[tuple[ReceivedFile, str]]) -> list[QuarantineRecord]:
    return [quarantine(up.lake, up.site, up.key, m.rel, m.raw,
                       f"{m.rel}: a derived image in series {number} ({why}), not an acquired one: kept apart",
                       "derived_image", m.sha256) for m, why in apart]


def _quarantine_series(up: Upload, members: list[ReceivedFile], deid: DeidSeries) -> list[QuarantineRecord]:
    return [quarantine(up.lake, up.site, up.key, m.rel, m.raw, f"{m.rel}: {deid.refused}",
                       deid.refused_code or "refused", m.sha256) for m in members]


#: Files an upload may hold beside its images, kept apart without a site query: a README or a
#: protocol PDF, a structured or protocol report object, the media's DICOMDIR.
KEPT_APART = frozenset({"not_dicom", "not_an_image", "dicomdir"})


def quarantine_finding(r: QuarantineRecord) -> Finding:
    """A file rejected at inventory as a deviation; a stray non-DICOM file (a README) is minor."""
    return Finding(kind="quarantined_file", severity="minor" if r.code in KEPT_APART else "major",
                   observed=f"{r.code} sha256:{r.sha256[:12]}",
                   message=f"file with sha256 {r.sha256[:12]} quarantined ({r.code})", reason_code=r.code)


# No Prefect retries: a series de-identified in this process is de-identified in place, so a second
# attempt would start from changed headers. The flow fails instead (audited, the upload kept in the
# inbox), and receiving the upload again starts from the files as they came.
@task(name="receive-one-study", cache_policy=NO_CACHE)
def receive_one_study_task(up: Upload, files: list[ReceivedFile]) -> StudyOutcome:
    return receive_one_study(up, files)
